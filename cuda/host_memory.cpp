// Page-locked host memory for CPU offload. torch's pinned allocator rounds every block up to a
// power of two (a 6.3 GB fp32 master takes 8 GB), so offload pins exactly the pages of host
// tensors it allocated itself: cudaHostRegister on their whole pages, which makes the D2H/H2D
// copies of them asynchronous DMA.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda_check.hpp"
#include "zeroshard/error.hpp"
#include "zeroshard/gpu_kernels.hpp"

namespace zeroshard::gpu {

void host_register(void* ptr, int64_t bytes) {
  ZS_REQUIRE(ptr != nullptr && bytes > 0, "host_register needs a non-null range of bytes > 0");
  // Portable: pinned for every CUDA context, not only the one current here (a script that
  // never calls set_device has cuda:0 current while its tensors live on another GPU).
  ZS_CUDA_CHECK(cudaHostRegister(ptr, static_cast<size_t>(bytes), cudaHostRegisterPortable));
}

void host_unregister(void* ptr) {
  ZS_REQUIRE(ptr != nullptr, "host_unregister needs the pointer given to host_register");
  ZS_CUDA_CHECK(cudaHostUnregister(ptr));
}

}  // namespace zeroshard::gpu
