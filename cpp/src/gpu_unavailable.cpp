// The GPU API in the CPU variant: every call says how to get the CUDA variant.
#include <string>

#include "zeroshard/error.hpp"
#include "zeroshard/gpu_kernels.hpp"
#include "zeroshard/nccl_communicator.hpp"

namespace zeroshard::gpu {
namespace {
[[noreturn]] void no_cuda(const char* what) {
  throw Error(std::string(what) +
              ": zeroshard was built without CUDA (variant cpu). Install a CUDA wheel "
              "(zeroshard-cu12 / zeroshard-cu13) or rebuild with ZEROSHARD_CUDA=ON.");
}
}  // namespace

bool built_with_cuda() { return false; }
int device_count() { return 0; }
std::string device_name(int) { no_cuda("device_name"); }
void host_register(void*, int64_t) { no_cuda("host_register"); }
void host_unregister(void*) { no_cuda("host_unregister"); }
void check_finite(const void*, DType, int64_t, int32_t*, Stream) { no_cuda("check_finite"); }
void adam_step(float*, const void*, DType, float*, float*, float*, void*, DType, int64_t,
               const AdamConfig&, int32_t*, Stream) {
  no_cuda("adam_step");
}
void sgd_step(float*, const void*, DType, float*, void*, DType, int64_t, const SgdConfig&,
              int32_t*, Stream) {
  no_cuda("sgd_step");
}
int64_t l2_norm_workspace_bytes() { return 0; }
void l2_norm_sq(const void*, DType, int64_t, float*, int32_t*, void*, Stream) {
  no_cuda("l2_norm_sq");
}
void scale(void*, DType, int64_t, float, Stream) { no_cuda("scale"); }
void cast(const void*, DType, void*, DType, int64_t, Stream) { no_cuda("cast"); }
void quantize(const void*, DType, int64_t, int, int64_t, int8_t*, float*, Stream) {
  no_cuda("quantize");
}
void dequantize(const int8_t*, const float*, int64_t, int, int64_t, void*, DType, bool, Stream) {
  no_cuda("dequantize");
}

void load_nccl(const std::string&) { no_cuda("load_nccl"); }
bool nccl_loaded() { return false; }
int nccl_version_loaded() { no_cuda("nccl_version_loaded"); }
int nccl_version_linked() { return 0; }
std::string nccl_unique_id() { no_cuda("nccl_unique_id"); }

struct NcclCommunicator::Impl {};
NcclCommunicator::NcclCommunicator(const std::string&, int, int, int, double) {
  no_cuda("NcclCommunicator");
}
NcclCommunicator::~NcclCommunicator() = default;
int NcclCommunicator::rank() const { no_cuda("NcclCommunicator"); }
int NcclCommunicator::world_size() const { no_cuda("NcclCommunicator"); }
int NcclCommunicator::device() const { no_cuda("NcclCommunicator"); }
double NcclCommunicator::timeout_s() const { no_cuda("NcclCommunicator"); }
void NcclCommunicator::set_timeout_s(double) { no_cuda("NcclCommunicator"); }
void NcclCommunicator::all_reduce(const void*, void*, int64_t, DType, ReduceOp, Stream) {
  no_cuda("NcclCommunicator");
}
void NcclCommunicator::reduce_scatter(const void*, void*, int64_t, DType, ReduceOp, Stream) {
  no_cuda("NcclCommunicator");
}
void NcclCommunicator::all_gather(const void*, void*, int64_t, DType, Stream) {
  no_cuda("NcclCommunicator");
}
void NcclCommunicator::broadcast(const void*, void*, int64_t, DType, int, Stream) {
  no_cuda("NcclCommunicator");
}
void NcclCommunicator::all_to_all(const void*, void*, int64_t, DType, Stream) {
  no_cuda("NcclCommunicator");
}
void NcclCommunicator::group_start() { no_cuda("NcclCommunicator"); }
void NcclCommunicator::group_end() { no_cuda("NcclCommunicator"); }
void NcclCommunicator::synchronize(Stream) { no_cuda("NcclCommunicator"); }
void NcclCommunicator::abort() { no_cuda("NcclCommunicator"); }
bool NcclCommunicator::aborted() const { no_cuda("NcclCommunicator"); }
std::string NcclCommunicator::async_error() const { no_cuda("NcclCommunicator"); }
void NcclCommunicator::destroy() { no_cuda("NcclCommunicator"); }
CollectiveCounters NcclCommunicator::counters() const { no_cuda("NcclCommunicator"); }
void NcclCommunicator::reset_counters() { no_cuda("NcclCommunicator"); }

}  // namespace zeroshard::gpu
