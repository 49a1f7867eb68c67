// Span kernels written once over a vector type V (ScalarVec, Avx2Vec, Avx512Vec). Included by
// each kernels_*.cpp inside its own anonymous namespace after it defines V as `Vec`; the tail of every
// span runs through ScalarVec so any size and any alignment work.
// No include guard on purpose (see vec_scalar.hpp).

template <class V, DType D>
inline typename V::F load_as_float(const void* base, int64_t i) {
  if constexpr (D == DType::f32) return V::load_f32(static_cast<const float*>(base) + i);
  else if constexpr (D == DType::bf16) return V::load_bf16(static_cast<const uint16_t*>(base) + i);
  else return V::load_f16(static_cast<const uint16_t*>(base) + i);
}

template <class V, DType D>
inline void store_from_float(void* base, int64_t i, typename V::F v) {
  if constexpr (D == DType::f32) V::store_f32(static_cast<float*>(base) + i, v);
  else if constexpr (D == DType::bf16) V::store_bf16(static_cast<uint16_t*>(base) + i, v);
  else V::store_f16(static_cast<uint16_t*>(base) + i, v);
}

// Non-temporal store of a 16-bit output (bf16 / f16), same rounding as store_from_float.
template <class V, DType D>
inline void stream_from_float(void* base, int64_t i, typename V::F v) {
  static_assert(D != DType::f32, "only the 16-bit copies are streamed");
  if constexpr (D == DType::bf16) V::stream_bf16(static_cast<uint16_t*>(base) + i, v);
  else V::stream_f16(static_cast<uint16_t*>(base) + i, v);
}

// ---- Adam / AdamW ----------------------------------------------------------------------------

// sqrt(v) / c with c = sqrt(1 - beta2^step), correctly rounded like torch's division but
// without the divider, which sqrt and m / denom already keep busy (the fp32 path was bound by
// it): q0 = x * RN(1/c) is within an ulp, and one FMA correction then gives RN(x / c) exactly
// (Markstein's theorem; bit-for-bit checked by tests/cpp). x = +inf keeps q0 (the correction
// would turn it into NaN, where torch gives inf); x = sqrt(v) is never -inf.
struct DivByConstant {
  float c, neg_c, inv_c;
  explicit DivByConstant(float divisor) : c(divisor), neg_c(-divisor), inv_c(1.0f / divisor) {}
  template <class V>
  typename V::F apply(typename V::F x) const {
    const typename V::F q0 = V::mul(x, V::set1(inv_c));
    const typename V::F rem = V::fmadd(q0, V::set1(neg_c), x);  // exact
    return V::keep_inf(q0, V::fmadd(rem, V::set1(inv_c), q0));
  }
};

// Stream: the 16-bit param copy is written with non-temporal stores. It is write-only here, so
// plain stores would first read each of its lines for ownership: 2 of the 30 bytes a mixed step
// moves per param, wasted, in a kernel bound by memory bandwidth.
template <DType G, bool HasCopy, DType C, bool Stream>
void adam_span_typed(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  // Locals, not s.*: the stores below go through float pointers that could alias s, which made
  // the compiler reload every scalar and re-test every flag on each vector.
  float* const param = b.param;
  const void* const grad = b.grad;
  float* const exp_avg = b.exp_avg;
  float* const exp_avg_sq = b.exp_avg_sq;
  float* const max_exp_avg_sq = b.max_exp_avg_sq;
  void* const param_copy = b.param_copy;
  const float grad_factor = s.grad_factor, weight_decay = s.weight_decay;
  const float decay_factor = s.decay_factor, one_minus_beta1 = s.one_minus_beta1;
  const float one_minus_beta2 = s.one_minus_beta2, beta2 = s.beta2, eps = s.eps;
  const float step_size = s.step_size;
  const bool decay = weight_decay != 0.0f, decoupled = s.decoupled, amsgrad = s.amsgrad;
  const DivByConstant by_bc2(s.bias_correction2_sqrt);
  auto body = [&](auto tag, int64_t i) {
    using V = decltype(tag);
    using F = typename V::F;
    F g = V::mul(load_as_float<V, G>(grad, i), V::set1(grad_factor));
    F p = V::load_f32(param + i);
    if (decay) {
      if (decoupled) p = V::mul(p, V::set1(decay_factor));
      else g = V::fmadd(p, V::set1(weight_decay), g);
    }
    F m = V::load_f32(exp_avg + i);
    F v = V::load_f32(exp_avg_sq + i);
    m = V::fmadd(V::set1(one_minus_beta1), V::sub(g, m), m);  // lerp(m, g, 1 - beta1)
    v = V::fmadd(V::set1(one_minus_beta2), V::mul(g, g), V::mul(V::set1(beta2), v));
    F v_used = v;  // AMSGrad divides by the largest second moment seen so far instead
    if (amsgrad) {
      v_used = V::max(V::load_f32(max_exp_avg_sq + i), v);
      V::store_f32(max_exp_avg_sq + i, v_used);
    }
    F denom = V::add(by_bc2.template apply<V>(V::sqrt(v_used)), V::set1(eps));
    p = V::sub(p, V::mul(V::set1(step_size), V::div(m, denom)));
    V::store_f32(exp_avg + i, m);
    V::store_f32(exp_avg_sq + i, v);
    V::store_f32(param + i, p);
    if constexpr (HasCopy && Stream) stream_from_float<V, C>(param_copy, i, p);
    else if constexpr (HasCopy) store_from_float<V, C>(param_copy, i, p);
  };
  int64_t i = begin;
  if constexpr (Stream) {
    // Streaming stores need the copy aligned to a whole vector: one lane at a time up to there.
    constexpr uintptr_t align = Vec::lanes * sizeof(uint16_t);
    const uintptr_t addr = reinterpret_cast<uintptr_t>(static_cast<uint16_t*>(param_copy) + i);
    const int64_t head = static_cast<int64_t>(((align - addr % align) % align) / sizeof(uint16_t));
    for (const int64_t stop = head < end - begin ? begin + head : end; i < stop; ++i) body(ScalarVec{}, i);
  }
  for (; i + Vec::lanes <= end; i += Vec::lanes) body(Vec{}, i);
  for (; i < end; ++i) body(ScalarVec{}, i);
  if constexpr (Stream) Vec::stream_fence();  // visible to other threads before the pool returns
}

template <DType G, bool Stream>
void adam_span_copy(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  if (b.copy_dtype == DType::bf16) adam_span_typed<G, true, DType::bf16, Stream>(b, s, begin, end);
  else adam_span_typed<G, true, DType::f16, Stream>(b, s, begin, end);
}

template <DType G>
void adam_span_grad(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  if (b.param_copy == nullptr) adam_span_typed<G, false, DType::f32, false>(b, s, begin, end);
  else if (b.stream_copy) adam_span_copy<G, true>(b, s, begin, end);
  else adam_span_copy<G, false>(b, s, begin, end);
}

void adam_span(const AdamBuffers& b, const AdamScalars& s, int64_t begin, int64_t end) {
  switch (b.grad_dtype) {
    case DType::f32: return adam_span_grad<DType::f32>(b, s, begin, end);
    case DType::bf16: return adam_span_grad<DType::bf16>(b, s, begin, end);
    case DType::f16: return adam_span_grad<DType::f16>(b, s, begin, end);
  }
}

// ---- SGD -------------------------------------------------------------------------------------

template <DType G, bool HasCopy, DType C>
void sgd_span_typed(const SgdBuffers& b, const SgdScalars& s, int64_t begin, int64_t end) {
  auto body = [&](auto tag, int64_t i) {
    using V = decltype(tag);
    using F = typename V::F;
    F d = V::mul(load_as_float<V, G>(b.grad, i), V::set1(s.grad_factor));
    F p = V::load_f32(b.param + i);
    if (s.weight_decay != 0.0f) d = V::fmadd(p, V::set1(s.weight_decay), d);
    if (s.momentum != 0.0f) {
      F buf = s.first_step
                  ? d
                  : V::fmadd(V::set1(s.momentum), V::load_f32(b.momentum_buffer + i),
                             V::mul(V::set1(s.dampening_complement), d));
      V::store_f32(b.momentum_buffer + i, buf);
      d = s.nesterov ? V::fmadd(V::set1(s.momentum), buf, d) : buf;
    }
    p = V::sub(p, V::mul(V::set1(s.lr), d));
    V::store_f32(b.param + i, p);
    if constexpr (HasCopy) store_from_float<V, C>(b.param_copy, i, p);
  };
  int64_t i = begin;
  for (; i + Vec::lanes <= end; i += Vec::lanes) body(Vec{}, i);
  for (; i < end; ++i) body(ScalarVec{}, i);
}

template <DType G>
void sgd_span_grad(const SgdBuffers& b, const SgdScalars& s, int64_t begin, int64_t end) {
  if (b.param_copy == nullptr) sgd_span_typed<G, false, DType::f32>(b, s, begin, end);
  else if (b.copy_dtype == DType::bf16) sgd_span_typed<G, true, DType::bf16>(b, s, begin, end);
  else sgd_span_typed<G, true, DType::f16>(b, s, begin, end);
}

void sgd_span(const SgdBuffers& b, const SgdScalars& s, int64_t begin, int64_t end) {
  switch (b.grad_dtype) {
    case DType::f32: return sgd_span_grad<DType::f32>(b, s, begin, end);
    case DType::bf16: return sgd_span_grad<DType::bf16>(b, s, begin, end);
    case DType::f16: return sgd_span_grad<DType::f16>(b, s, begin, end);
  }
}

// ---- reductions, scale, cast -------------------------------------------------------------------

template <DType D>
double sum_sq_typed(const void* x, int64_t begin, int64_t end, bool* nonfinite) {
  // Squares accumulate in double lanes (two chains to hide the FMA latency). Any inf/NaN
  // element makes the double sum inf/NaN, and finite squares cannot overflow a double.
  typename Vec::SumSq acc0 = Vec::sumsq_zero(), acc1 = Vec::sumsq_zero();
  int64_t i = begin;
  for (; i + 2 * Vec::lanes <= end; i += 2 * Vec::lanes) {
    acc0 = Vec::sumsq_add(acc0, load_as_float<Vec, D>(x, i));
    acc1 = Vec::sumsq_add(acc1, load_as_float<Vec, D>(x, i + Vec::lanes));
  }
  if (i + Vec::lanes <= end) {
    acc0 = Vec::sumsq_add(acc0, load_as_float<Vec, D>(x, i));
    i += Vec::lanes;
  }
  double total = Vec::sumsq_reduce(acc0) + Vec::sumsq_reduce(acc1);
  for (; i < end; ++i) total = ScalarVec::sumsq_add(total, load_as_float<ScalarVec, D>(x, i));
  if (!(total - total == 0.0)) *nonfinite = true;  // inf - inf and NaN - NaN are NaN
  return total;
}

double sum_sq_span(const void* x, DType dtype, int64_t begin, int64_t end, bool* nonfinite) {
  switch (dtype) {
    case DType::f32: return sum_sq_typed<DType::f32>(x, begin, end, nonfinite);
    case DType::bf16: return sum_sq_typed<DType::bf16>(x, begin, end, nonfinite);
    case DType::f16: return sum_sq_typed<DType::f16>(x, begin, end, nonfinite);
  }
  return 0.0;
}

template <DType D>
bool all_finite_typed(const void* x, int64_t begin, int64_t end) {
  // x*0 + acc is NaN exactly when x is inf/NaN; four chains keep it a pure streaming read.
  const typename Vec::F zero = Vec::set1(0.0f);
  typename Vec::F p0 = zero, p1 = zero, p2 = zero, p3 = zero;
  int64_t i = begin;
  for (; i + 4 * Vec::lanes <= end; i += 4 * Vec::lanes) {
    p0 = Vec::fmadd(load_as_float<Vec, D>(x, i), zero, p0);
    p1 = Vec::fmadd(load_as_float<Vec, D>(x, i + Vec::lanes), zero, p1);
    p2 = Vec::fmadd(load_as_float<Vec, D>(x, i + 2 * Vec::lanes), zero, p2);
    p3 = Vec::fmadd(load_as_float<Vec, D>(x, i + 3 * Vec::lanes), zero, p3);
  }
  for (; i + Vec::lanes <= end; i += Vec::lanes) p0 = Vec::fmadd(load_as_float<Vec, D>(x, i), zero, p0);
  float poison = Vec::reduce_add(Vec::add(Vec::add(p0, p1), Vec::add(p2, p3)));
  for (; i < end; ++i) poison = ScalarVec::fmadd(load_as_float<ScalarVec, D>(x, i), 0.0f, poison);
  return poison == poison;
}

bool all_finite_span(const void* x, DType dtype, int64_t begin, int64_t end) {
  switch (dtype) {
    case DType::f32: return all_finite_typed<DType::f32>(x, begin, end);
    case DType::bf16: return all_finite_typed<DType::bf16>(x, begin, end);
    case DType::f16: return all_finite_typed<DType::f16>(x, begin, end);
  }
  return true;
}

template <DType D>
void scale_typed(void* x, int64_t begin, int64_t end, float factor) {
  auto body = [&](auto tag, int64_t i) {
    using V = decltype(tag);
    store_from_float<V, D>(x, i, V::mul(load_as_float<V, D>(x, i), V::set1(factor)));
  };
  int64_t i = begin;
  for (; i + Vec::lanes <= end; i += Vec::lanes) body(Vec{}, i);
  for (; i < end; ++i) body(ScalarVec{}, i);
}

void scale_span(void* x, DType dtype, int64_t begin, int64_t end, float factor) {
  switch (dtype) {
    case DType::f32: return scale_typed<DType::f32>(x, begin, end, factor);
    case DType::bf16: return scale_typed<DType::bf16>(x, begin, end, factor);
    case DType::f16: return scale_typed<DType::f16>(x, begin, end, factor);
  }
}

template <DType S, DType D>
void cast_typed(const void* src, void* dst, int64_t begin, int64_t end) {
  auto body = [&](auto tag, int64_t i) {
    using V = decltype(tag);
    store_from_float<V, D>(dst, i, load_as_float<V, S>(src, i));
  };
  int64_t i = begin;
  for (; i + Vec::lanes <= end; i += Vec::lanes) body(Vec{}, i);
  for (; i < end; ++i) body(ScalarVec{}, i);
}

template <DType S>
void cast_from(const void* src, void* dst, DType dst_dtype, int64_t begin, int64_t end) {
  switch (dst_dtype) {
    case DType::f32: return cast_typed<S, DType::f32>(src, dst, begin, end);
    case DType::bf16: return cast_typed<S, DType::bf16>(src, dst, begin, end);
    case DType::f16: return cast_typed<S, DType::f16>(src, dst, begin, end);
  }
}

void cast_span(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t begin,
               int64_t end) {
  switch (src_dtype) {
    case DType::f32: return cast_from<DType::f32>(src, dst, dst_dtype, begin, end);
    case DType::bf16: return cast_from<DType::bf16>(src, dst, dst_dtype, begin, end);
    case DType::f16: return cast_from<DType::f16>(src, dst, dst_dtype, begin, end);
  }
}

// ---- block quantization ([Note: block quantization] in cpu_kernels.hpp) ----------------------

// max |x| over [begin, end) and whether every element is finite. max is exact, so the order of
// lanes does not matter; |x| as max(x, -x) (+0 for either zero).
template <DType D>
float block_absmax(const void* x, int64_t begin, int64_t end, bool* finite) {
  const typename Vec::F zero = Vec::set1(0.0f);
  typename Vec::F m = zero, poison = zero;
  int64_t i = begin;
  for (; i + Vec::lanes <= end; i += Vec::lanes) {
    const typename Vec::F v = load_as_float<Vec, D>(x, i);
    m = Vec::max(m, Vec::max(v, Vec::sub(zero, v)));
    poison = Vec::fmadd(v, zero, poison);  // NaN exactly when some v is inf/NaN
  }
  float lanes[Vec::lanes];
  Vec::store_f32(lanes, m);
  float absmax = 0.0f;
  for (float l : lanes) absmax = ScalarVec::max(absmax, l);
  float bad = Vec::reduce_add(poison);
  for (; i < end; ++i) {
    const float v = load_as_float<ScalarVec, D>(x, i);
    absmax = ScalarVec::max(absmax, ScalarVec::max(v, 0.0f - v));
    bad = ScalarVec::fmadd(v, 0.0f, bad);
  }
  *finite = bad == bad;
  return absmax;
}

template <DType D>
void quantize_typed(const void* x, int64_t n, int bits, int64_t block, int8_t* q, float* scales,
                    int64_t blk_begin, int64_t blk_end) {
  const float qmax = bits == 8 ? 127.0f : 7.0f;
  int8_t staged[kMaxQuantBlock];
  for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
    const int64_t begin = blk * block, end = begin + block < n ? begin + block : n, len = end - begin;
    bool finite = true;
    const float absmax = block_absmax<D>(x, begin, end, &finite);
    // A block with inf/NaN keeps no values: its scale is NaN, so it dequantizes to NaN (an
    // overflow check downstream sees it). A block of zeros, or one whose scale underflows, is 0.
    const float scale = !finite ? __builtin_nanf("") : absmax / qmax;
    int8_t* out = bits == 8 ? q + begin : staged;
    if (!(scale > 0.0f)) {
      for (int64_t k = 0; k < len; ++k) out[k] = 0;
    } else {
      auto body = [&](auto tag, int64_t k) {
        using V = decltype(tag);
        const typename V::F v = V::div(load_as_float<V, D>(x, begin + k), V::set1(scale));
        V::store_i8(out + k, V::min(V::max(V::round_even(v), V::set1(-qmax)), V::set1(qmax)));
      };
      int64_t k = 0;
      for (; k + Vec::lanes <= len; k += Vec::lanes) body(Vec{}, k);
      for (; k < len; ++k) body(ScalarVec{}, k);
    }
    scales[blk] = scale;
    if (bits == 4) {  // two per byte, the even element in the low nibble; block is even
      uint8_t* packed = reinterpret_cast<uint8_t*>(q) + begin / 2;
      if (len % 2) staged[len] = 0;  // an odd tail's high nibble
      for (int64_t j = 0; j < (len + 1) / 2; ++j) {
        packed[j] = static_cast<uint8_t>((static_cast<uint8_t>(staged[2 * j]) & 0x0f) |
                                         (static_cast<uint8_t>(staged[2 * j + 1]) << 4));
      }
    }
  }
}

void quantize_span(const void* x, DType dtype, int64_t n, int bits, int64_t block, int8_t* q,
                   float* scales, int64_t blk_begin, int64_t blk_end) {
  switch (dtype) {
    case DType::f32: return quantize_typed<DType::f32>(x, n, bits, block, q, scales, blk_begin, blk_end);
    case DType::bf16: return quantize_typed<DType::bf16>(x, n, bits, block, q, scales, blk_begin, blk_end);
    case DType::f16: return quantize_typed<DType::f16>(x, n, bits, block, q, scales, blk_begin, blk_end);
  }
}

// Byte -> its two 4-bit values, sign-extended (two's complement nibbles: 8..15 are -8..-1).
struct NibblePairs {
  int8_t lo[256], hi[256];
};
constexpr NibblePairs make_nibble_pairs() {
  NibblePairs t{};
  for (int b = 0; b < 256; ++b) {
    const int lo = b & 0x0f, hi = b >> 4;
    t.lo[b] = static_cast<int8_t>(lo >= 8 ? lo - 16 : lo);
    t.hi[b] = static_cast<int8_t>(hi >= 8 ? hi - 16 : hi);
  }
  return t;
}
constexpr NibblePairs kNibblePairs = make_nibble_pairs();

template <DType D, bool Accumulate>
void dequantize_typed(const int8_t* q, const float* scales, int64_t n, int bits, int64_t block,
                      void* out, int64_t blk_begin, int64_t blk_end) {
  int8_t staged[kMaxQuantBlock];
  for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
    const int64_t begin = blk * block, end = begin + block < n ? begin + block : n, len = end - begin;
    const int8_t* values = q + begin;
    if (bits == 4) {  // a byte at a time through the table: both nibbles, sign-extended
      const uint8_t* packed = reinterpret_cast<const uint8_t*>(q) + begin / 2;
      const int64_t bytes = (len + 1) / 2;
      for (int64_t j = 0; j < bytes; ++j) {
        staged[2 * j] = kNibblePairs.lo[packed[j]];
        staged[2 * j + 1] = kNibblePairs.hi[packed[j]];
      }
      values = staged;
    }
    const float scale = scales[blk];
    auto body = [&](auto tag, int64_t k) {
      using V = decltype(tag);
      const typename V::F v = V::mul(V::load_i8(values + k), V::set1(scale));
      if constexpr (Accumulate) {
        float* acc = static_cast<float*>(out) + begin + k;
        V::store_f32(acc, V::add(V::load_f32(acc), v));
      } else {
        store_from_float<V, D>(out, begin + k, v);
      }
    };
    int64_t k = 0;
    for (; k + Vec::lanes <= len; k += Vec::lanes) body(Vec{}, k);
    for (; k < len; ++k) body(ScalarVec{}, k);
  }
}

void dequantize_span(const int8_t* q, const float* scales, int64_t n, int bits, int64_t block,
                     void* out, DType out_dtype, bool accumulate, int64_t blk_begin,
                     int64_t blk_end) {
  if (accumulate) return dequantize_typed<DType::f32, true>(q, scales, n, bits, block, out, blk_begin, blk_end);
  switch (out_dtype) {
    case DType::f32: return dequantize_typed<DType::f32, false>(q, scales, n, bits, block, out, blk_begin, blk_end);
    case DType::bf16: return dequantize_typed<DType::bf16, false>(q, scales, n, bits, block, out, blk_begin, blk_end);
    case DType::f16: return dequantize_typed<DType::f16, false>(q, scales, n, bits, block, out, blk_begin, blk_end);
  }
}

constexpr KernelTable kTable{&adam_span, &sgd_span, &sum_sq_span, &all_finite_span,
                             &scale_span, &cast_span, &quantize_span, &dequantize_span};

