// NcclCommunicator over the dlopen'ed NCCL (nccl_library.hpp). Communicators are created
// non-blocking (config.blocking = 0) so that no NCCL call can hang the process: whenever NCCL
// answers ncclInProgress we poll ncclCommGetAsyncError, and past timeout_s we abort the
// communicator and throw. Byte counters follow ring_bytes_sent (collective_volume.cpp).
#include <cuda_runtime_api.h>

#include <chrono>
#include <cmath>
#include <limits>
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

}  // namespace

struct NcclCommunicator::Impl {
  const detail::NcclApi* api = nullptr;
  ncclComm_t comm = nullptr;
  int rank = 0;
  int world_size = 0;
  int device = 0;
  double timeout_s = 0;
  bool aborted = false;
  int group_depth = 0;               // > 0 between group_start() and group_end()
  cudaEvent_t sync_event = nullptr;  // recorded by synchronize()
  mutable std::mutex counters_mutex;
  CollectiveCounters counters;

  void require_usable(const char* what) const {
    if (aborted || comm == nullptr) {
      throw_error(__FILE__, __LINE__,
                  std::string(what) + ": the NCCL communicator was aborted (after a timeout or "
                                      "an error); create a new one");
    }
  }

  void abort_comm() {
    if (comm != nullptr) (void)api->comm_abort(comm);
    comm = nullptr;
    aborted = true;
  }

  // Polls until the communicator leaves ncclInProgress; aborts and throws on error or timeout.
  void wait_ready(const char* call, const char* file, int line) {
    const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
    for (;;) {
      ncclResult_t state = ncclSuccess;
      const ncclResult_t r = api->comm_get_async_error(comm, &state);
      if (r != ncclSuccess) state = r;
      if (state == ncclSuccess) return;
      if (state != ncclInProgress) {
        const ncclComm_t failed = comm;
        std::string message;
        try {
          detail::throw_nccl_error(call, state, failed, file, line);
        } catch (const Error& e) {
          message = e.what();
        }
        abort_comm();
        throw Error(message + "; communicator aborted");
      }
      if (Clock::now() > deadline) {
        abort_comm();
        throw_error(file, line,
                    std::string(call) + " did not complete within timeout_s = " +
                        std::to_string(timeout_s) + " s (a rank missing or stuck?); "
                        "communicator aborted");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  // A call that may answer ncclInProgress in non-blocking mode. Inside a group the work is only
  // queued, so waiting happens at group_end().
  void check_call(ncclResult_t r, const char* call, const char* file, int line) {
    if (r == ncclSuccess) return;
    if (r == ncclInProgress) {
      if (group_depth == 0) wait_ready(call, file, line);
      return;
    }
    detail::throw_nccl_error(call, r, comm, file, line);
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
#define ZS_NCCL_CALL(impl, name, call) (impl).check_call((call), name, __FILE__, __LINE__)

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
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  DeviceGuard guard(device);
  const ncclResult_t r = s.api->comm_init_rank_config(&s.comm, world_size, id, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    const ncclComm_t failed = s.comm;
    if (failed != nullptr) (void)s.api->comm_abort(failed);
    s.comm = nullptr;
    detail::throw_nccl_error("ncclCommInitRankConfig", r, failed, __FILE__, __LINE__);
  }
  s.wait_ready("ncclCommInitRankConfig", __FILE__, __LINE__);
}

NcclCommunicator::~NcclCommunicator() {
  if (!impl_) return;
  Impl& s = *impl_;
  if (s.sync_event != nullptr) (void)cudaEventDestroy(s.sync_event);
  // Destroy flushes this rank's queued work; never throw from a destructor.
  if (s.comm != nullptr && !s.aborted) (void)s.api->comm_destroy(s.comm);
}

int NcclCommunicator::rank() const { return impl_->rank; }
int NcclCommunicator::world_size() const { return impl_->world_size; }
double NcclCommunicator::timeout_s() const { return impl_->timeout_s; }
void NcclCommunicator::set_timeout_s(double timeout_s) {
  require_timeout(timeout_s);
  impl_->timeout_s = timeout_s;
}

void NcclCommunicator::all_reduce(const void* send, void* recv, int64_t count, DType dtype,
                                  ReduceOp op, Stream stream) {
  Impl& s = *impl_;
  require_count(count, send, recv, "count");
  s.require_usable("all_reduce");
  DeviceGuard guard(s.device);
  ZS_NCCL_CALL(s, "ncclAllReduce",
               s.api->all_reduce(send, recv, static_cast<size_t>(count), nccl_dtype(dtype),
                                 nccl_op(op), s.comm, static_cast<cudaStream_t>(stream)));
  s.count(CollectiveKind::all_reduce, count * static_cast<int64_t>(dtype_size(dtype)));
}

void NcclCommunicator::reduce_scatter(const void* send, void* recv, int64_t recv_count,
                                      DType dtype, ReduceOp op, Stream stream) {
  Impl& s = *impl_;
  require_count(recv_count, send, recv, "recv_count");
  ZS_REQUIRE(recv_count <= std::numeric_limits<int64_t>::max() / s.world_size / 4,
             "recv_count is too large");
  s.require_usable("reduce_scatter");
  DeviceGuard guard(s.device);
  ZS_NCCL_CALL(s, "ncclReduceScatter",
               s.api->reduce_scatter(send, recv, static_cast<size_t>(recv_count),
                                     nccl_dtype(dtype), nccl_op(op), s.comm,
                                     static_cast<cudaStream_t>(stream)));
  s.count(CollectiveKind::reduce_scatter,
          recv_count * s.world_size * static_cast<int64_t>(dtype_size(dtype)));
}

void NcclCommunicator::all_gather(const void* send, void* recv, int64_t send_count, DType dtype,
                                  Stream stream) {
  Impl& s = *impl_;
  require_count(send_count, send, recv, "send_count");
  ZS_REQUIRE(send_count <= std::numeric_limits<int64_t>::max() / s.world_size / 4,
             "send_count is too large");
  s.require_usable("all_gather");
  DeviceGuard guard(s.device);
  ZS_NCCL_CALL(s, "ncclAllGather",
               s.api->all_gather(send, recv, static_cast<size_t>(send_count),
                                 nccl_dtype(dtype), s.comm, static_cast<cudaStream_t>(stream)));
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
  s.require_usable("broadcast");
  DeviceGuard guard(s.device);
  ZS_NCCL_CALL(s, "ncclBroadcast",
               s.api->broadcast(send, recv, static_cast<size_t>(count), nccl_dtype(dtype), root,
                                s.comm, static_cast<cudaStream_t>(stream)));
  s.count(CollectiveKind::broadcast, count * static_cast<int64_t>(dtype_size(dtype)));
}

void NcclCommunicator::group_start() {
  Impl& s = *impl_;
  s.require_usable("group_start");
  ZS_NCCL_CHECK("ncclGroupStart", s.api->group_start(), s.comm);
  ++s.group_depth;
}

void NcclCommunicator::group_end() {
  Impl& s = *impl_;
  ZS_REQUIRE(s.group_depth > 0, "group_end() without a matching group_start()");
  s.require_usable("group_end");
  --s.group_depth;
  DeviceGuard guard(s.device);
  ZS_NCCL_CALL(s, "ncclGroupEnd", s.api->group_end());
}

void NcclCommunicator::synchronize(Stream stream) {
  Impl& s = *impl_;
  s.require_usable("synchronize");
  DeviceGuard guard(s.device);
  if (s.sync_event == nullptr) {
    ZS_CUDA_CHECK(cudaEventCreateWithFlags(&s.sync_event, cudaEventDisableTiming));
  }
  ZS_CUDA_CHECK(cudaEventRecord(s.sync_event, static_cast<cudaStream_t>(stream)));
  // Poll instead of cudaEventSynchronize: a collective whose peer never arrives would block
  // that call forever; here we see NCCL's async errors and the deadline.
  const auto deadline = Clock::now() + std::chrono::duration<double>(s.timeout_s);
  for (;;) {
    const cudaError_t q = cudaEventQuery(s.sync_event);
    if (q == cudaSuccess) return;
    if (q != cudaErrorNotReady) ZS_CUDA_CHECK(q);
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = s.api->comm_get_async_error(s.comm, &state);
    if (r != ncclSuccess || (state != ncclSuccess && state != ncclInProgress)) {
      s.wait_ready("synchronize (ncclCommGetAsyncError)", __FILE__, __LINE__);  // aborts, throws
    }
    if (Clock::now() > deadline) {
      s.abort_comm();
      throw_error(__FILE__, __LINE__,
                  "synchronize: the stream's work did not finish within timeout_s = " +
                      std::to_string(s.timeout_s) + " s (a rank missing or stuck?); "
                      "communicator aborted");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

void NcclCommunicator::abort() { impl_->abort_comm(); }
bool NcclCommunicator::aborted() const { return impl_->aborted; }

CollectiveCounters NcclCommunicator::counters() const {
  std::lock_guard<std::mutex> lock(impl_->counters_mutex);
  return impl_->counters;
}

void NcclCommunicator::reset_counters() {
  std::lock_guard<std::mutex> lock(impl_->counters_mutex);
  impl_->counters = CollectiveCounters{};
}

}  // namespace zeroshard::gpu
