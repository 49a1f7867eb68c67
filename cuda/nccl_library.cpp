// Loads libnccl.so.2 once per process: the copy already in the process (torch's) when there is
// one -- two NCCLs in one process fight over the same GPUs -- else the given path (the
// nvidia-nccl-cuXX wheel's), else the loader's default search.
#include "nccl_library.hpp"

#include <dlfcn.h>

#include <mutex>
#include <string>

#include "zeroshard/error.hpp"
#include "zeroshard/nccl_communicator.hpp"

namespace zeroshard::gpu {
namespace detail {
namespace {

constexpr int kMinNcclVersion = 21800;

std::mutex g_load_mutex;
NcclApi g_api;
bool g_loaded = false;  // written under g_load_mutex, before which g_api is complete

std::string dl_error() {
  const char* e = dlerror();
  return e ? e : "unknown dlopen error";
}

template <class Fn>
void resolve(void* handle, const char* name, Fn& slot, bool required) {
  slot = reinterpret_cast<Fn>(dlsym(handle, name));
  if (slot == nullptr && required) {
    throw_error(__FILE__, __LINE__,
                std::string("libnccl.so.2 has no symbol ") + name +
                    ": zeroshard needs NCCL >= 2.18 (pip install -U nvidia-nccl-cuXX)");
  }
}

void load_locked(const std::string& path) {
  if (g_loaded) return;
  std::string tried;
  void* handle = dlopen("libnccl.so.2", RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr && !path.empty()) {
    handle = dlopen(path.c_str(), RTLD_NOW);
    if (handle == nullptr) tried += "\n  " + path + ": " + dl_error();
  }
  if (handle == nullptr) {
    handle = dlopen("libnccl.so.2", RTLD_NOW);
    if (handle == nullptr) tried += "\n  libnccl.so.2 (default search): " + dl_error();
  }
  if (handle == nullptr) {
    throw_error(__FILE__, __LINE__,
                "cannot load NCCL: install nvidia-nccl-cu<CUDA major> (torch's CUDA wheels bring "
                "it) or pass its libnccl.so.2 path to load_nccl(). Tried:" + tried);
  }
  NcclApi api;
  resolve(handle, "ncclGetVersion", api.get_version, true);
  resolve(handle, "ncclGetUniqueId", api.get_unique_id, true);
  resolve(handle, "ncclCommInitRankConfig", api.comm_init_rank_config, true);
  resolve(handle, "ncclCommGetAsyncError", api.comm_get_async_error, true);
  resolve(handle, "ncclCommFinalize", api.comm_finalize, true);
  resolve(handle, "ncclCommAbort", api.comm_abort, true);
  resolve(handle, "ncclCommDestroy", api.comm_destroy, true);
  resolve(handle, "ncclAllReduce", api.all_reduce, true);
  resolve(handle, "ncclReduceScatter", api.reduce_scatter, true);
  resolve(handle, "ncclAllGather", api.all_gather, true);
  resolve(handle, "ncclBroadcast", api.broadcast, true);
  resolve(handle, "ncclSend", api.send, true);
  resolve(handle, "ncclRecv", api.recv, true);
  resolve(handle, "ncclGroupStart", api.group_start, true);
  resolve(handle, "ncclGroupEnd", api.group_end, true);
  resolve(handle, "ncclGetErrorString", api.get_error_string, true);
  resolve(handle, "ncclGetLastError", api.get_last_error, false);
  const ncclResult_t r = api.get_version(&api.version);
  if (r != ncclSuccess) {
    throw_error(__FILE__, __LINE__,
                "ncclGetVersion failed: " + std::string(api.get_error_string(r)));
  }
  if (api.version < kMinNcclVersion) {
    throw_error(__FILE__, __LINE__,
                "the loaded NCCL is " + std::to_string(api.version) +
                    "; zeroshard needs >= 2.18 (pip install -U nvidia-nccl-cuXX)");
  }
  // The handle stays open for the life of the process: communicators may outlive any caller.
  g_api = api;
  g_loaded = true;
}

}  // namespace

const NcclApi& nccl_api() {
  std::lock_guard<std::mutex> lock(g_load_mutex);
  load_locked("");
  return g_api;
}

std::string nccl_error_message(const char* call, ncclResult_t result, ncclComm_t comm) {
  std::string what = std::string(call) + " failed: ";
  what += g_api.get_error_string ? g_api.get_error_string(result)
                                 : ("ncclResult_t " + std::to_string(static_cast<int>(result)));
  if (g_api.get_last_error != nullptr) {
    const char* detail = g_api.get_last_error(comm);
    if (detail != nullptr && *detail != '\0') what += std::string(" (") + detail + ")";
  }
  return what;
}

void throw_nccl_error(const char* call, ncclResult_t result, ncclComm_t comm, const char* file,
                      int line) {
  throw_error(file, line, nccl_error_message(call, result, comm));
}

}  // namespace detail

void load_nccl(const std::string& path) {
  std::lock_guard<std::mutex> lock(detail::g_load_mutex);
  detail::load_locked(path);
}

bool nccl_loaded() {
  std::lock_guard<std::mutex> lock(detail::g_load_mutex);
  return detail::g_loaded;
}

int nccl_version_loaded() {
  std::lock_guard<std::mutex> lock(detail::g_load_mutex);
  if (!detail::g_loaded) {
    throw_error(__FILE__, __LINE__, "NCCL is not loaded yet: call load_nccl(path) first");
  }
  return detail::g_api.version;
}

int nccl_version_linked() { return NCCL_VERSION_CODE; }

std::string nccl_unique_id() {
  const auto& api = detail::nccl_api();
  ncclUniqueId id;
  ZS_NCCL_CHECK("ncclGetUniqueId", api.get_unique_id(&id), nullptr);
  return std::string(id.internal, sizeof(id.internal));
}

}  // namespace zeroshard::gpu
