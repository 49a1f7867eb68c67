// NcclCommunicator over the dlopen'ed NCCL (nccl_library.hpp). Blocking communicators whose
// init and teardown run on helper threads bounded by timeout_s; see [Note: blocking
// communicator] in nccl_communicator.hpp. Byte counters follow ring_bytes_sent
// (collective_volume.cpp).
#include <cuda_runtime_api.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "cuda_check.hpp"
#include "nccl_library.hpp"
#include "zeroshard/error.hpp"
#include "zeroshard/gpu_kernels.hpp"
#include "zeroshard/nccl_communicator.hpp"

namespace zeroshard::gpu {
namespace {

using Clock = std::chrono::steady_clock;

// Makes `device` current for a scope: NCCL and the event calls act on the current device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    ZS_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) ZS_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { (void)cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

ncclDataType_t nccl_dtype(DType d) {
  switch (d) {
    case DType::f32: return ncclFloat32;
    case DType::bf16: return ncclBfloat16;
    case DType::f16: return ncclFloat16;
  }
  ZS_REQUIRE(false, "unknown dtype");
  return ncclFloat32;
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return ncclSum;
    case ReduceOp::avg: return ncclAvg;
    case ReduceOp::max: return ncclMax;
  }
  ZS_REQUIRE(false, "unknown reduce op");
  return ncclSum;
}

void require_timeout(double timeout_s) {
  ZS_REQUIRE(std::isfinite(timeout_s) && timeout_s > 0,
             "timeout_s must be finite and > 0, got " + std::to_string(timeout_s));
}

void require_count(int64_t count, const void* send, const void* recv, const char* what) {
  ZS_REQUIRE(count >= 0, std::string(what) + " must be >= 0, got " + std::to_string(count));
  ZS_REQUIRE(count == 0 || (send != nullptr && recv != nullptr),
             std::string("send and recv must be device pointers when ") + what + " > 0");
}

// For collectives whose other buffer holds world_size counts: also small enough that
// world_size * count bytes (4-byte elements at most) fit in int64.
void require_per_rank_count(int64_t count, int world_size, const void* send, const void* recv,
                            const char* what) {
  require_count(count, send, recv, what);
  ZS_REQUIRE(count <= std::numeric_limits<int64_t>::max() / world_size / 4,
             std::string(what) + " is too large");
}

// State shared between a constructor or destroy() and the helper thread that makes the one
// blocking NCCL call that may wait for peers. The caller waits up to its timeout; if it gives up
// it sets `abandoned` and the helper, still owning the communicator, cleans up when (if ever)
// NCCL returns. Nobody frees a communicator while NCCL may still be using it on another thread.
struct HelperCall {
  std::mutex mutex;
  std::condition_variable cv;
  bool finished = false;   // the helper's NCCL call returned
  bool abandoned = false;  // the caller stopped waiting
  ncclComm_t comm = nullptr;
  ncclResult_t result = ncclSuccess;
  std::string error;  // built on the helper thread: NCCL's last-error text is per thread

  // Waits up to timeout_s; true if the helper finished, else marks the call abandoned.
  bool wait(double timeout_s) {
    std::unique_lock<std::mutex> lock(mutex);
    const auto limit = std::chrono::duration<double>(timeout_s);
    if (cv.wait_for(lock, limit, [this] { return finished; })) return true;
    abandoned = true;
    return false;
  }
};

}  // namespace

struct NcclCommunicator::Impl {
  const detail::NcclApi* api = nullptr;
  // Read without a lock by collectives (abort() must be able to interrupt one in flight);
  // replaced by nullptr, under lifecycle_mutex, when aborted or destroyed.
  std::atomic<ncclComm_t> comm{nullptr};
  std::atomic<bool> aborted{false};
  std::atomic<bool> destroyed{false};
  // Serializes abort(), async_error() and destroy(), so that no thread queries a
  // communicator another thread is freeing.
  mutable std::mutex lifecycle_mutex;
  int rank = 0;
  int world_size = 0;
  int device = 0;
  std::atomic<double> timeout_s{0};
  int group_depth = 0;               // > 0 between group_start() and group_end()
  cudaEvent_t sync_event = nullptr;  // recorded by synchronize()
  mutable std::mutex counters_mutex;
  CollectiveCounters counters;

  ncclComm_t usable(const char* what) const {
    const ncclComm_t c = comm.load(std::memory_order_acquire);
    if (c == nullptr) {
      throw_error(__FILE__, __LINE__,
                  std::string(what) +
                      (destroyed ? ": the NCCL communicator was destroyed"
                                 : ": the NCCL communicator was aborted (after a timeout or an "
                                   "error); create a new one"));
    }
    return c;
  }

  void abort_comm() {
    std::lock_guard<std::mutex> lock(lifecycle_mutex);
    const ncclComm_t c = comm.exchange(nullptr);
    if (c == nullptr) return;
    aborted = true;
    // Also from the watchdog's thread while this rank's main thread is inside a collective
    // call: ncclCommAbort is how NCCL releases a blocking call stuck on a peer.
    (void)api->comm_abort(c);
  }

  // A failed collective leaves the communicator unusable: abort it and throw NCCL's message.
  void check_call(ncclResult_t r, ncclComm_t c, const char* call, const char* file, int line) {
    if (r == ncclSuccess) return;
    if (aborted) {
      throw_error(file, line,
                  std::string(call) + ": the NCCL communicator was aborted while the call ran "
                                      "(a timeout on this rank, or an error)");
    }
    const std::string message = detail::nccl_error_message(call, r, c);
    abort_comm();
    throw_error(file, line, message + "; communicator aborted");
  }

  void count(CollectiveKind kind, int64_t payload_bytes) {
    const int64_t sent = ring_bytes_sent(kind, payload_bytes, world_size);
    std::lock_guard<std::mutex> lock(counters_mutex);
    const auto k = static_cast<int>(kind);
    counters.calls[k] += 1;
    counters.payload_bytes[k] += payload_bytes;
    counters.bytes_sent[k] += sent;
  }
};

// `name` is the NCCL function, so messages read "ncclAllReduce failed: ...".
#define ZS_NCCL_CALL(impl, comm, name, call) \
  (impl).check_call((call), (comm), name, __FILE__, __LINE__)

NcclCommunicator::NcclCommunicator(const std::string& unique_id, int rank, int world_size,
                                   int device, double timeout_s)
    : impl_(std::make_unique<Impl>()) {
  ZS_REQUIRE(unique_id.size() == sizeof(ncclUniqueId),
             "unique_id must be the " + std::to_string(sizeof(ncclUniqueId)) +
                 " bytes of nccl_unique_id(), got " + std::to_string(unique_id.size()));
  ZS_REQUIRE(world_size >= 1, "world_size must be >= 1, got " + std::to_string(world_size));
  ZS_REQUIRE(rank >= 0 && rank < world_size,
             "rank must be in [0, world_size), got " + std::to_string(rank));
  const int devices = device_count();
  ZS_REQUIRE(device >= 0 && device < devices,
             "device " + std::to_string(device) + " does not exist: this process sees " +
                 std::to_string(devices) + " CUDA device(s)");
  require_timeout(timeout_s);
  Impl& s = *impl_;
  s.api = &detail::nccl_api();
  s.rank = rank;
  s.world_size = world_size;
  s.device = device;
  s.timeout_s = timeout_s;

  ncclUniqueId id;
  unique_id.copy(id.internal, sizeof(id.internal));
  auto call = std::make_shared<HelperCall>();
  const detail::NcclApi* api = s.api;
  std::thread([call, api, id, rank, world_size, device] {
    ncclComm_t comm = nullptr;
    ncclResult_t r = ncclSuccess;
    std::string error;
    // A new thread starts on device 0, and NCCL binds a communicator to the current device.
    const cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess) {
      r = ncclUnhandledCudaError;
      error = "cudaSetDevice(" + std::to_string(device) + ") failed: " + cudaGetErrorString(e);
    } else {
      ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
      config.blocking = 1;
      r = api->comm_init_rank_config(&comm, world_size, id, rank, &config);
      if (r != ncclSuccess) error = detail::nccl_error_message("ncclCommInitRankConfig", r, comm);
    }
    std::lock_guard<std::mutex> lock(call->mutex);
    if (call->abandoned) {
      if (comm != nullptr) (void)api->comm_abort(comm);  // the constructor has given up on it
      return;
    }
    call->finished = true;
    call->comm = comm;
    call->result = r;
    call->error = error;
    call->cv.notify_all();
  }).detach();

  if (!call->wait(timeout_s)) {
    throw_error(__FILE__, __LINE__,
                "ncclCommInitRankConfig did not complete within timeout_s = " +
                    std::to_string(timeout_s) + " s on rank " + std::to_string(rank) +
                    " (a rank missing or stuck?); the communicator is abandoned and aborted if "
                    "its init ever returns");
  }
  if (call->result != ncclSuccess) {
    if (call->comm != nullptr) {
      DeviceGuard guard(device);
      (void)api->comm_abort(call->comm);
    }
    throw_error(__FILE__, __LINE__, call->error);
  }
  s.comm = call->comm;
}

NcclCommunicator::~NcclCommunicator() {
  if (!impl_) return;
  try {
    destroy();
  } catch (...) {
    // Never throw from a destructor; destroy() already aborted or abandoned what it could not
    // finish.
  }
}

int NcclCommunicator::rank() const { return impl_->rank; }
int NcclCommunicator::world_size() const { return impl_->world_size; }
int NcclCommunicator::device() const { return impl_->device; }
double NcclCommunicator::timeout_s() const { return impl_->timeout_s; }
void NcclCommunicator::set_timeout_s(double timeout_s) {
  require_timeout(timeout_s);
  impl_->timeout_s = timeout_s;
}

void NcclCommunicator::all_reduce(const void* send, void* recv, int64_t count, DType dtype,
                                  ReduceOp op, Stream stream) {
  Impl& s = *impl_;
  require_count(count, send, recv, "count");
  const ncclComm_t c = s.usable("all_reduce");
  DeviceGuard guard(s.device);
  ZS_NCCL_CALL(s, c, "ncclAllReduce",
               s.api->all_reduce(send, recv, static_cast<size_t>(count), nccl_dtype(dtype),
                                 nccl_op(op), c, static_cast<cudaStream_t>(stream)));
  s.count(CollectiveKind::all_reduce, count * static_cast<int64_t>(dtype_size(dtype)));
}

void NcclCommunicator::reduce_scatter(const void* send, void* recv, int64_t recv_count,
                                      DType dtype, ReduceOp op, Stream stream) {
  Impl& s = *impl_;
  require_per_rank_count(recv_count, s.world_size, send, recv, "recv_count");
  const ncclComm_t c = s.usable("reduce_scatter");
  DeviceGuard guard(s.device);
  ZS_NCCL_CALL(s, c, "ncclReduceScatter",
               s.api->reduce_scatter(send, recv, static_cast<size_t>(recv_count),
                                     nccl_dtype(dtype), nccl_op(op), c,
                                     static_cast<cudaStream_t>(stream)));
  s.count(CollectiveKind::reduce_scatter,
          recv_count * s.world_size * static_cast<int64_t>(dtype_size(dtype)));
}

void NcclCommunicator::all_gather(const void* send, void* recv, int64_t send_count, DType dtype,
                                  Stream stream) {
  Impl& s = *impl_;
  require_per_rank_count(send_count, s.world_size, send, recv, "send_count");
  const ncclComm_t c = s.usable("all_gather");
  DeviceGuard guard(s.device);
  ZS_NCCL_CALL(s, c, "ncclAllGather",
               s.api->all_gather(send, recv, static_cast<size_t>(send_count),
                                 nccl_dtype(dtype), c, static_cast<cudaStream_t>(stream)));
  s.count(CollectiveKind::all_gather,
          send_count * s.world_size * static_cast<int64_t>(dtype_size(dtype)));
}

void NcclCommunicator::broadcast(const void* send, void* recv, int64_t count, DType dtype,
                                 int root, Stream stream) {
  Impl& s = *impl_;
  ZS_REQUIRE(root >= 0 && root < s.world_size,
             "root must be in [0, world_size), got " + std::to_string(root));
  // Only the root reads `send`; other ranks may pass null there.
  ZS_REQUIRE(count >= 0, "count must be >= 0, got " + std::to_string(count));
  ZS_REQUIRE(count == 0 || recv != nullptr, "recv must be a device pointer when count > 0");
  ZS_REQUIRE(count == 0 || s.rank != root || send != nullptr,
             "send must be a device pointer on the root rank");
  const ncclComm_t c = s.usable("broadcast");
  DeviceGuard guard(s.device);
  ZS_NCCL_CALL(s, c, "ncclBroadcast",
               s.api->broadcast(send, recv, static_cast<size_t>(count), nccl_dtype(dtype), root,
                                c, static_cast<cudaStream_t>(stream)));
  s.count(CollectiveKind::broadcast, count * static_cast<int64_t>(dtype_size(dtype)));
}

void NcclCommunicator::all_to_all(const void* send, void* recv, int64_t count_per_rank,
                                  DType dtype, Stream stream) {
  Impl& s = *impl_;
  require_per_rank_count(count_per_rank, s.world_size, send, recv, "count_per_rank");
  const ncclComm_t c = s.usable("all_to_all");
  DeviceGuard guard(s.device);
  const int64_t block = count_per_rank * static_cast<int64_t>(dtype_size(dtype));
  const auto* in = static_cast<const char*>(send);
  auto* out = static_cast<char*>(recv);
  const ncclDataType_t type = nccl_dtype(dtype);
  const auto st = static_cast<cudaStream_t>(stream);
  const auto n = static_cast<size_t>(count_per_rank);
  ZS_NCCL_CHECK("ncclGroupStart", s.api->group_start(), c);
  ncclResult_t r = ncclSuccess;
  const char* failed = "ncclGroupEnd";
  for (int peer = 0; peer < s.world_size && r == ncclSuccess; ++peer) {
    r = s.api->send(in + peer * block, n, type, peer, c, st);
    if (r != ncclSuccess) {
      failed = "ncclSend";
      break;
    }
    r = s.api->recv(out + peer * block, n, type, peer, c, st);
    if (r != ncclSuccess) failed = "ncclRecv";
  }
  // Always close the group: NCCL's group state is per thread (see group_end()).
  const ncclResult_t end = s.api->group_end();
  ZS_NCCL_CALL(s, c, failed, r != ncclSuccess ? r : end);
  s.count(CollectiveKind::reduce_scatter, block * s.world_size);
}

void NcclCommunicator::group_start() {
  Impl& s = *impl_;
  const ncclComm_t c = s.usable("group_start");
  ZS_NCCL_CHECK("ncclGroupStart", s.api->group_start(), c);
  ++s.group_depth;
}

void NcclCommunicator::group_end() {
  Impl& s = *impl_;
  ZS_REQUIRE(s.group_depth > 0, "group_end() without a matching group_start()");
  --s.group_depth;
  // Close NCCL's group even if the communicator was aborted meanwhile: the group state is
  // per thread and would swallow this thread's next NCCL calls.
  const ncclComm_t c = s.comm.load(std::memory_order_acquire);
  DeviceGuard guard(s.device);
  const ncclResult_t r = s.api->group_end();
  if (c == nullptr) (void)s.usable("group_end");  // throws: aborted or destroyed
  ZS_NCCL_CALL(s, c, "ncclGroupEnd", r);
}

void NcclCommunicator::synchronize(Stream stream) {
  Impl& s = *impl_;
  (void)s.usable("synchronize");
  DeviceGuard guard(s.device);
  if (s.sync_event == nullptr) {
    ZS_CUDA_CHECK(cudaEventCreateWithFlags(&s.sync_event, cudaEventDisableTiming));
  }
  ZS_CUDA_CHECK(cudaEventRecord(s.sync_event, static_cast<cudaStream_t>(stream)));
  // Poll instead of cudaEventSynchronize: a collective whose peer never arrives would block
  // that call forever; here we see NCCL's async errors and the deadline.
  const double timeout = s.timeout_s;
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout);
  for (;;) {
    const cudaError_t q = cudaEventQuery(s.sync_event);
    if (q == cudaSuccess) return;
    if (q != cudaErrorNotReady) ZS_CUDA_CHECK(q);
    const std::string error = async_error();
    if (!error.empty()) {
      s.abort_comm();
      throw_error(__FILE__, __LINE__, "synchronize: " + error + "; communicator aborted");
    }
    if (s.aborted) (void)s.usable("synchronize");  // aborted by another thread: throws
    if (Clock::now() > deadline) {
      s.abort_comm();
      throw_error(__FILE__, __LINE__,
                  "synchronize: the stream's work did not finish within timeout_s = " +
                      std::to_string(timeout) + " s on rank " + std::to_string(s.rank) +
                      " (a rank missing or stuck?); communicator aborted");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

void NcclCommunicator::abort() {
  Impl& s = *impl_;
  DeviceGuard guard(s.device);
  s.abort_comm();
}

bool NcclCommunicator::aborted() const { return impl_->aborted; }

std::string NcclCommunicator::async_error() const {
  const Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.lifecycle_mutex);
  const ncclComm_t c = s.comm.load(std::memory_order_acquire);
  if (c == nullptr) return "";
  ncclResult_t state = ncclSuccess;
  const ncclResult_t r = s.api->comm_get_async_error(c, &state);
  if (r != ncclSuccess) return detail::nccl_error_message("ncclCommGetAsyncError", r, c);
  if (state == ncclSuccess || state == ncclInProgress) return "";
  return detail::nccl_error_message("NCCL (asynchronous error)", state, c);
}

void NcclCommunicator::destroy() {
  Impl& s = *impl_;
  ncclComm_t c = nullptr;
  {
    std::lock_guard<std::mutex> lock(s.lifecycle_mutex);
    c = s.comm.exchange(nullptr);
    if (c != nullptr) s.destroyed = true;
  }
  if (s.sync_event != nullptr) {
    DeviceGuard guard(s.device);
    (void)cudaEventDestroy(s.sync_event);
    s.sync_event = nullptr;
  }
  if (c == nullptr) return;  // aborted (abort freed it) or destroyed already
  // ncclCommFinalize waits for this rank's queued work, which a dead peer can hold forever:
  // run finalize + destroy on a helper thread and wait at most timeout_s. With a blocking
  // communicator both return only when NCCL's own threads are done, so a finished helper means
  // nothing of NCCL's is left running for this communicator at process exit.
  auto call = std::make_shared<HelperCall>();
  const detail::NcclApi* api = s.api;
  const int device = s.device;
  std::thread([call, api, c, device] {
    ncclResult_t r = ncclSuccess;
    std::string error;
    if (cudaSetDevice(device) != cudaSuccess) r = ncclUnhandledCudaError;
    if (r == ncclSuccess) {
      r = api->comm_finalize(c);
      if (r != ncclSuccess) error = detail::nccl_error_message("ncclCommFinalize", r, c);
    }
    if (r == ncclSuccess) {
      r = api->comm_destroy(c);
      if (r != ncclSuccess) error = detail::nccl_error_message("ncclCommDestroy", r, c);
    } else {
      (void)api->comm_abort(c);  // finalize failed: release what it left, without peers
    }
    std::lock_guard<std::mutex> lock(call->mutex);
    call->finished = true;
    call->result = r;
    call->error = error;
    call->cv.notify_all();
  }).detach();
  if (!call->wait(s.timeout_s)) {
    throw_error(__FILE__, __LINE__,
                "destroy: ncclCommFinalize did not complete within timeout_s = " +
                    std::to_string(static_cast<double>(s.timeout_s)) + " s on rank " +
                    std::to_string(s.rank) +
                    " (a peer gone with collectives outstanding?); left to its thread");
  }
  if (call->result != ncclSuccess) {
    throw_error(__FILE__, __LINE__,
                call->error.empty() ? "destroy: cudaSetDevice failed" : call->error);
  }
}

CollectiveCounters NcclCommunicator::counters() const {
  std::lock_guard<std::mutex> lock(impl_->counters_mutex);
  return impl_->counters;
}

void NcclCommunicator::reset_counters() {
  std::lock_guard<std::mutex> lock(impl_->counters_mutex);
  impl_->counters = CollectiveCounters{};
}

}  // namespace zeroshard::gpu
