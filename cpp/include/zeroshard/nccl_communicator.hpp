// NcclCommunicator: one NCCL communicator over raw device pointers and a stream, with byte
// counters per collective kind and a timeout that aborts instead of hanging.
// See [Note: blocking communicator] below.
//
// libnccl.so.2 is opened at run time (dlopen), never linked: in a process where torch already
// loaded NCCL we use that same library (RTLD_NOLOAD first), otherwise the path given to
// load_nccl() (the nvidia-nccl-cuXX wheel's). Only API present since NCCL 2.18 is used.
// In the CPU variant every member throws Error("built without CUDA").
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>

#include "zeroshard/dtype.hpp"
#include "zeroshard/gpu_kernels.hpp"

namespace zeroshard::gpu {

enum class ReduceOp : int { sum = 0, avg = 1, max = 2 };
enum class CollectiveKind : int { all_reduce = 0, reduce_scatter = 1, all_gather = 2, broadcast = 3 };
constexpr int kNumCollectiveKinds = 4;
const char* collective_kind_name(CollectiveKind kind);

// Bytes one rank sends for a collective over `payload_bytes` (the full buffer: all_reduce's
// buffer, reduce_scatter's input, all_gather's output, broadcast's buffer) under the ring
// algorithm NCCL and gloo use: all_reduce 2(N-1)/N, reduce_scatter and all_gather (N-1)/N,
// broadcast (N-1)/N of the payload. ZeRO's volume claims are stated in these units. Also used by
// the Python gloo communicator, so both count alike.
int64_t ring_bytes_sent(CollectiveKind kind, int64_t payload_bytes, int world_size);

struct CollectiveCounters {
  std::array<int64_t, kNumCollectiveKinds> calls{};
  std::array<int64_t, kNumCollectiveKinds> payload_bytes{};
  std::array<int64_t, kNumCollectiveKinds> bytes_sent{};  // ring_bytes_sent summed
};

// Loads libnccl.so.2: an already loaded copy if any, else `path` (empty: the default search).
// Idempotent. Throws with the dlopen error when no library can be opened.
void load_nccl(const std::string& path);
bool nccl_loaded();
int nccl_version_loaded();  // e.g. 22809 for 2.28.9; throws if not loaded
int nccl_version_linked();  // NCCL_VERSION_CODE of the headers we compiled against; 0 on CPU
std::string nccl_unique_id();  // ncclUniqueId bytes (128) to share through the store

// [Note: blocking communicator]
// The communicator is created blocking (config.blocking = 1): every collective and group_end()
// returns as soon as its work is enqueued on the stream, with no host wait (a non-blocking
// communicator answers ncclInProgress to each ungrouped collective in NCCL >= 2.28 and must be
// polled). What blocking mode gives up is a bounded init, so init runs on a helper thread that
// the constructor waits for up to timeout_s; past it the constructor throws and the helper owns
// the half-made communicator (it aborts it if init ever returns). Hangs after init are the
// caller's watchdog's job: it polls completion events and async_error() and calls abort(),
// which is safe from any thread, also while another thread is inside a collective call.
class NcclCommunicator {
 public:
  // Blocking init on `device` (a helper thread, bounded by timeout_s; throws naming the timeout).
  NcclCommunicator(const std::string& unique_id, int rank, int world_size, int device,
                   double timeout_s);
  // destroy(); never throws.
  ~NcclCommunicator();
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const;
  int world_size() const;
  int device() const;
  double timeout_s() const;
  void set_timeout_s(double timeout_s);

  void all_reduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op,
                  Stream stream);
  // recv_count elements land on each rank; send holds world_size * recv_count.
  void reduce_scatter(const void* send, void* recv, int64_t recv_count, DType dtype, ReduceOp op,
                      Stream stream);
  // send_count elements from each rank; recv holds world_size * send_count in rank order.
  void all_gather(const void* send, void* recv, int64_t send_count, DType dtype, Stream stream);
  void broadcast(const void* send, void* recv, int64_t count, DType dtype, int root,
                 Stream stream);
  // send holds world_size blocks of count_per_rank elements, block r going to rank r; recv gets
  // rank r's block for this rank at block r. NCCL has no all-to-all: one ncclSend and one
  // ncclRecv per peer in a group. Counted as a reduce_scatter of send (the same ring bytes
  // (N-1)/N of the payload leave the rank): qgZ's hops are reduce-scatters.
  void all_to_all(const void* send, void* recv, int64_t count_per_rank, DType dtype,
                  Stream stream);

  // Collectives between group_start() and group_end() are fused by NCCL into one launch.
  void group_start();
  void group_end();

  // Blocks until the work queued on `stream` finishes, polling NCCL's async error; after
  // timeout_s aborts the communicator and throws Error naming the timeout. Not for the hot path:
  // the Python layer joins streams with events and calls this only where it must wait.
  void synchronize(Stream stream);

  // ncclCommAbort, once; later calls and collectives see aborted(). Thread-safe.
  void abort();
  bool aborted() const;
  // The communicator's asynchronous error (ncclCommGetAsyncError) as a message, or "" when there
  // is none or the communicator is already aborted or destroyed. Thread-safe; for the watchdog.
  std::string async_error() const;

  // Orderly teardown of a healthy communicator: ncclCommFinalize (waits for this rank's queued
  // work) then ncclCommDestroy, both returning only after NCCL's own threads are done. Bounded
  // by timeout_s: past it (a peer gone) the communicator is aborted instead. An aborted one is
  // never destroyed (abort already freed it). Idempotent.
  void destroy();

  CollectiveCounters counters() const;
  void reset_counters();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace zeroshard::gpu
