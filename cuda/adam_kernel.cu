// Fused Adam / AdamW step on the GPU: one pass reads grad (fp32/bf16/fp16, divided by
// grad_scale, negated when maximizing), param, exp_avg, exp_avg_sq (and max_exp_avg_sq for
// AMSGrad) and writes the fp32 buffers plus the optional bf16/fp16 param copy. The arithmetic is the CPU kernels' (cpp/src/simd/kernels.inl), operation
// for operation with explicit round-to-nearest intrinsics so nvcc cannot contract it differently:
// given the same AdamScalars the two back ends agree bit for bit.
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

struct AdamPointers {
  float* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;  // nullptr unless amsgrad
  void* param_copy;       // nullptr: none
};

// `v_max` is read and written only when Amsgrad.
template <bool Amsgrad>
__device__ __forceinline__ void adam_update(float g, float& p, float& m, float& v, float& v_max,
                                            const AdamScalars& s) {
  g = __fmul_rn(g, s.grad_factor);
  if (s.weight_decay != 0.0f) {
    if (s.decoupled) p = __fmul_rn(p, s.decay_factor);
    else g = __fmaf_rn(p, s.weight_decay, g);
  }
  m = __fmaf_rn(s.one_minus_beta1, __fsub_rn(g, m), m);  // lerp(m, g, 1 - beta1)
  v = __fmaf_rn(s.one_minus_beta2, __fmul_rn(g, g), __fmul_rn(s.beta2, v));
  float v_used = v;
  if constexpr (Amsgrad) {
    v_max = v_max > v ? v_max : v;  // the CPU kernels' max (x86 maxps), NaN handling included
    v_used = v_max;
  }
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v_used), s.bias_correction2_sqrt), s.eps);
  p = __fsub_rn(p, __fmul_rn(s.step_size, __fdiv_rn(m, denom)));
}

template <DType G, bool Amsgrad, bool HasCopy, DType C, bool Vec, class Index>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(AdamPointers b, Index n, AdamScalars s, const int32_t* __restrict__ found_inf) {
  if (found_inf != nullptr && *found_inf != 0) return;  // overflow: leave every buffer untouched
  const Index full_chunks = n / kChunk;
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index c = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; c < full_chunks;
       c += stride) {
    const Index first = c * kChunk;
    float g[kChunk], p[kChunk], m[kChunk], v[kChunk], v_max[kChunk];
    load_chunk<G, Vec>(b.grad, first, g);
    load_chunk<DType::f32, Vec>(b.param, first, p);
    load_chunk<DType::f32, Vec>(b.exp_avg, first, m);
    load_chunk<DType::f32, Vec>(b.exp_avg_sq, first, v);
    if constexpr (Amsgrad) load_chunk<DType::f32, Vec>(b.max_exp_avg_sq, first, v_max);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) adam_update<Amsgrad>(g[k], p[k], m[k], v[k], v_max[k], s);
    store_chunk<DType::f32, Vec>(b.exp_avg, first, m);
    store_chunk<DType::f32, Vec>(b.exp_avg_sq, first, v);
    if constexpr (Amsgrad) store_chunk<DType::f32, Vec>(b.max_exp_avg_sq, first, v_max);
    store_chunk<DType::f32, Vec>(b.param, first, p);
    if constexpr (HasCopy) store_chunk<C, Vec>(b.param_copy, first, p);
  }
  const Index i = full_chunks * kChunk + threadIdx.x;  // the last n % kChunk elements
  if (blockIdx.x == 0 && i < n) {
    float p = b.param[i], m = b.exp_avg[i], v = b.exp_avg_sq[i], v_max = 0.0f;
    if constexpr (Amsgrad) v_max = b.max_exp_avg_sq[i];
    adam_update<Amsgrad>(load_one<G>(b.grad, i), p, m, v, v_max, s);
    b.exp_avg[i] = m;
    b.exp_avg_sq[i] = v;
    if constexpr (Amsgrad) b.max_exp_avg_sq[i] = v_max;
    b.param[i] = p;
    if constexpr (HasCopy) store_one<C>(b.param_copy, i, p);
  }
}

template <DType G, bool Amsgrad, bool HasCopy, DType C, bool Vec, class Index>
void launch_typed(const AdamPointers& b, int64_t n, const AdamScalars& s,
                  const int32_t* found_inf, cudaStream_t stream) {
  constexpr auto kernel = adam_kernel<G, Amsgrad, HasCopy, C, Vec, Index>;
  const LaunchShape shape = grid_stride_shape<kernel>(n / kChunk + 1);
  kernel<<<shape.blocks, shape.threads, 0, stream>>>(b, static_cast<Index>(n), s, found_inf);
  ZS_CUDA_CHECK_LAUNCH("adam_kernel");
}

// Runtime choices -> one of the instantiations: grad dtype, AMSGrad, copy (none/bf16/fp16),
// 16-byte vector access when every pointer allows it, 32- or 64-bit indices.
void launch_adam(const AdamPointers& b, DType grad_dtype, DType copy_dtype, int64_t n,
                 const AdamScalars& s, const int32_t* found_inf, cudaStream_t stream) {
  const bool has_copy = b.param_copy != nullptr;
  const bool vec = aligned16(b.param) && aligned16(b.grad) && aligned16(b.exp_avg) &&
                   aligned16(b.exp_avg_sq) && (!s.amsgrad || aligned16(b.max_exp_avg_sq)) &&
                   (!has_copy || aligned16(b.param_copy));
  const bool small = fits_int32(n, max_resident_threads(current_device()));
  dispatch_dtype(grad_dtype, [&](auto g) {
    dispatch_dtype(has_copy ? copy_dtype : DType::f32, [&](auto c) {
      dispatch_bool(vec, [&](auto v) {
        dispatch_bool(s.amsgrad, [&](auto ams) {
          constexpr DType G = decltype(g)::value;
          constexpr DType C = decltype(c)::value;
          constexpr bool kCopy = C != DType::f32;
          constexpr bool V = decltype(v)::value;
          constexpr bool A = decltype(ams)::value;
          if (small) launch_typed<G, A, kCopy, C, V, int32_t>(b, n, s, found_inf, stream);
          else launch_typed<G, A, kCopy, C, V, int64_t>(b, n, s, found_inf, stream);
        });
      });
    });
  });
}

}  // namespace
}  // namespace detail

void adam_step(float* param, const void* grad, DType grad_dtype, float* exp_avg,
               float* exp_avg_sq, float* max_exp_avg_sq, void* param_copy, DType copy_dtype,
               int64_t n, const AdamConfig& cfg, int32_t* found_inf, Stream stream) {
  validate(cfg);
  ZS_REQUIRE(n >= 0, "n must be >= 0, got " + std::to_string(n));
  const std::string null_but = " is null but n = " + std::to_string(n);
  ZS_REQUIRE(n == 0 || param != nullptr, "param" + null_but);
  ZS_REQUIRE(n == 0 || grad != nullptr, "grad" + null_but);
  ZS_REQUIRE(n == 0 || exp_avg != nullptr, "exp_avg" + null_but);
  ZS_REQUIRE(n == 0 || exp_avg_sq != nullptr, "exp_avg_sq" + null_but);
  require_amsgrad_buffer(cfg, max_exp_avg_sq, n);
  ZS_REQUIRE(param_copy == nullptr || copy_dtype != DType::f32,
             "param_copy must be bfloat16 or float16 (a float32 copy is the param itself)");
  ZS_REQUIRE(!cfg.check_finite || found_inf != nullptr,
             "found_inf is required when check_finite is set: pass a 1-element int32 device "
             "tensor, zeroed before the first check");
  if (n == 0) return;
  const auto s = adam_scalars(cfg);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  if (cfg.check_finite) detail::launch_check_finite(grad, grad_dtype, n, found_inf, cuda_stream);
  detail::launch_adam({param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_copy}, grad_dtype,
                      copy_dtype, n, s, found_inf, cuda_stream);
}

}  // namespace zeroshard::gpu
