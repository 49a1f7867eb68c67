// check_finite: ORs "some element is inf/NaN" into a device int32 flag without a host sync.
// The step kernels read that flag themselves and skip, so an overflowed step costs no round trip.
#include <cuda_runtime.h>

#include <string>

#include "chunk_access.cuh"
#include "cuda_check.hpp"
#include "finite_check.hpp"
#include "launch.cuh"
#include "zeroshard/error.hpp"
#include "zeroshard/gpu_kernels.hpp"

namespace zeroshard::gpu {
namespace detail {
namespace {

template <DType D, bool Vec, class Index>
__global__ void __launch_bounds__(kThreads)
    check_finite_kernel(const void* __restrict__ x, Index n, int32_t* __restrict__ found_inf) {
  const Index full_chunks = n / kChunk;
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  bool bad = false;
  for (Index c = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; c < full_chunks;
       c += stride) {
    float v[kChunk];
    load_chunk<D, Vec>(x, c * kChunk, v);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) bad |= !isfinite(v[k]);
  }
  const Index tail = full_chunks * kChunk + threadIdx.x;
  if (blockIdx.x == 0 && tail < n) bad |= !isfinite(load_one<D>(x, tail));
  // Racing writers all store 1, so a plain store is enough; 0 is never written.
  if (bad) *found_inf = 1;
}

template <DType D, bool Vec, class Index>
void launch_typed(const void* x, int64_t n, int32_t* found_inf, cudaStream_t stream) {
  constexpr auto kernel = check_finite_kernel<D, Vec, Index>;
  const LaunchShape shape = grid_stride_shape<kernel>(n / kChunk + 1);
  kernel<<<shape.blocks, shape.threads, 0, stream>>>(x, static_cast<Index>(n), found_inf);
  ZS_CUDA_CHECK_LAUNCH("check_finite_kernel");
}

}  // namespace

void launch_check_finite(const void* x, DType dtype, int64_t n, int32_t* found_inf,
                         cudaStream_t stream) {
  if (n == 0) return;
  const bool small = fits_int32(n, max_resident_threads(current_device()));
  dispatch_dtype(dtype, [&](auto d) {
    dispatch_bool(aligned16(x), [&](auto vec) {
      constexpr DType D = decltype(d)::value;
      constexpr bool V = decltype(vec)::value;
      if (small) launch_typed<D, V, int32_t>(x, n, found_inf, stream);
      else launch_typed<D, V, int64_t>(x, n, found_inf, stream);
    });
  });
}

}  // namespace detail

void check_finite(const void* x, DType dtype, int64_t n, int32_t* found_inf, Stream stream) {
  ZS_REQUIRE(n >= 0, "n must be >= 0, got " + std::to_string(n));
  ZS_REQUIRE(n == 0 || x != nullptr, "x is null but n = " + std::to_string(n));
  ZS_REQUIRE(found_inf != nullptr, "found_inf is required: pass a 1-element int32 device tensor");
  detail::launch_check_finite(x, dtype, n, found_inf, static_cast<cudaStream_t>(stream));
}

}  // namespace zeroshard::gpu
