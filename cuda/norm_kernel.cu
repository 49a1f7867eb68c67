// Deterministic squared L2 norm in two passes. Pass 1 runs a fixed grid (kNormBlocks x
// kThreads, whatever the GPU): each thread walks its chunks in a fixed order, summing each
// chunk's squares in fp32 and the chunk sums in double; blocks reduce in a fixed tree and write
// one double each. Pass 2 (one block) reduces those partials in a fixed order. The result depends
// only on n and the data -- not on the GPU, the alignment or the run.
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

constexpr int kNormBlocks = 1024;

struct NormWorkspace {
  double* partial;    // [kNormBlocks]
  int32_t* nonfinite; // [kNormBlocks]
};

NormWorkspace carve(void* workspace) {
  auto* partial = static_cast<double*>(workspace);
  return {partial, reinterpret_cast<int32_t*>(partial + kNormBlocks)};
}

// Fixed-shape tree sum over the block's kThreads values; returns the total in thread 0.
__device__ double block_sum(double value) {
  __shared__ double lanes[kThreads];
  lanes[threadIdx.x] = value;
  __syncthreads();
#pragma unroll
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) lanes[threadIdx.x] += lanes[threadIdx.x + width];
    __syncthreads();
  }
  return lanes[0];
}

template <DType D, bool Vec, class Index>
__global__ void __launch_bounds__(kThreads)
    norm_partial_kernel(const void* __restrict__ x, Index n, NormWorkspace ws) {
  const Index full_chunks = n / kChunk;
  const Index stride = static_cast<Index>(kNormBlocks) * kThreads;
  double sum = 0.0;
  bool bad = false;
  for (Index c = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; c < full_chunks;
       c += stride) {
    float v[kChunk];
    load_chunk<D, Vec>(x, c * kChunk, v);
    float chunk_sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      chunk_sum = __fmaf_rn(v[k], v[k], chunk_sum);
      bad |= !isfinite(v[k]);
    }
    sum += static_cast<double>(chunk_sum);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {  // the last n % kChunk elements, in order
    float chunk_sum = 0.0f;
    for (Index i = full_chunks * kChunk; i < n; ++i) {
      const float v = load_one<D>(x, i);
      chunk_sum = __fmaf_rn(v, v, chunk_sum);
      bad |= !isfinite(v);
    }
    sum += static_cast<double>(chunk_sum);
  }
  const int block_bad = __syncthreads_or(bad);
  const double total = block_sum(sum);
  if (threadIdx.x == 0) {
    ws.partial[blockIdx.x] = total;
    ws.nonfinite[blockIdx.x] = block_bad;
  }
}

__global__ void __launch_bounds__(kThreads)
    norm_final_kernel(NormWorkspace ws, float* __restrict__ out, int32_t* __restrict__ nonfinite) {
  double sum = 0.0;
  int bad = 0;
  for (int b = threadIdx.x; b < kNormBlocks; b += kThreads) {
    sum += ws.partial[b];
    bad |= ws.nonfinite[b];
  }
  const int any_bad = __syncthreads_or(bad);
  const double total = block_sum(sum);
  if (threadIdx.x == 0) {
    *out = static_cast<float>(total);
    if (any_bad && nonfinite != nullptr) *nonfinite = 1;  // never reset to 0
  }
}

template <DType D, bool Vec, class Index>
void launch_partial(const void* x, int64_t n, NormWorkspace ws, cudaStream_t stream) {
  norm_partial_kernel<D, Vec, Index><<<kNormBlocks, kThreads, 0, stream>>>(
      x, static_cast<Index>(n), ws);
  ZS_CUDA_CHECK_LAUNCH("norm_partial_kernel");
}

}  // namespace
}  // namespace detail

int64_t l2_norm_workspace_bytes() {
  return detail::kNormBlocks * static_cast<int64_t>(sizeof(double) + sizeof(int32_t));
}

void l2_norm_sq(const void* x, DType dtype, int64_t n, float* out, int32_t* nonfinite,
                void* workspace, Stream stream) {
  using namespace detail;
  ZS_REQUIRE(n >= 0, "n must be >= 0, got " + std::to_string(n));
  ZS_REQUIRE(n == 0 || x != nullptr, "x is null but n = " + std::to_string(n));
  ZS_REQUIRE(out != nullptr, "out is null: pass a 1-element float32 device tensor");
  ZS_REQUIRE(workspace != nullptr && (reinterpret_cast<uintptr_t>(workspace) & 7u) == 0,
             "workspace must be 8-byte aligned device memory of l2_norm_workspace_bytes() bytes");
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const NormWorkspace ws = carve(workspace);
  // The fixed grid's stride is kNormBlocks * kThreads chunks; 32-bit indices when that fits.
  const bool small = fits_int32(n, static_cast<int64_t>(kNormBlocks) * kThreads);
  dispatch_dtype(dtype, [&](auto d) {
    dispatch_bool(aligned16(x), [&](auto vec) {
      constexpr DType D = decltype(d)::value;
      constexpr bool V = decltype(vec)::value;
      if (small) launch_partial<D, V, int32_t>(x, n, ws, cuda_stream);
      else launch_partial<D, V, int64_t>(x, n, ws, cuda_stream);
    });
  });
  norm_final_kernel<<<1, kThreads, 0, cuda_stream>>>(ws, out, nonfinite);
  ZS_CUDA_CHECK_LAUNCH("norm_final_kernel");
}

}  // namespace zeroshard::gpu
