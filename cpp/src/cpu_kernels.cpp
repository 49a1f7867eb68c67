// Entry points of the CPU kernels: validate once, pick the SIMD table, split over threads.
#include "zeroshard/cpu_kernels.hpp"

#include <algorithm>
#include <string>
#include <vector>

#include "simd/kernel_table.hpp"
#include "zeroshard/cpu_runtime.hpp"
#include "zeroshard/error.hpp"

namespace zeroshard::cpu {
namespace {

// Elementwise spans per thread chunk: big enough to amortise the pool's wake-up.
constexpr int64_t kGrain = 1 << 15;
// Copies of at least this many elements are streamed past the cache (see adam_span_typed):
// 2 MiB of bf16, past what a core's L2 holds; a smaller copy may still be read from cache.
constexpr int64_t kStreamCopyMin = 1 << 20;
// Norm blocks are fixed so the summation order (and so the result) does not depend on threads.
constexpr int64_t kNormBlock = 1 << 12;

const KernelTable& table() {
  switch (simd_level()) {
    case SimdLevel::avx512: return *avx512_kernels();
    case SimdLevel::avx2: return *avx2_kernels();
    case SimdLevel::scalar: break;
  }
  return scalar_kernels();
}

void require_buffer(const void* p, int64_t n, const char* name) {
  ZS_REQUIRE(n == 0 || p != nullptr, std::string(name) + " is null but n = " + std::to_string(n));
}

void require_copy_dtype(const void* copy, DType dtype) {
  ZS_REQUIRE(copy == nullptr || dtype != DType::f32,
             "param_copy must be bfloat16 or float16 (a float32 copy is the param itself)");
}

// A 16-bit copy is streamed when it is big and its elements are 2-byte aligned (the span
// kernel then reaches vector alignment after a few single lanes).
bool streamable(const void* copy, int64_t n) {
  return copy != nullptr && n >= kStreamCopyMin && reinterpret_cast<uintptr_t>(copy) % 2 == 0;
}

}  // namespace

bool all_finite(const void* x, DType dtype, int64_t n) {
  ZS_REQUIRE(n >= 0, "n must be >= 0");
  require_buffer(x, n, "x");
  const KernelTable& k = table();
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<char> finite(static_cast<std::size_t>(chunks), 1);
  parallel_for(chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      finite[c] = k.all_finite(x, dtype, c * kGrain, std::min(n, (c + 1) * kGrain)) ? 1 : 0;
    }
  });
  for (char f : finite)
    if (!f) return false;
  return true;
}

bool adam_step(float* param, const void* grad, DType grad_dtype, float* exp_avg,
               float* exp_avg_sq, float* max_exp_avg_sq, void* param_copy, DType copy_dtype,
               int64_t n, const AdamConfig& cfg) {
  validate(cfg);
  ZS_REQUIRE(n >= 0, "n must be >= 0");
  require_buffer(param, n, "param");
  require_buffer(grad, n, "grad");
  require_buffer(exp_avg, n, "exp_avg");
  require_buffer(exp_avg_sq, n, "exp_avg_sq");
  require_amsgrad_buffer(cfg, max_exp_avg_sq, n);
  require_copy_dtype(param_copy, copy_dtype);
  if (cfg.check_finite && !all_finite(grad, grad_dtype, n)) return true;
  const AdamBuffers b{param, grad, grad_dtype, exp_avg, exp_avg_sq, max_exp_avg_sq, param_copy,
                      copy_dtype, streamable(param_copy, n)};
  const AdamScalars s = adam_scalars(cfg);
  const KernelTable& k = table();
  parallel_for(n, kGrain, [&](int64_t begin, int64_t end) { k.adam(b, s, begin, end); });
  return false;
}

bool sgd_step(float* param, const void* grad, DType grad_dtype, float* momentum_buffer,
              void* param_copy, DType copy_dtype, int64_t n, const SgdConfig& cfg) {
  validate(cfg);
  ZS_REQUIRE(n >= 0, "n must be >= 0");
  require_buffer(param, n, "param");
  require_buffer(grad, n, "grad");
  ZS_REQUIRE(cfg.momentum == 0.0 || n == 0 || momentum_buffer != nullptr,
             "momentum_buffer is required when momentum != 0");
  require_copy_dtype(param_copy, copy_dtype);
  if (cfg.check_finite && !all_finite(grad, grad_dtype, n)) return true;
  const SgdBuffers b{param, grad, grad_dtype, momentum_buffer, param_copy, copy_dtype};
  const SgdScalars s = sgd_scalars(cfg);
  const KernelTable& k = table();
  parallel_for(n, kGrain, [&](int64_t begin, int64_t end) { k.sgd(b, s, begin, end); });
  return false;
}

NormResult l2_norm_sq(const void* x, DType dtype, int64_t n) {
  ZS_REQUIRE(n >= 0, "n must be >= 0");
  require_buffer(x, n, "x");
  const KernelTable& k = table();
  const int64_t blocks = (n + kNormBlock - 1) / kNormBlock;
  std::vector<double> partial(static_cast<std::size_t>(blocks), 0.0);
  std::vector<char> nonfinite(static_cast<std::size_t>(blocks), 0);
  parallel_for(blocks, kGrain / kNormBlock, [&](int64_t bb, int64_t be) {
    for (int64_t blk = bb; blk < be; ++blk) {
      bool bad = false;
      partial[blk] = k.sum_sq(x, dtype, blk * kNormBlock, std::min(n, (blk + 1) * kNormBlock), &bad);
      nonfinite[blk] = bad ? 1 : 0;
    }
  });
  NormResult r;
  double total = 0.0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    total += partial[blk];
    if (nonfinite[blk]) r.nonfinite = true;
  }
  r.sum_sq = static_cast<float>(total);
  return r;
}

void scale(void* x, DType dtype, int64_t n, float factor) {
  ZS_REQUIRE(n >= 0, "n must be >= 0");
  require_buffer(x, n, "x");
  const KernelTable& k = table();
  parallel_for(n, kGrain, [&](int64_t begin, int64_t end) { k.scale(x, dtype, begin, end, factor); });
}

void cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n) {
  ZS_REQUIRE(n >= 0, "n must be >= 0");
  require_buffer(src, n, "src");
  require_buffer(dst, n, "dst");
  const KernelTable& k = table();
  parallel_for(n, kGrain, [&](int64_t begin, int64_t end) {
    k.cast(src, src_dtype, dst, dst_dtype, begin, end);
  });
}

namespace {

void require_quant_shape(int64_t n, int bits, int64_t block) {
  ZS_REQUIRE(n >= 0, "n must be >= 0");
  ZS_REQUIRE(bits == 8 || bits == 4, "bits must be 8 or 4, got " + std::to_string(bits));
  ZS_REQUIRE(block >= 1 && block <= kMaxQuantBlock,
             "block must be 1.." + std::to_string(kMaxQuantBlock) + " elements, got " +
                 std::to_string(block));
  ZS_REQUIRE(bits == 8 || block % 2 == 0,
             "4-bit blocks must hold an even number of elements (two per byte), got " +
                 std::to_string(block));
}

// Blocks per task: about kGrain elements' worth.
int64_t quant_grain(int64_t block) { return std::max<int64_t>(1, kGrain / block); }

}  // namespace

int64_t quantized_bytes(int64_t n, int bits) {
  ZS_REQUIRE(n >= 0 && (bits == 8 || bits == 4), "n must be >= 0 and bits 8 or 4");
  return bits == 8 ? n : (n + 1) / 2;
}

int64_t quantized_blocks(int64_t n, int64_t block) {
  ZS_REQUIRE(n >= 0 && block >= 1, "n must be >= 0 and block >= 1");
  return (n + block - 1) / block;
}

void quantize(const void* x, DType dtype, int64_t n, int bits, int64_t block, int8_t* q,
              float* scales) {
  require_quant_shape(n, bits, block);
  require_buffer(x, n, "x");
  require_buffer(q, n, "q");
  require_buffer(scales, n, "scales");
  const KernelTable& k = table();
  parallel_for(quantized_blocks(n, block), quant_grain(block), [&](int64_t bb, int64_t be) {
    k.quantize(x, dtype, n, bits, block, q, scales, bb, be);
  });
}

namespace {

// dequantize and dequantize_add: out = (or, accumulating into fp32, out +=) q * scale
void dequantize_into(const int8_t* q, const float* scales, int64_t n, int bits, int64_t block,
                     void* out, DType out_dtype, bool accumulate) {
  require_quant_shape(n, bits, block);
  require_buffer(q, n, "q");
  require_buffer(scales, n, "scales");
  require_buffer(out, n, accumulate ? "acc" : "out");
  const KernelTable& k = table();
  parallel_for(quantized_blocks(n, block), quant_grain(block), [&](int64_t bb, int64_t be) {
    k.dequantize(q, scales, n, bits, block, out, out_dtype, accumulate, bb, be);
  });
}

}  // namespace

void dequantize(const int8_t* q, const float* scales, int64_t n, int bits, int64_t block,
                void* out, DType out_dtype) {
  dequantize_into(q, scales, n, bits, block, out, out_dtype, false);
}

void dequantize_add(const int8_t* q, const float* scales, int64_t n, int bits, int64_t block,
                    float* acc) {
  dequantize_into(q, scales, n, bits, block, acc, DType::f32, true);
}

}  // namespace zeroshard::cpu
