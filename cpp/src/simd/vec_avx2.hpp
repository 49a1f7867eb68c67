// Eight-lane vector over AVX2 + FMA + F16C, with ScalarVec's static interface. Only
// kernels_avx2.cpp includes it (inside its anonymous namespace, compiled with -mavx2 -mfma
// -mf16c); cpu_runtime.cpp picks that path only when the CPU reports all three.
// Every operation rounds exactly as ScalarVec does, so both paths give bitwise-equal results.
// No include guard on purpose (see vec_scalar.hpp).

struct Avx2Vec {
  using F = __m256;
  static constexpr int lanes = 8;

  static F set1(float v) { return _mm256_set1_ps(v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }  // b when either is NaN
  static F min(F a, F b) { return _mm256_min_ps(a, b); }  // b when either is NaN
  static F round_even(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static void store_i8(int8_t* p, F v) {
    const __m256i i32 = _mm256_cvttps_epi32(v);  // exact: v holds integers
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(i16, i16));
  }
  static F load_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static F keep_inf(F a, F b) {
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(a, _mm256_set1_ps(__builtin_inff()), _CMP_EQ_OQ));
  }
  static float reduce_add(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  struct SumSq {
    __m256d lo, hi;
  };
  static SumSq sumsq_zero() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }
  static SumSq sumsq_add(SumSq acc, F v) {
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    return {_mm256_fmadd_pd(lo, lo, acc.lo), _mm256_fmadd_pd(hi, hi, acc.hi)};
  }
  static double sumsq_reduce(SumSq acc) {
    const __m256d s4 = _mm256_add_pd(acc.lo, acc.hi);
    __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
    s2 = _mm_add_sd(s2, _mm_unpackhi_pd(s2, s2));
    return _mm_cvtsd_f64(s2);
  }

  static F load_f32(const float* p) { return _mm256_loadu_ps(p); }
  static void store_f32(float* p, F v) { _mm256_storeu_ps(p, v); }

  static F load_bf16(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  // Round to nearest even with integer adds (no AVX512-BF16 needed); NaN is quietened, not
  // rounded, so it cannot carry into infinity.
  static __m128i to_bf16(F v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i magnitude = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
    const __m256i is_nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f800000));
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
    const __m256i high = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, is_nan), 16);
    // packus works within 128-bit halves; gather the two low quadwords into one register.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(high, high), 0x08);
    return _mm256_castsi256_si128(packed);
  }
  static __m128i to_f16(F v) {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static void store_bf16(uint16_t* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(v));
  }

  static F load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store_f16(uint16_t* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_f16(v));
  }

  // Non-temporal stores of a 16-bit vector (p aligned to lanes * 2 bytes): write-only outputs
  // then skip the read-for-ownership of their lines. stream_fence() orders them before return.
  static void stream_bf16(uint16_t* p, F v) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16(v));
  }
  static void stream_f16(uint16_t* p, F v) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_f16(v));
  }
  static void stream_fence() { _mm_sfence(); }
};
