// The table of span kernels one instruction-set path provides. cpu_kernels.cpp picks a table
// at run time and splits work over threads; each entry works on [begin, end) of its buffers.
#pragma once

#include <cstdint>

#include "zeroshard/dtype.hpp"
#include "zeroshard/optim_config.hpp"

namespace zeroshard::cpu {

struct AdamBuffers {
  float* param;
  const void* grad;
  DType grad_dtype;
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;  // nullptr unless amsgrad
  void* param_copy;  // nullptr: none
  DType copy_dtype;
  // Write param_copy with non-temporal stores: set for copies too big to stay in cache.
  bool stream_copy = false;
};

struct SgdBuffers {
  float* param;
  const void* grad;
  DType grad_dtype;
  float* momentum_buffer;  // nullptr when momentum == 0
  void* param_copy;
  DType copy_dtype;
};

struct KernelTable {
  void (*adam)(const AdamBuffers&, const AdamScalars&, int64_t begin, int64_t end);
  void (*sgd)(const SgdBuffers&, const SgdScalars&, int64_t begin, int64_t end);
  // Sum of squares of [begin, end) in double; *nonfinite set when an element is inf/NaN.
  double (*sum_sq)(const void* x, DType dtype, int64_t begin, int64_t end, bool* nonfinite);
  bool (*all_finite)(const void* x, DType dtype, int64_t begin, int64_t end);
  void (*scale)(void* x, DType dtype, int64_t begin, int64_t end, float factor);
  void (*cast)(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t begin,
               int64_t end);
  // Block quantization (cpu_kernels.hpp's [Note: block quantization]) of the blocks
  // [blk_begin, blk_end) of an n-element tensor cut into blocks of `block` elements.
  void (*quantize)(const void* x, DType dtype, int64_t n, int bits, int64_t block, int8_t* q,
                   float* scales, int64_t blk_begin, int64_t blk_end);
  // out = q * scale in out_dtype, or with accumulate (out_dtype f32) out += q * scale.
  void (*dequantize)(const int8_t* q, const float* scales, int64_t n, int bits, int64_t block,
                     void* out, DType out_dtype, bool accumulate, int64_t blk_begin,
                     int64_t blk_end);
};

// The largest quantization block: a block's int8 values are staged on the stack.
constexpr int64_t kMaxQuantBlock = 2048;

const KernelTable& scalar_kernels();
const KernelTable* avx2_kernels();    // nullptr when the build has no AVX2 path
const KernelTable* avx512_kernels();  // nullptr when the build has no AVX-512 path

}  // namespace zeroshard::cpu
