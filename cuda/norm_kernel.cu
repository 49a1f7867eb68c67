// Deterministic squared L2 norm in two passes.
//
// [Note: norm determinism] Pass 1 runs G = min(sm_count * kBlocksPerSm, chunks / kThreads
// rounded up) blocks of kThreads: one wave on every GPU, sized from the SM count (queried once
// per device) and n alone. Logical thread t = block * kThreads + thread owns chunks t, t + S,
// t + 2S, ... (S = G * kThreads chunks of kChunk elements). It sums each chunk's squares in fp32
// (in element order, fused multiply-add) and adds the chunk sums to a double in chunk order;
// block 0's thread 0 then adds the last n % kChunk elements as one more chunk. Each block reduces
// its threads in a fixed tree and writes one double; pass 2 (one block) reduces the G partials
// in a fixed order and rounds to fp32 once.
// Guarantee: for the same values and n, the same bits on every run, stream and base-pointer
// alignment (the vector and scalar loads feed the same sums) on every GPU with the same SM
// count -- the same device type, or the same MIG profile. GPUs with another SM count group the
// additions differently and agree to rounding (relative ~1e-7), not bit for bit.
// Speed: each thread issues kLoadsInFlight independent 16-byte loads before it adds any of
// them (the additions keep their order), so one wave keeps enough bytes in flight to read at
// close to copy bandwidth.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "chunk_access.cuh"
#include "cuda_check.hpp"
#include "launch.cuh"
#include "zeroshard/error.hpp"
#include "zeroshard/gpu_kernels.hpp"

namespace zeroshard::gpu {
namespace detail {
namespace {

constexpr int kBlocksPerSm = 4;        // 1024 threads per SM; at most 64 registers each
constexpr int kMaxNormBlocks = 4096;   // workspace partials: SM counts up to 1024
constexpr int kLoadsInFlight = 8;      // 16-byte loads issued per thread before the adds

// Chunks per unrolled step: kLoadsInFlight 16-byte loads (a 16-bit chunk is one, fp32 two).
template <DType D>
constexpr int chunks_per_step() {
  return kLoadsInFlight * 16 / (kChunk * static_cast<int>(sizeof(typename Element<D>::Storage)));
}

struct NormWorkspace {
  double* partial;    // [kMaxNormBlocks]
  int32_t* nonfinite; // [kMaxNormBlocks]
};

NormWorkspace carve(void* workspace) {
  auto* partial = static_cast<double*>(workspace);
  return {partial, reinterpret_cast<int32_t*>(partial + kMaxNormBlocks)};
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

// One chunk's squares in fp32, element order; `bad` collects inf/NaN.
__device__ __forceinline__ float chunk_squares(const float (&v)[kChunk], bool& bad) {
  float chunk_sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kChunk; ++k) {
    chunk_sum = __fmaf_rn(v[k], v[k], chunk_sum);
    bad |= !isfinite(v[k]);
  }
  return chunk_sum;
}

template <DType D, bool Vec, class Index>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    norm_partial_kernel(const void* __restrict__ x, Index n, NormWorkspace ws) {
  constexpr int kUnroll = chunks_per_step<D>();
  const Index full_chunks = n / kChunk;
  const Index stride = static_cast<Index>(gridDim.x) * kThreads;
  Index c = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x;
  double sum = 0.0;
  bool bad = false;
  // Unrolled: all kUnroll loads first, then the adds in chunk order (same order as one by one).
  for (; c + (kUnroll - 1) * stride < full_chunks; c += kUnroll * stride) {
    float v[kUnroll][kChunk];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_chunk<D, Vec>(x, (c + u * stride) * kChunk, v[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) sum += static_cast<double>(chunk_squares(v[u], bad));
  }
  for (; c < full_chunks; c += stride) {
    float v[kChunk];
    load_chunk<D, Vec>(x, c * kChunk, v);
    sum += static_cast<double>(chunk_squares(v, bad));
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
    norm_final_kernel(NormWorkspace ws, int blocks, float* __restrict__ out,
                      int32_t* __restrict__ nonfinite) {
  double sum = 0.0;
  int bad = 0;
  for (int b = threadIdx.x; b < blocks; b += kThreads) {
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

// Pass 1's grid: one wave of kBlocksPerSm blocks per SM, fewer when n is small. A function of
// the SM count and n only (never of occupancy or load), which is what keeps the bits fixed.
int norm_blocks(int64_t n, int sms) {
  const int64_t chunk_rows = (n / kChunk + kThreads - 1) / kThreads;
  const int64_t wave = std::min<int64_t>(static_cast<int64_t>(sms) * kBlocksPerSm, kMaxNormBlocks);
  return static_cast<int>(std::max<int64_t>(1, std::min(chunk_rows, wave)));
}

template <DType D, bool Vec, class Index>
void launch_partial(const void* x, int64_t n, int blocks, NormWorkspace ws, cudaStream_t stream) {
  norm_partial_kernel<D, Vec, Index><<<blocks, kThreads, 0, stream>>>(x, static_cast<Index>(n), ws);
  ZS_CUDA_CHECK_LAUNCH("norm_partial_kernel");
}

}  // namespace
}  // namespace detail

int64_t l2_norm_workspace_bytes() {
  return detail::kMaxNormBlocks * static_cast<int64_t>(sizeof(double) + sizeof(int32_t));
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
  const int blocks = norm_blocks(n, sm_count(current_device()));
  // Chunk indices run up to one unrolled step (at most 8 strides) past the end; 32-bit indices
  // when that fits.
  const bool small = fits_int32(n, static_cast<int64_t>(blocks) * kThreads * 8);
  dispatch_dtype(dtype, [&](auto d) {
    dispatch_bool(aligned16(x), [&](auto vec) {
      constexpr DType D = decltype(d)::value;
      constexpr bool V = decltype(vec)::value;
      static_assert(chunks_per_step<D>() <= 8, "widen the int32 bound above");
      if (small) launch_partial<D, V, int32_t>(x, n, blocks, ws, cuda_stream);
      else launch_partial<D, V, int64_t>(x, n, blocks, ws, cuda_stream);
    });
  });
  norm_final_kernel<<<1, kThreads, 0, cuda_stream>>>(ws, blocks, out, nonfinite);
  ZS_CUDA_CHECK_LAUNCH("norm_final_kernel");
}

}  // namespace zeroshard::gpu
