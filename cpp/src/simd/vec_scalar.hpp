// One-lane "vector": the reference every SIMD path must match, and the tail loop of each.
// Included inside a per-instruction-set anonymous namespace by each kernels_*.cpp, so that no
// inline function compiled with wider instructions can be picked for another path (internal
// linkage: the linker never merges these copies). For the same reason it calls compiler
// builtins, not <cmath>'s inline std::fma/std::sqrt, whose out-of-line copies are shared.
// No include guard on purpose: each translation unit includes it once inside its namespace.

struct ScalarVec {
  using F = float;
  static constexpr int lanes = 1;

  static F set1(float v) { return v; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F fmadd(F a, F b, F c) { return __builtin_fmaf(a, b, c); }  // a*b + c, one rounding
  static F sqrt(F a) { return __builtin_sqrtf(a); }
  // a > b ? a : b, so b when either is NaN: the rule of x86 max instructions, kept everywhere.
  static F max(F a, F b) { return a > b ? a : b; }
  static F min(F a, F b) { return a < b ? a : b; }  // b when either is NaN, as x86's min
  // To the nearest integer, ties to even (the default rounding mode; inf and NaN stay).
  static F round_even(F a) { return __builtin_rintf(a); }
  // Integer-valued floats in [-128, 127] to int8 and back (block quantization).
  static void store_i8(int8_t* p, F v) { *p = static_cast<int8_t>(static_cast<int32_t>(v)); }
  static F load_i8(const int8_t* p) { return static_cast<float>(*p); }
  // a where a is +inf, else b.
  static F keep_inf(F a, F b) { return a == __builtin_inff() ? a : b; }
  static float reduce_add(F a) { return a; }

  // Sum of squares kept in double lanes: a norm over 1e9 elements stays accurate to ~1e-7.
  using SumSq = double;
  static SumSq sumsq_zero() { return 0.0; }
  static SumSq sumsq_add(SumSq acc, F v) {
    const double d = static_cast<double>(v);
    return acc + d * d;
  }
  static double sumsq_reduce(SumSq acc) { return acc; }

  static F load_f32(const float* p) { return *p; }
  static void store_f32(float* p, F v) { *p = v; }
  static F load_bf16(const uint16_t* p) { return bf16_to_float(*p); }
  static void store_bf16(uint16_t* p, F v) { *p = float_to_bf16(v); }
  static F load_f16(const uint16_t* p) { return f16_to_float(*p); }
  static void store_f16(uint16_t* p, F v) { *p = float_to_f16(v); }
  // One lane has nothing to stream: plain stores (the SIMD paths' tails run through these).
  static void stream_bf16(uint16_t* p, F v) { store_bf16(p, v); }
  static void stream_f16(uint16_t* p, F v) { store_f16(p, v); }
  static void stream_fence() {}

  static uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
  }
  static float from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static float bf16_to_float(uint16_t h) { return from_bits(static_cast<uint32_t>(h) << 16); }
  static uint16_t float_to_bf16(float f) {
    uint32_t u = bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return static_cast<uint16_t>(u >> 16);
  }
  static float f16_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;
    if (em >= 0x7c00u) return from_bits(sign | 0x7f800000u | ((em & 0x3ffu) << 13));
    if (em >= 0x0400u) return from_bits(sign | ((em << 13) + (112u << 23)));
    // Subnormal or zero: exact as em * 2^-24.
    return from_bits(sign | bits(static_cast<float>(em) * 5.9604644775390625e-8f));
  }
  static uint16_t float_to_f16(float f) {
    uint32_t x = bits(f);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (x >= 0x477ff000u) return sign | 0x7c00u;  // rounds past 65504: inf
    if (x < 0x38800000u) {
      // Below half's smallest normal: adding 0.5 makes the FPU round at 2^-24, the subnormal
      // spacing, with round-to-nearest-even for free.
      const float shifted = from_bits(x) + 0.5f;
      return static_cast<uint16_t>(sign | (bits(shifted) - 0x3f000000u));
    }
    x += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + ((x >> 13) & 1u);
    return static_cast<uint16_t>(sign | (x >> 13));
  }
};
