// Sixteen-lane vector over AVX-512 (F/BW/VL/DQ), with ScalarVec's static interface. Only
// kernels_avx512.cpp includes it (inside its anonymous namespace, compiled with the AVX-512
// flags); cpu_runtime.cpp picks that path only when the CPU reports them all. AVX512-BF16 is
// not required: bf16 rounding is done with integer operations, as in Avx2Vec.
// Every operation rounds exactly as ScalarVec does, so all paths give bitwise-equal results.
// No include guard on purpose (see vec_scalar.hpp).

struct Avx512Vec {
  using F = __m512;
  static constexpr int lanes = 16;

  static F set1(float v) { return _mm512_set1_ps(v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }  // b when either is NaN
  static F min(F a, F b) { return _mm512_min_ps(a, b); }  // b when either is NaN
  static F round_even(F a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static void store_i8(int8_t* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(_mm512_cvttps_epi32(v)));
  }
  static F load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static F keep_inf(F a, F b) {  // fpclass 0x08: +inf
    return _mm512_mask_blend_ps(_mm512_fpclass_ps_mask(a, 0x08), b, a);
  }
  static float reduce_add(F a) { return _mm512_reduce_add_ps(a); }

  struct SumSq {
    __m512d lo, hi;
  };
  static SumSq sumsq_zero() { return {_mm512_setzero_pd(), _mm512_setzero_pd()}; }
  static SumSq sumsq_add(SumSq acc, F v) {
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return {_mm512_fmadd_pd(lo, lo, acc.lo), _mm512_fmadd_pd(hi, hi, acc.hi)};
  }
  static double sumsq_reduce(SumSq acc) { return _mm512_reduce_add_pd(_mm512_add_pd(acc.lo, acc.hi)); }

  static F load_f32(const float* p) { return _mm512_loadu_ps(p); }
  static void store_f32(float* p, F v) { _mm512_storeu_ps(p, v); }

  static F load_bf16(const uint16_t* p) {
    const __m512i wide =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  // Round to nearest even with integer adds; NaN is quietened, not rounded (see Avx2Vec).
  static __m256i to_bf16(F v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i magnitude = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
    const __mmask16 is_nan = _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7f800000));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    const __m512i quiet = _mm512_or_si512(u, _mm512_set1_epi32(0x400000));
    const __m512i high = _mm512_srli_epi32(_mm512_mask_blend_epi32(is_nan, rounded, quiet), 16);
    return _mm512_cvtepi32_epi16(high);
  }
  static __m256i to_f16(F v) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static void store_bf16(uint16_t* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v));
  }

  static F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store_f16(uint16_t* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_f16(v));
  }

  // Non-temporal 16-bit stores (p aligned to lanes * 2 bytes); see Avx2Vec.
  static void stream_bf16(uint16_t* p, F v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16(v));
  }
  static void stream_f16(uint16_t* p, F v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_f16(v));
  }
  static void stream_fence() { _mm_sfence(); }
};
