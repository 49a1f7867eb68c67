// dst = src converted between fp32, bf16 and fp16 on the GPU (round-to-nearest-even when
// narrowing, overflow to inf, NaN stays NaN). Same-type "casts" are a device-to-device copy.
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

template <DType S, DType D, bool Vec, class Index>
__global__ void __launch_bounds__(kThreads)
    cast_kernel(const void* __restrict__ src, void* __restrict__ dst, Index n) {
  const Index full_chunks = n / kChunk;
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index c = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; c < full_chunks;
       c += stride) {
    float v[kChunk];
    load_chunk<S, Vec>(src, c * kChunk, v);
    store_chunk<D, Vec>(dst, c * kChunk, v);
  }
  const Index i = full_chunks * kChunk + threadIdx.x;
  if (blockIdx.x == 0 && i < n) store_one<D>(dst, i, load_one<S>(src, i));
}

template <DType S, DType D, bool Vec, class Index>
void launch_typed(const void* src, void* dst, int64_t n, cudaStream_t stream) {
  constexpr auto kernel = cast_kernel<S, D, Vec, Index>;
  const LaunchShape shape = grid_stride_shape<kernel>(n / kChunk + 1);
  kernel<<<shape.blocks, shape.threads, 0, stream>>>(src, dst, static_cast<Index>(n));
  ZS_CUDA_CHECK_LAUNCH("cast_kernel");
}

}  // namespace
}  // namespace detail

void cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n,
          Stream stream) {
  using namespace detail;
  ZS_REQUIRE(n >= 0, "n must be >= 0, got " + std::to_string(n));
  ZS_REQUIRE(n == 0 || src != nullptr, "src is null but n = " + std::to_string(n));
  ZS_REQUIRE(n == 0 || dst != nullptr, "dst is null but n = " + std::to_string(n));
  if (n == 0) return;
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  if (src_dtype == dst_dtype) {
    if (src != dst) {
      ZS_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * dtype_size(src_dtype),
                                    cudaMemcpyDeviceToDevice, cuda_stream));
    }
    return;
  }
  const bool small = fits_int32(n, max_resident_threads(current_device()));
  const bool vec = aligned16(src) && aligned16(dst);
  dispatch_dtype(src_dtype, [&](auto s) {
    dispatch_dtype(dst_dtype, [&](auto d) {
      constexpr DType S = decltype(s)::value;
      constexpr DType D = decltype(d)::value;
      if constexpr (S != D) {
        dispatch_bool(vec, [&](auto v) {
          constexpr bool V = decltype(v)::value;
          if (small) launch_typed<S, D, V, int32_t>(src, dst, n, cuda_stream);
          else launch_typed<S, D, V, int64_t>(src, dst, n, cuda_stream);
        });
      }
    });
  });
}

}  // namespace zeroshard::gpu
