// ZS_CUDA_CHECK: every CUDA runtime call goes through it, so a failure becomes a zeroshard::Error
// naming the call, the CUDA error and the file:line (Python sees zeroshard.CoreError).
// Owns: how CUDA errors are reported. Knows nothing of kernels or NCCL.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "zeroshard/error.hpp"

namespace zeroshard::gpu::detail {

[[noreturn]] inline void throw_cuda_error(const char* call, cudaError_t err, const char* file,
                                          int line) {
  throw_error(file, line, std::string(call) + " failed: " + cudaGetErrorName(err) + " (" +
                              cudaGetErrorString(err) + ")");
}

}  // namespace zeroshard::gpu::detail

#define ZS_CUDA_CHECK(call)                                                              \
  do {                                                                                   \
    const cudaError_t zs_cuda_err_ = (call);                                             \
    if (zs_cuda_err_ != cudaSuccess)                                                     \
      ::zeroshard::gpu::detail::throw_cuda_error(#call, zs_cuda_err_, __FILE__, __LINE__); \
  } while (0)

// After a <<<...>>> launch: launch errors (bad config, no kernel image for this GPU) surface here.
#define ZS_CUDA_CHECK_LAUNCH(kernel_name)                                                     \
  do {                                                                                        \
    const cudaError_t zs_cuda_err_ = cudaGetLastError();                                      \
    if (zs_cuda_err_ != cudaSuccess)                                                          \
      ::zeroshard::gpu::detail::throw_cuda_error("launch of " kernel_name, zs_cuda_err_,      \
                                                 __FILE__, __LINE__);                         \
  } while (0)
