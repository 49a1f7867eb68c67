// In-place scale x *= factor on the GPU, computed in fp32 and rounded back (RNE) to x's type.
#include <cuda_runtime.h>

#include <string>

#include "chunk_access.cuh"
#include "cuda_check.hpp"
#include "launch.cuh"
#include "zeroshard/error.hpp"
#include "zeroshard/gpu_kernels.hpp"

namespace zeroshard::gpu {
namespace detail {
namespace {

template <DType D, bool Vec, class Index>
__global__ void __launch_bounds__(kThreads)
    scale_kernel(void* __restrict__ x, Index n, float factor) {
  const Index full_chunks = n / kChunk;
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index c = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; c < full_chunks;
       c += stride) {
    float v[kChunk];
    load_chunk<D, Vec>(x, c * kChunk, v);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) v[k] = __fmul_rn(v[k], factor);
    store_chunk<D, Vec>(x, c * kChunk, v);
  }
  const Index i = full_chunks * kChunk + threadIdx.x;
  if (blockIdx.x == 0 && i < n) store_one<D>(x, i, __fmul_rn(load_one<D>(x, i), factor));
}

template <DType D, bool Vec, class Index>
void launch_typed(void* x, int64_t n, float factor, cudaStream_t stream) {
  constexpr auto kernel = scale_kernel<D, Vec, Index>;
  const LaunchShape shape = grid_stride_shape<kernel>(n / kChunk + 1);
  kernel<<<shape.blocks, shape.threads, 0, stream>>>(x, static_cast<Index>(n), factor);
  ZS_CUDA_CHECK_LAUNCH("scale_kernel");
}

}  // namespace
}  // namespace detail

void scale(void* x, DType dtype, int64_t n, float factor, Stream stream) {
  using namespace detail;
  ZS_REQUIRE(n >= 0, "n must be >= 0, got " + std::to_string(n));
  ZS_REQUIRE(n == 0 || x != nullptr, "x is null but n = " + std::to_string(n));
  if (n == 0) return;
  const bool small = fits_int32(n, max_resident_threads(current_device()));
  dispatch_dtype(dtype, [&](auto d) {
    dispatch_bool(aligned16(x), [&](auto vec) {
      constexpr DType D = decltype(d)::value;
      constexpr bool V = decltype(vec)::value;
      if (small) launch_typed<D, V, int32_t>(x, n, factor, static_cast<cudaStream_t>(stream));
      else launch_typed<D, V, int64_t>(x, n, factor, static_cast<cudaStream_t>(stream));
    });
  });
}

}  // namespace zeroshard::gpu
