// Fused SGD step (momentum, dampening, Nesterov, weight decay, maximize) on the GPU, with torch.optim.SGD
// semantics and the CPU kernels' arithmetic operation for operation (cpp/src/simd/kernels.inl),
// including the optional bf16/fp16 param copy written in the same pass.
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

struct SgdPointers {
  float* param;
  const void* grad;
  float* momentum_buffer;  // nullptr when momentum == 0
  void* param_copy;        // nullptr: none
};

// The derived scalars, computed by sgd_scalars() for the CPU and CUDA kernels alike.
using zeroshard::SgdScalars;

__device__ __forceinline__ void sgd_update(float g, float& p, float* buf, const SgdScalars& s) {
  float d = __fmul_rn(g, s.grad_factor);  // also negates the gradient when maximizing
  if (s.weight_decay != 0.0f) d = __fmaf_rn(p, s.weight_decay, d);
  if (s.momentum != 0.0f) {
    const float b = s.first_step
                        ? d
                        : __fmaf_rn(s.momentum, *buf, __fmul_rn(s.dampening_complement, d));
    *buf = b;
    d = s.nesterov ? __fmaf_rn(s.momentum, b, d) : b;
  }
  p = __fsub_rn(p, __fmul_rn(s.lr, d));
}

template <DType G, bool HasMomentum, bool HasCopy, DType C, bool Vec, class Index>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(SgdPointers b, Index n, SgdScalars s, const int32_t* __restrict__ found_inf) {
  if (found_inf != nullptr && *found_inf != 0) return;  // overflow: leave every buffer untouched
  const Index full_chunks = n / kChunk;
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index c = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; c < full_chunks;
       c += stride) {
    const Index first = c * kChunk;
    float g[kChunk], p[kChunk], buf[kChunk];
    load_chunk<G, Vec>(b.grad, first, g);
    load_chunk<DType::f32, Vec>(b.param, first, p);
    // The first step overwrites the buffer without reading it (it may hold garbage).
    if constexpr (HasMomentum) {
      if (!s.first_step) load_chunk<DType::f32, Vec>(b.momentum_buffer, first, buf);
    }
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      if constexpr (HasMomentum) sgd_update(g[k], p[k], &buf[k], s);
      else sgd_update(g[k], p[k], nullptr, s);
    }
    if constexpr (HasMomentum) store_chunk<DType::f32, Vec>(b.momentum_buffer, first, buf);
    store_chunk<DType::f32, Vec>(b.param, first, p);
    if constexpr (HasCopy) store_chunk<C, Vec>(b.param_copy, first, p);
  }
  const Index i = full_chunks * kChunk + threadIdx.x;  // the last n % kChunk elements
  if (blockIdx.x == 0 && i < n) {
    float p = b.param[i];
    sgd_update(load_one<G>(b.grad, i), p, HasMomentum ? b.momentum_buffer + i : nullptr, s);
    b.param[i] = p;
    if constexpr (HasCopy) store_one<C>(b.param_copy, i, p);
  }
}

template <DType G, bool HasMomentum, bool HasCopy, DType C, bool Vec, class Index>
void launch_typed(const SgdPointers& b, int64_t n, const SgdScalars& s,
                  const int32_t* found_inf, cudaStream_t stream) {
  constexpr auto kernel = sgd_kernel<G, HasMomentum, HasCopy, C, Vec, Index>;
  const LaunchShape shape = grid_stride_shape<kernel>(n / kChunk + 1);
  kernel<<<shape.blocks, shape.threads, 0, stream>>>(b, static_cast<Index>(n), s, found_inf);
  ZS_CUDA_CHECK_LAUNCH("sgd_kernel");
}

void launch_sgd(const SgdPointers& b, DType grad_dtype, DType copy_dtype, int64_t n,
                const SgdScalars& s, const int32_t* found_inf, cudaStream_t stream) {
  const bool has_copy = b.param_copy != nullptr;
  const bool has_momentum = s.momentum != 0.0f;
  const bool vec = aligned16(b.param) && aligned16(b.grad) &&
                   (!has_momentum || aligned16(b.momentum_buffer)) &&
                   (!has_copy || aligned16(b.param_copy));
  const bool small = fits_int32(n, max_resident_threads(current_device()));
  dispatch_dtype(grad_dtype, [&](auto g) {
    dispatch_dtype(has_copy ? copy_dtype : DType::f32, [&](auto c) {
      dispatch_bool(vec, [&](auto v) {
        dispatch_bool(has_momentum, [&](auto mom) {
          constexpr DType G = decltype(g)::value;
          constexpr DType C = decltype(c)::value;
          constexpr bool kCopy = C != DType::f32;
          constexpr bool V = decltype(v)::value;
          constexpr bool M = decltype(mom)::value;
          if (small) launch_typed<G, M, kCopy, C, V, int32_t>(b, n, s, found_inf, stream);
          else launch_typed<G, M, kCopy, C, V, int64_t>(b, n, s, found_inf, stream);
        });
      });
    });
  });
}

}  // namespace
}  // namespace detail

void sgd_step(float* param, const void* grad, DType grad_dtype, float* momentum_buffer,
              void* param_copy, DType copy_dtype, int64_t n, const SgdConfig& cfg,
              int32_t* found_inf, Stream stream) {
  validate(cfg);
  ZS_REQUIRE(n >= 0, "n must be >= 0, got " + std::to_string(n));
  const std::string null_but = " is null but n = " + std::to_string(n);
  ZS_REQUIRE(n == 0 || param != nullptr, "param" + null_but);
  ZS_REQUIRE(n == 0 || grad != nullptr, "grad" + null_but);
  ZS_REQUIRE(cfg.momentum == 0.0 || n == 0 || momentum_buffer != nullptr,
             "momentum_buffer is required when momentum != 0");
  ZS_REQUIRE(param_copy == nullptr || copy_dtype != DType::f32,
             "param_copy must be bfloat16 or float16 (a float32 copy is the param itself)");
  ZS_REQUIRE(!cfg.check_finite || found_inf != nullptr,
             "found_inf is required when check_finite is set: pass a 1-element int32 device "
             "tensor, zeroed before the first check");
  if (n == 0) return;
  const SgdScalars s = sgd_scalars(cfg);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  if (cfg.check_finite) detail::launch_check_finite(grad, grad_dtype, n, found_inf, cuda_stream);
  detail::launch_sgd({param, grad, momentum_buffer, param_copy}, grad_dtype, copy_dtype, n, s,
                     found_inf, cuda_stream);
}

}  // namespace zeroshard::gpu
