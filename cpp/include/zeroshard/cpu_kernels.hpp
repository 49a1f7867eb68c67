// The CPU kernels over flat buffers: fused Adam/AdamW and SGD steps, squared L2 norm,
// finiteness check, in-place scale and casts. Each picks the SIMD path chosen at run time
// (cpu_runtime.hpp) and splits the work over the core's thread pool.
//
// Pointers may be unaligned; sizes may be 0. Element types: params, moments and momentum are
// float32; gradients and norms accept float32/bfloat16/float16; the optional `param_copy` is a
// bfloat16 or float16 copy of the updated params written in the same pass (nullptr: none).
#pragma once

#include <cstdint>

#include "zeroshard/dtype.hpp"
#include "zeroshard/optim_config.hpp"

namespace zeroshard::cpu {

// Returns true when the step was skipped because the gradient held inf/NaN (only checked when
// cfg.check_finite); then nothing was written. `max_exp_avg_sq` (float32, zeros before the
// first step) is required when cfg.amsgrad and must be nullptr otherwise.
bool adam_step(float* param, const void* grad, DType grad_dtype, float* exp_avg,
               float* exp_avg_sq, float* max_exp_avg_sq, void* param_copy, DType copy_dtype,
               int64_t n, const AdamConfig& cfg);

// momentum_buffer may be nullptr only when cfg.momentum == 0.
bool sgd_step(float* param, const void* grad, DType grad_dtype, float* momentum_buffer,
              void* param_copy, DType copy_dtype, int64_t n, const SgdConfig& cfg);

struct NormResult {
  float sum_sq = 0.0f;     // sum of squares, accumulated in double, rounded once
  bool nonfinite = false;  // some element was inf or NaN
};

// Deterministic for a given n: blocks are fixed-size, independent of the thread count.
NormResult l2_norm_sq(const void* x, DType dtype, int64_t n);
bool all_finite(const void* x, DType dtype, int64_t n);
void scale(void* x, DType dtype, int64_t n, float factor);
// Round-to-nearest-even on narrowing; NaN stays NaN, overflow becomes inf.
void cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n);

// [Note: block quantization] ZeRO++'s quantized collectives send int8 or int4 values with one
// fp32 scale per block of `block` elements (the last block may be shorter). Symmetric, per
// block: scale = max|x| / qmax (qmax 127 for 8 bits, 7 for 4), q = round-half-even(x / scale)
// clamped to [-qmax, qmax], each operation rounded once in fp32, so every back end (scalar,
// AVX2, AVX-512, CUDA) gives the same bits. A block holding inf/NaN gets scale NaN and q = 0 (it
// dequantizes to NaN, which overflow checks see); an all-zero block, or one whose scale
// underflows to 0, gets scale 0. 8 bits: one int8 per element (n bytes). 4 bits: two per byte,
// element 2j in the low nibble of byte j, two's complement (ceil(n / 2) bytes); block must be
// even. block is at most kMaxQuantBlock (2048). Dequantize: x = q * scale, one rounding.
int64_t quantized_bytes(int64_t n, int bits);
int64_t quantized_blocks(int64_t n, int64_t block);
void quantize(const void* x, DType dtype, int64_t n, int bits, int64_t block, int8_t* q,
              float* scales);
void dequantize(const int8_t* q, const float* scales, int64_t n, int bits, int64_t block,
                void* out, DType out_dtype);
// acc[i] += q[i] * scale (fp32): the reduction of a quantized reduce-scatter, one source at a
// time in the caller's order, so the sum is the same on every back end.
void dequantize_add(const int8_t* q, const float* scales, int64_t n, int bits, int64_t block,
                    float* acc);

}  // namespace zeroshard::cpu
