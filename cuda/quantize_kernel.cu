// Block quantization on the GPU, bit for bit the CPU kernels' ([Note: block quantization] in
// cpu_kernels.hpp): one CUDA block per quantization block finds max|x| (as the largest bit
// pattern of |x|, which orders non-negative floats and flags inf/NaN at once), then every
// element is divided by the scale and rounded half to even with explicitly rounded intrinsics
// (no FMA contraction can change a bit). Dequantize is a grid-stride loop, one element a step.
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

constexpr int64_t kMaxBlock = 2048;  // as the CPU's kMaxQuantBlock
constexpr uint32_t kQuietNan = 0x7fc00000u;  // the CPU's __builtin_nanf("")

__device__ __forceinline__ int8_t quantize_one(float x, float scale, float qmax) {
  if (!(scale > 0.0f)) return 0;
  const float q = fminf(fmaxf(rintf(__fdiv_rn(x, scale)), -qmax), qmax);
  return static_cast<int8_t>(static_cast<int>(q));
}

template <DType D>
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const void* __restrict__ x, int64_t n, int bits, int64_t block,
                    int8_t* __restrict__ q, float* __restrict__ scales) {
  __shared__ uint32_t warp_max[kThreads / 32];
  __shared__ float block_scale;
  const int64_t blk = blockIdx.x;
  const int64_t begin = blk * block;
  const int64_t len = min(block, n - begin);
  const int64_t pairs = (len + 1) / 2;  // each step takes elements 2p and 2p + 1
  uint32_t m = 0;
  for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
    m = max(m, __float_as_uint(load_one<D>(x, begin + 2 * p)) & 0x7fffffffu);
    if (2 * p + 1 < len) m = max(m, __float_as_uint(load_one<D>(x, begin + 2 * p + 1)) & 0x7fffffffu);
  }
  for (int offset = 16; offset > 0; offset /= 2) m = max(m, __shfl_down_sync(0xffffffffu, m, offset));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  const float qmax = bits == 8 ? 127.0f : 7.0f;
  if (threadIdx.x == 0) {
    uint32_t all = 0;
    for (int w = 0; w < kThreads / 32; ++w) all = max(all, warp_max[w]);
    // inf or NaN somewhere: scale NaN, values 0 (the CPU's finite check says the same)
    block_scale = all >= 0x7f800000u ? __uint_as_float(kQuietNan)
                                     : __fdiv_rn(__uint_as_float(all), qmax);
    scales[blk] = block_scale;
  }
  __syncthreads();
  const float scale = block_scale;
  for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int8_t lo = quantize_one(load_one<D>(x, begin + 2 * p), scale, qmax);
    const int8_t hi = 2 * p + 1 < len ? quantize_one(load_one<D>(x, begin + 2 * p + 1), scale, qmax) : 0;
    if (bits == 8) {
      q[begin + 2 * p] = lo;
      if (2 * p + 1 < len) q[begin + 2 * p + 1] = hi;
    } else {
      reinterpret_cast<uint8_t*>(q)[begin / 2 + p] =
          static_cast<uint8_t>((static_cast<uint8_t>(lo) & 0x0f) | ((static_cast<uint8_t>(hi) & 0x0f) << 4));
    }
  }
}

template <DType D, bool Accumulate>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const int8_t* __restrict__ q, const float* __restrict__ scales, int64_t n,
                      int bits, int64_t block, void* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    int value;
    if (bits == 8) {
      value = q[i];
    } else {
      const int nibble = (reinterpret_cast<const uint8_t*>(q)[i / 2] >> (4 * (i & 1))) & 0x0f;
      value = nibble >= 8 ? nibble - 16 : nibble;
    }
    const float v = __fmul_rn(static_cast<float>(value), scales[i / block]);
    if constexpr (Accumulate) {
      float* acc = static_cast<float*>(out) + i;
      *acc = __fadd_rn(*acc, v);
    } else {
      store_one<D>(out, i, v);
    }
  }
}

void require_shape(int64_t n, int bits, int64_t block) {
  ZS_REQUIRE(n >= 0, "n must be >= 0");
  ZS_REQUIRE(bits == 8 || bits == 4, "bits must be 8 or 4, got " + std::to_string(bits));
  ZS_REQUIRE(block >= 1 && block <= kMaxBlock,
             "block must be 1.." + std::to_string(kMaxBlock) + " elements, got " + std::to_string(block));
  ZS_REQUIRE(bits == 8 || block % 2 == 0,
             "4-bit blocks must hold an even number of elements (two per byte), got " +
                 std::to_string(block));
}

}  // namespace
}  // namespace detail

void quantize(const void* x, DType dtype, int64_t n, int bits, int64_t block, int8_t* q,
              float* scales, Stream stream) {
  using namespace detail;
  require_shape(n, bits, block);
  ZS_REQUIRE(n == 0 || (x != nullptr && q != nullptr && scales != nullptr),
             "x, q and scales must not be null when n > 0");
  if (n == 0) return;
  const int64_t blocks = (n + block - 1) / block;
  ZS_REQUIRE(blocks <= 0x7fffffff, "too many quantization blocks for one launch");
  dispatch_dtype(dtype, [&](auto d) {
    constexpr DType D = decltype(d)::value;
    quantize_kernel<D><<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        x, n, bits, block, q, scales);
    ZS_CUDA_CHECK_LAUNCH("quantize_kernel");
  });
}

void dequantize(const int8_t* q, const float* scales, int64_t n, int bits, int64_t block,
                void* out, DType out_dtype, bool accumulate, Stream stream) {
  using namespace detail;
  require_shape(n, bits, block);
  ZS_REQUIRE(!accumulate || out_dtype == DType::f32, "dequantize_add accumulates into float32");
  ZS_REQUIRE(n == 0 || (q != nullptr && scales != nullptr && out != nullptr),
             "q, scales and out must not be null when n > 0");
  if (n == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (accumulate) {
    constexpr auto kernel = dequantize_kernel<DType::f32, true>;
    const LaunchShape shape = grid_stride_shape<kernel>(n);
    kernel<<<shape.blocks, shape.threads, 0, s>>>(q, scales, n, bits, block, out);
    ZS_CUDA_CHECK_LAUNCH("dequantize_kernel");
    return;
  }
  dispatch_dtype(out_dtype, [&](auto d) {
    constexpr auto kernel = dequantize_kernel<decltype(d)::value, false>;
    const LaunchShape shape = grid_stride_shape<kernel>(n);
    kernel<<<shape.blocks, shape.threads, 0, s>>>(q, scales, n, bits, block, out);
    ZS_CUDA_CHECK_LAUNCH("dequantize_kernel");
  });
}

}  // namespace zeroshard::gpu
