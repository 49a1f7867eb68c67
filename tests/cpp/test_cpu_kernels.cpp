// CPU kernels on every SIMD path this CPU and build have: optimizer steps against torch.optim's
// rules in double, inf/NaN skipping, exact conversions, the norm's accuracy and determinism
// across thread counts, and the thread pool's error handling.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>
#include <thread>
#include <chrono>

#include <dlfcn.h>

#include "check.hpp"
#include "reference_numerics.hpp"
#include "zeroshard/cpu_kernels.hpp"
#include "zeroshard/cpu_runtime.hpp"
#include "zeroshard/error.hpp"

using namespace zeroshard;
using namespace zeroshard::cpu;

namespace {

const int64_t kSizes[] = {0, 1, 7, 15, 16, 17, 31, 33, 1000003};
const DType kDTypes[] = {DType::f32, DType::bf16, DType::f16};

std::vector<SimdLevel> available_levels() {
  std::vector<SimdLevel> out;
  const SimdLevel saved = simd_level();
  for (SimdLevel l : {SimdLevel::scalar, SimdLevel::avx2, SimdLevel::avx512}) {
    try {
      set_simd_level(l);
      out.push_back(l);
    } catch (const InvalidArgument&) {
    }
  }
  set_simd_level(saved);
  return out;
}

// A value of `dtype` stored as raw bits, from a float (rounded by the reference).
uint16_t narrow(float x, DType dtype) {
  return dtype == DType::bf16 ? zs_ref::float_to_bf16(x) : zs_ref::float_to_f16(x);
}
float widen(uint16_t h, DType dtype) {
  return dtype == DType::bf16 ? zs_ref::bf16_to_float(h) : zs_ref::f16_to_float(h);
}

// A buffer of n elements of `dtype` starting `offset` elements into its allocation, so kernels
// see unaligned pointers.
struct TypedBuffer {
  DType dtype;
  int64_t offset;
  std::vector<uint32_t> storage;  // big enough for f32, 4-byte aligned base
  TypedBuffer(DType d, int64_t n, int64_t off) : dtype(d), offset(off), storage(n + off + 1) {}
  void* data() {
    return reinterpret_cast<char*>(storage.data()) + offset * static_cast<int64_t>(dtype_size(dtype));
  }
  float get(int64_t i) {
    if (dtype == DType::f32) return static_cast<float*>(data())[i];
    return widen(static_cast<uint16_t*>(data())[i], dtype);
  }
  void set(int64_t i, float x) {
    if (dtype == DType::f32) static_cast<float*>(data())[i] = x;
    else static_cast<uint16_t*>(data())[i] = narrow(x, dtype);
  }
};

std::vector<float> uniform(int64_t n, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = dist(rng);
  return v;
}

bool close(double got, double ref, double tol) { return std::fabs(got - ref) <= tol; }

std::string where(SimdLevel level, int64_t n, int64_t i, DType g, const char* what) {
  return std::string(simd_level_name(level)) + " n=" + std::to_string(n) + " i=" +
         std::to_string(i) + " grad=" + dtype_name(g) + " " + what;
}

struct AdamVariant {
  bool decoupled, amsgrad, maximize;
};
// Both decays plain, and AMSGrad / maximize each with either decay.
const AdamVariant kAdamVariants[] = {{true, false, false}, {false, false, false},
                                     {true, true, false},  {false, true, true},
                                     {true, false, true}};

// Runs `steps` Adam steps and compares each against the double reference applied to the same
// inputs; the copy must be exactly the rounded fp32 param.
void check_adam(SimdLevel level, int64_t n, int64_t offset, DType grad_dtype, bool has_copy,
                DType copy_dtype, const AdamVariant& variant, int steps) {
  set_simd_level(level);
  // max_exp_avg_sq starts in v's range, so both sides of the max are taken.
  std::vector<float> p0 = uniform(n + offset, -1, 1, 1), m0 = uniform(n + offset, -0.1f, 0.1f, 2),
                     v0 = uniform(n + offset, 0, 0.01f, 3), vmax0 = uniform(n + offset, 0, 0.01f, 4);
  float* p = p0.data() + offset;
  float* m = m0.data() + offset;
  float* v = v0.data() + offset;
  float* vmax = variant.amsgrad ? vmax0.data() + offset : nullptr;
  TypedBuffer grad(grad_dtype, n, offset), copy(copy_dtype, n, offset);
  AdamConfig cfg;
  cfg.lr = 1e-2f, cfg.beta1 = 0.8f, cfg.beta2 = 0.95f, cfg.eps = 1e-6f, cfg.weight_decay = 0.1f;
  cfg.decoupled = variant.decoupled, cfg.grad_scale = 4.0f;
  cfg.amsgrad = variant.amsgrad, cfg.maximize = variant.maximize;
  for (int step = 1; step <= steps; ++step) {
    const std::vector<float> g = uniform(n, -2, 2, 10 + step);
    for (int64_t i = 0; i < n; ++i) grad.set(i, g[i]);
    const std::vector<float> p_in(p, p + n), m_in(m, m + n), v_in(v, v + n);
    const std::vector<float> vmax_in(vmax0.begin() + offset, vmax0.begin() + offset + n);
    cfg.step = step;
    const bool skipped = adam_step(p, grad.data(), grad_dtype, m, v, vmax,
                                   has_copy ? copy.data() : nullptr, copy_dtype, n, cfg);
    CHECK(!skipped);
    zs_ref::AdamParams h{cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay,
                         cfg.grad_scale, step, variant.decoupled};
    h.amsgrad = variant.amsgrad, h.maximize = variant.maximize;
    for (int64_t i = 0; i < n; ++i) {
      const double gi = grad.get(i);
      const zs_ref::AdamState r =
          zs_ref::adam_reference(h, p_in[i], gi, m_in[i], v_in[i], vmax_in[i]);
      const double step_len = std::fabs(r.param - p_in[i]);
      CHECK_MSG(close(p[i], r.param, 3e-7 * (std::fabs(r.param) + std::fabs(p_in[i])) + 1e-5 * step_len + 1e-30),
                where(level, n, i, grad_dtype, "param"));
      CHECK_MSG(close(m[i], r.exp_avg, 1e-5 * std::fabs(r.exp_avg) + 1e-6 * (std::fabs(m_in[i]) + std::fabs(gi)) + 1e-30),
                where(level, n, i, grad_dtype, "exp_avg"));
      CHECK_MSG(close(v[i], r.exp_avg_sq, 1e-5 * r.exp_avg_sq + 1e-30),
                where(level, n, i, grad_dtype, "exp_avg_sq"));
      if (variant.amsgrad)
        CHECK_MSG(close(vmax[i], r.max_exp_avg_sq, 1e-5 * r.max_exp_avg_sq + 1e-30),
                  where(level, n, i, grad_dtype, "max_exp_avg_sq"));
      if (has_copy)
        CHECK_MSG(static_cast<uint16_t*>(copy.data())[i] == narrow(p[i], copy_dtype),
                  where(level, n, i, grad_dtype, "param_copy"));
    }
  }
}

struct SgdCase {
  float momentum, dampening, weight_decay;
  bool nesterov;
  bool maximize = false;
};

void check_sgd(SimdLevel level, int64_t n, int64_t offset, DType grad_dtype, bool has_copy,
               DType copy_dtype, const SgdCase& c, int steps) {
  set_simd_level(level);
  std::vector<float> p0 = uniform(n + offset, -1, 1, 4), b0 = uniform(n + offset, -1, 1, 5);
  float* p = p0.data() + offset;
  float* buf = b0.data() + offset;
  TypedBuffer grad(grad_dtype, n, offset), copy(copy_dtype, n, offset);
  SgdConfig cfg;
  cfg.lr = 1e-2f, cfg.momentum = c.momentum, cfg.dampening = c.dampening;
  cfg.weight_decay = c.weight_decay, cfg.nesterov = c.nesterov, cfg.grad_scale = 2.0f;
  cfg.maximize = c.maximize;
  for (int step = 1; step <= steps; ++step) {
    const std::vector<float> g = uniform(n, -2, 2, 20 + step);
    for (int64_t i = 0; i < n; ++i) grad.set(i, g[i]);
    const std::vector<float> p_in(p, p + n), b_in(buf, buf + n);
    cfg.first_step = step == 1;
    CHECK(!sgd_step(p, grad.data(), grad_dtype, c.momentum != 0 ? buf : nullptr,
                    has_copy ? copy.data() : nullptr, copy_dtype, n, cfg));
    const zs_ref::SgdParams h{cfg.lr, cfg.momentum, cfg.dampening, cfg.weight_decay,
                              cfg.grad_scale, cfg.nesterov, cfg.first_step, c.maximize};
    for (int64_t i = 0; i < n; ++i) {
      const zs_ref::AdamState r = zs_ref::sgd_reference(h, p_in[i], grad.get(i), b_in[i]);
      const double step_len = std::fabs(r.param - p_in[i]);
      CHECK_MSG(close(p[i], r.param, 3e-7 * (std::fabs(r.param) + std::fabs(p_in[i])) + 1e-5 * step_len + 1e-30),
                where(level, n, i, grad_dtype, "sgd param"));
      if (c.momentum != 0)
        CHECK_MSG(close(buf[i], r.exp_avg, 1e-5 * (std::fabs(r.exp_avg) + std::fabs(b_in[i])) + 1e-30),
                  where(level, n, i, grad_dtype, "momentum_buffer"));
      else
        CHECK_MSG(buf[i] == b_in[i], where(level, n, i, grad_dtype, "momentum_buffer untouched"));
      if (has_copy)
        CHECK_MSG(static_cast<uint16_t*>(copy.data())[i] == narrow(p[i], copy_dtype),
                  where(level, n, i, grad_dtype, "sgd param_copy"));
    }
  }
}

struct CopyChoice {
  bool has_copy;
  DType dtype;
};
const CopyChoice kCopies[] = {{false, DType::bf16}, {true, DType::bf16}, {true, DType::f16}};

}  // namespace

TEST(adam_matches_torch_reference_on_every_path) {
  for (SimdLevel level : available_levels())
    for (int64_t n : kSizes)
      for (int64_t offset : {0, 3}) {
        const bool big = n > 100000;
        if (big && offset != 0) continue;  // the large size runs once per combination
        int combo = 0;
        for (DType g : kDTypes)
          for (const CopyChoice& c : kCopies)
            for (const AdamVariant& variant : kAdamVariants) {
              if (big && (combo++ % 3) != 0) continue;
              check_adam(level, n, offset, g, c.has_copy, c.dtype, variant, big ? 1 : 3);
            }
      }
}

TEST(sgd_matches_torch_reference_on_every_path) {
  const SgdCase cases[] = {{0, 0, 0, false},
                           {0.9f, 0.1f, 0.05f, false},
                           {0.9f, 0, 0.01f, true},
                           {0.9f, 0.1f, 0.05f, false, /*maximize=*/true},
                           {0, 0, 0.05f, false, /*maximize=*/true}};
  for (SimdLevel level : available_levels())
    for (int64_t n : kSizes)
      for (int64_t offset : {0, 1}) {
        const bool big = n > 100000;
        if (big && offset != 0) continue;
        int combo = 0;
        for (DType g : kDTypes)
          for (const CopyChoice& c : kCopies)
            for (const SgdCase& sc : cases) {
              if (big && (combo++ % 4) != 0) continue;
              check_sgd(level, n, offset, g, c.has_copy, c.dtype, sc, big ? 1 : 2);
            }
      }
}

TEST(nonfinite_gradient_leaves_everything_untouched) {
  const int64_t n = 1003;
  for (SimdLevel level : available_levels()) {
    set_simd_level(level);
    for (DType g : kDTypes)
      for (int64_t bad_at : {int64_t{0}, int64_t{517}, n - 1})
        for (float bad : {INFINITY, -INFINITY, NAN}) {
          TypedBuffer grad(g, n, 1), copy(DType::bf16, n, 1);
          const std::vector<float> gv = uniform(n, -1, 1, 7);
          for (int64_t i = 0; i < n; ++i) grad.set(i, gv[i]);
          grad.set(bad_at, bad);
          std::vector<float> p = uniform(n, -1, 1, 8), m = uniform(n, -1, 1, 9),
                             v = uniform(n, 0, 1, 10), buf = uniform(n, -1, 1, 11);
          std::fill(copy.storage.begin(), copy.storage.end(), 0xa5a5a5a5u);
          const auto p_in = p, m_in = m, v_in = v, buf_in = buf;
          const auto copy_in = copy.storage;
          AdamConfig acfg;
          acfg.weight_decay = 0.1f;
          std::vector<float> vmax = uniform(n, 0, 1, 12);
          const auto vmax_in = vmax;
          acfg.amsgrad = true;
          CHECK(adam_step(p.data(), grad.data(), g, m.data(), v.data(), vmax.data(), copy.data(),
                          DType::bf16, n, acfg));
          SgdConfig scfg;
          scfg.momentum = 0.9f;
          CHECK(sgd_step(p.data(), grad.data(), g, buf.data(), copy.data(), DType::bf16, n, scfg));
          const std::string ctx = where(level, n, bad_at, g, "nonfinite");
          CHECK_MSG(std::memcmp(p.data(), p_in.data(), n * 4) == 0, ctx);
          CHECK_MSG(std::memcmp(m.data(), m_in.data(), n * 4) == 0, ctx);
          CHECK_MSG(std::memcmp(v.data(), v_in.data(), n * 4) == 0, ctx);
          CHECK_MSG(vmax == vmax_in, ctx);
          CHECK_MSG(std::memcmp(buf.data(), buf_in.data(), n * 4) == 0, ctx);
          CHECK_MSG(copy.storage == copy_in, ctx);
          CHECK_MSG(!all_finite(grad.data(), g, n), ctx);
          CHECK_MSG(l2_norm_sq(grad.data(), g, n).nonfinite, ctx);
          grad.set(bad_at, 0.5f);
          CHECK_MSG(all_finite(grad.data(), g, n) && !l2_norm_sq(grad.data(), g, n).nonfinite, ctx);
        }
  }
}

TEST(all_16bit_patterns_convert_exactly_and_back) {
  std::vector<uint16_t> patterns(65536), back(65536);
  for (uint32_t i = 0; i < 65536; ++i) patterns[i] = static_cast<uint16_t>(i);
  std::vector<float> wide(65536);
  for (SimdLevel level : available_levels()) {
    set_simd_level(level);
    for (DType d : {DType::bf16, DType::f16}) {
      cast(patterns.data(), d, wide.data(), DType::f32, 65536);
      cast(wide.data(), DType::f32, back.data(), d, 65536);
      const DType other = d == DType::bf16 ? DType::f16 : DType::bf16;
      std::vector<uint16_t> cross(65536);
      cast(patterns.data(), d, cross.data(), other, 65536);
      for (uint32_t i = 0; i < 65536; ++i) {
        const float ref = widen(patterns[i], d);
        const std::string ctx = std::string(simd_level_name(level)) + " " + dtype_name(d) + " 0x" + std::to_string(i);
        if (std::isnan(ref)) {
          CHECK_MSG(std::isnan(wide[i]) && std::signbit(wide[i]) == std::signbit(ref), ctx);
          CHECK_MSG(std::isnan(widen(back[i], d)) && (back[i] & 0x8000u) == (i & 0x8000u), ctx);
          CHECK_MSG(std::isnan(widen(cross[i], other)), ctx);
        } else {
          CHECK_MSG(zs_ref::bits_of(wide[i]) == zs_ref::bits_of(ref), ctx + " widen");
          CHECK_MSG(back[i] == patterns[i], ctx + " round trip");
          CHECK_MSG(cross[i] == narrow(ref, other), ctx + " cross cast");
        }
      }
    }
  }
}

TEST(float_rounding_matches_reference) {
  std::vector<uint32_t> bits;
  // Edges: zeros, infinities, NaNs with payloads, ties (even and odd), subnormals of all three
  // formats, the largest finite values and their rounding boundaries.
  const uint32_t edges[] = {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u,
                            0xffc00001u, 0x7f800001u, 0x7fbfffffu, 0x00000001u, 0x807fffffu,
                            0x00008000u, 0x00018000u, 0x3f808000u, 0x3f818000u, 0x3f807fffu,
                            0x7f7fffffu, 0x7f7f8000u, 0x7f7f7fffu, 0x477fe000u, 0x477fefffu,
                            0x477ff000u, 0x477ff001u, 0x38800000u, 0x387fe000u, 0x33800000u,
                            0x33000000u, 0x33000001u, 0x337fffffu, 0x3f801000u, 0x3f803000u,
                            0x3f800fffu, 0xb3000000u, 0x387ff000u};
  bits.assign(std::begin(edges), std::end(edges));
  std::mt19937 rng(99);
  for (int i = 0; i < 1 << 20; ++i) bits.push_back(static_cast<uint32_t>(rng()));
  // Values near 1 and in half's range, with low bits exactly at ties.
  for (int i = 0; i < 1 << 16; ++i) {
    const uint32_t exponent = 100u + rng() % 50u;
    bits.push_back((rng() & 0x80000000u) | (exponent << 23) | (rng() & 0x7fe000u) | 0x1000u);
    bits.push_back((rng() & 0x80000000u) | (exponent << 23) | (rng() & 0x7f0000u) | 0x8000u);
  }
  const int64_t n = static_cast<int64_t>(bits.size());
  std::vector<float> values(bits.size());
  std::memcpy(values.data(), bits.data(), bits.size() * 4);
  std::vector<uint16_t> out(bits.size());
  for (SimdLevel level : available_levels()) {
    set_simd_level(level);
    for (DType d : {DType::bf16, DType::f16}) {
      cast(values.data() + 1, DType::f32, out.data() + 1, d, n - 1);  // unaligned on purpose
      cast(values.data(), DType::f32, out.data(), d, 1);
      for (int64_t i = 0; i < n; ++i) {
        const std::string ctx = std::string(simd_level_name(level)) + " " + dtype_name(d) +
                                " bits " + std::to_string(bits[i]);
        if (std::isnan(values[i])) {
          CHECK_MSG(std::isnan(widen(out[i], d)) && (out[i] & 0x8000u) == ((bits[i] >> 16) & 0x8000u), ctx);
        } else {
          CHECK_MSG(out[i] == narrow(values[i], d), ctx);
        }
      }
    }
  }
}

TEST(scale_matches_float_multiply) {
  for (SimdLevel level : available_levels()) {
    set_simd_level(level);
    for (DType d : kDTypes)
      for (int64_t n : {int64_t{0}, int64_t{33}, int64_t{5003}}) {
        TypedBuffer x(d, n, 1);
        const auto v = uniform(n, -3, 3, 12);
        for (int64_t i = 0; i < n; ++i) x.set(i, v[i]);
        std::vector<float> before(n);
        for (int64_t i = 0; i < n; ++i) before[i] = x.get(i);
        scale(x.data(), d, n, 0.375f);
        for (int64_t i = 0; i < n; ++i) {
          const float expect = before[i] * 0.375f;
          const float got = x.get(i);
          CHECK_MSG(d == DType::f32 ? got == expect : got == widen(narrow(expect, d), d),
                    where(level, n, i, d, "scale"));
        }
      }
  }
}

TEST(l2_norm_is_accurate) {
  const int64_t n = 10000000;
  const auto x = uniform(n, -1, 1, 13);
  double exact = 0.0;
  for (float v : x) exact += static_cast<double>(v) * v;
  TypedBuffer half(DType::f16, n, 0), bf(DType::bf16, n, 0);
  double exact_half = 0.0, exact_bf = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    half.set(i, x[i]);
    bf.set(i, x[i]);
    exact_half += static_cast<double>(half.get(i)) * half.get(i);
    exact_bf += static_cast<double>(bf.get(i)) * bf.get(i);
  }
  for (SimdLevel level : available_levels()) {
    set_simd_level(level);
    const std::string ctx = simd_level_name(level);
    const NormResult r = l2_norm_sq(x.data(), DType::f32, n);
    CHECK_MSG(!r.nonfinite && std::fabs(r.sum_sq - exact) <= 1e-6 * exact,
              ctx + " got " + std::to_string(r.sum_sq) + " exact " + std::to_string(exact));
    CHECK_MSG(std::fabs(l2_norm_sq(half.data(), DType::f16, n).sum_sq - exact_half) <= 1e-6 * exact_half, ctx);
    CHECK_MSG(std::fabs(l2_norm_sq(bf.data(), DType::bf16, n).sum_sq - exact_bf) <= 1e-6 * exact_bf, ctx);
    CHECK(l2_norm_sq(x.data(), DType::f32, 0).sum_sq == 0.0f);
    CHECK(std::fabs(l2_norm_sq(x.data() + 1, DType::f32, 17).sum_sq - [&] {
            double s = 0;
            for (int i = 1; i < 18; ++i) s += static_cast<double>(x[i]) * x[i];
            return s;
          }()) <= 1e-6);
  }
}

TEST(results_identical_across_thread_counts) {
  const int64_t n = 300007;
  const auto x = uniform(n, -1, 1, 14);
  const int saved = num_threads();
  for (SimdLevel level : available_levels()) {
    set_simd_level(level);
    std::vector<float> first_p;
    float first_norm = 0;
    for (int threads = 1; threads <= 4; ++threads) {
      set_num_threads(threads);
      CHECK(num_threads() == threads);
      std::vector<float> p = uniform(n, -1, 1, 15), m(n, 0.0f), v(n, 0.0f);
      AdamConfig cfg;
      CHECK(!adam_step(p.data(), x.data(), DType::f32, m.data(), v.data(), nullptr, nullptr,
                       DType::bf16, n, cfg));
      const float norm = l2_norm_sq(x.data(), DType::f32, n).sum_sq;
      if (threads == 1) {
        first_p = p;
        first_norm = norm;
      } else {
        CHECK_MSG(p == first_p, std::string(simd_level_name(level)) + " threads " + std::to_string(threads));
        CHECK_MSG(zs_ref::bits_of(norm) == zs_ref::bits_of(first_norm),
                  std::string(simd_level_name(level)) + " norm threads " + std::to_string(threads));
      }
    }
  }
  set_num_threads(saved);
}

TEST(every_path_matches_scalar_bitwise) {
  // Same rounding everywhere (no FMA contraction): the wide paths must equal the scalar one.
  const int64_t n = 4099;
  const auto levels = available_levels();
  std::vector<std::vector<float>> results;
  for (SimdLevel level : levels) {
    set_simd_level(level);
    std::vector<float> p = uniform(n, -1, 1, 16), m = uniform(n, -1, 1, 17), v = uniform(n, 0, 1, 18);
    TypedBuffer g(DType::bf16, n, 0);
    const auto gv = uniform(n, -1, 1, 19);
    for (int64_t i = 0; i < n; ++i) g.set(i, gv[i]);
    AdamConfig cfg;
    cfg.weight_decay = 0.01f, cfg.step = 7, cfg.grad_scale = 3.0f;
    std::vector<float> vmax = uniform(n, 0, 1, 20);
    cfg.amsgrad = true, cfg.maximize = true;
    adam_step(p.data(), g.data(), DType::bf16, m.data(), v.data(), vmax.data(), nullptr,
              DType::bf16, n, cfg);
    p.insert(p.end(), m.begin(), m.end());
    p.insert(p.end(), v.begin(), v.end());
    p.insert(p.end(), vmax.begin(), vmax.end());
    results.push_back(p);
  }
  for (std::size_t k = 1; k < results.size(); ++k)
    CHECK_MSG(results[k] == results[0], simd_level_name(levels[k]));
}

// Copies of 1 << 20 elements and more are written with non-temporal stores (after a lane-by-lane
// head up to the vector alignment): on every path, at any offset, with several chunks per
// thread, the copy must still be exactly the rounded param and the params equal the scalar path.
TEST(streamed_param_copy_is_exact) {
  const int64_t n = (int64_t{1} << 20) + 37;
  const int saved = num_threads();
  set_num_threads(3);
  for (DType copy_dtype : {DType::bf16, DType::f16})
    for (int64_t offset : {0, 1, 3}) {
      std::vector<float> first_p;
      for (SimdLevel level : available_levels()) {
        set_simd_level(level);
        std::vector<float> p = uniform(n, -1, 1, 21), m = uniform(n, -0.1f, 0.1f, 22),
                           v = uniform(n, 0, 0.01f, 23), g = uniform(n, -1, 1, 24);
        TypedBuffer copy(copy_dtype, n, offset);
        std::fill(copy.storage.begin(), copy.storage.end(), 0xa5a5a5a5u);
        AdamConfig cfg;
        cfg.weight_decay = 0.1f, cfg.step = 3, cfg.check_finite = false;
        CHECK(!adam_step(p.data(), g.data(), DType::f32, m.data(), v.data(), nullptr, copy.data(),
                         copy_dtype, n, cfg));
        bool exact = true;
        for (int64_t i = 0; i < n; ++i)
          exact = exact && static_cast<uint16_t*>(copy.data())[i] == narrow(p[i], copy_dtype);
        const std::string ctx = std::string(simd_level_name(level)) + " " + dtype_name(copy_dtype) +
                                " offset " + std::to_string(offset);
        CHECK_MSG(exact, ctx);
        if (first_p.empty()) first_p = p;
        else CHECK_MSG(p == first_p, ctx + " params differ from the first path");
      }
    }
  set_num_threads(saved);
}

TEST(adam_matches_torch_two_divisions_bitwise) {
  // The kernels divide by sqrt(1 - beta2^step) with a reciprocal and one FMA correction; that
  // must round exactly as torch's (and the CUDA kernel's) true division. Second moments spread
  // over 2^-120 .. 2^60 (every mantissa pattern of sqrt(v) gets many tries), several beta2 and
  // steps, and an inf moment (torch: denom inf, update 0).
  const int64_t n = 1 << 16;
  std::mt19937 rng(123);
  std::uniform_real_distribution<float> unit(1.0f, 2.0f);
  std::uniform_int_distribution<int> exponent(-120, 60);
  for (SimdLevel level : available_levels()) {
    set_simd_level(level);
    for (double beta2 : {0.95, 0.999, 0.99999}) {
      for (int64_t step : {1, 2, 3, 10, 77, 1000, 100000}) {
        std::vector<float> v(n), m(n), p(n), g(n);
        for (int64_t i = 0; i < n; ++i) {
          v[i] = std::ldexp(unit(rng), exponent(rng));
          m[i] = unit(rng) - 1.5f, p[i] = unit(rng), g[i] = 0.0f;
        }
        v[5] = INFINITY;
        AdamConfig cfg;
        cfg.lr = 1e-3, cfg.beta1 = 0.9, cfg.beta2 = beta2, cfg.eps = 1e-8, cfg.step = step;
        cfg.weight_decay = 0.0, cfg.check_finite = false;
        const AdamScalars s = adam_scalars(cfg);
        std::vector<float> want_p(p);
        for (int64_t i = 0; i < n; ++i) {  // torch's fused CPU AdamW, in the kernel's op order
          const float mi = std::fma(s.one_minus_beta1, 0.0f - m[i], m[i]);
          const float vi = std::fma(s.one_minus_beta2, 0.0f, s.beta2 * v[i]);
          const float denom = std::sqrt(vi) / s.bias_correction2_sqrt + s.eps;
          want_p[i] = p[i] - s.step_size * (mi / denom);
        }
        adam_step(p.data(), g.data(), DType::f32, m.data(), v.data(), nullptr, nullptr,
                  DType::bf16, n, cfg);
        int64_t off = 0;
        for (int64_t i = 0; i < n; ++i) off += std::memcmp(&p[i], &want_p[i], 4) != 0;
        CHECK_MSG(off == 0, std::string(simd_level_name(level)) + " beta2 " +
                                std::to_string(beta2) + " step " + std::to_string(step) + ": " +
                                std::to_string(off) + " params differ");
      }
    }
  }
}

// What parallel_for promises on any path (the pool, an OpenMP team) at `threads` threads:
// every index exactly once, a task's exception rethrown to the caller, usable afterwards, and
// nested calls without deadlock.
static void check_parallel_for_contract(int threads) {
  const int64_t n = 100003;
  std::vector<std::atomic<int>> hits(n);
  parallel_for(n, 7, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
  });
  bool once = true;
  for (auto& h : hits) once = once && h.load() == 1;
  CHECK_MSG(once, "threads " + std::to_string(threads));
  bool caught = false;
  try {
    parallel_for(n, 1, [&](int64_t b, int64_t e) {
      if (b <= n / 2 && n / 2 < e) throw std::runtime_error("boom");
    });
  } catch (const std::runtime_error& e) {
    caught = std::string(e.what()) == "boom";
  }
  CHECK_MSG(caught, "threads " + std::to_string(threads));
  std::atomic<int64_t> total{0};
  parallel_for(1000, 1, [&](int64_t b, int64_t e) {
    parallel_for(e - b, 1, [&](int64_t ib, int64_t ie) { total.fetch_add(ie - ib); });
  });
  CHECK(total.load() == 1000);
}

TEST(thread_pool_covers_range_and_propagates_exceptions) {
  const int saved = num_threads();
  for (int threads = 1; threads <= 4; ++threads) {
    set_num_threads(threads);
    check_parallel_for_contract(threads);
  }
  CHECK_THROWS(InvalidArgument, set_num_threads(0));
  set_num_threads(saved);
}

// Regression: workers created by a resize once took the last finished job for a new one, so a
// later parallel_for could return before its tasks ran (or hang). Resize in every order and
// check each call's work is complete when it returns.
TEST(thread_pool_resizes_without_losing_tasks) {
  const int saved = num_threads();
  const int orders[] = {1, 2, 3, 4, 3, 1, 4, 2, 2, 1};
  for (int round = 0; round < 200; ++round) {
    for (int threads : orders) {
      set_num_threads(threads);
      // Two calls per size, as a kernel does (finite check, then step): the first after a
      // resize is where stale workers used to strike.
      for (int call = 0; call < 2; ++call) {
        const int64_t n = 256;
        std::vector<std::atomic<int>> hits(n);
        parallel_for(n, 1, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
        });
        bool once = true;
        for (auto& h : hits) once = once && h.load() == 1;
        CHECK_MSG(once, "round " + std::to_string(round) + ", threads " + std::to_string(threads));
      }
    }
  }
  set_num_threads(saved);
}

TEST(bad_arguments_throw) {
  float x = 0;
  AdamConfig cfg;
  CHECK_THROWS(InvalidArgument, adam_step(&x, &x, DType::f32, &x, &x, nullptr, nullptr, DType::bf16, -1, cfg));
  CHECK_THROWS(InvalidArgument, adam_step(nullptr, &x, DType::f32, &x, &x, nullptr, nullptr, DType::bf16, 1, cfg));
  CHECK_THROWS(InvalidArgument, adam_step(&x, &x, DType::f32, &x, &x, nullptr, &x, DType::f32, 1, cfg));
  // max_exp_avg_sq exactly when amsgrad: either mismatch is refused before anything is written.
  CHECK_THROWS(InvalidArgument, adam_step(&x, &x, DType::f32, &x, &x, &x, nullptr, DType::bf16, 1, cfg));
  cfg.amsgrad = true;
  CHECK_THROWS(InvalidArgument, adam_step(&x, &x, DType::f32, &x, &x, nullptr, nullptr, DType::bf16, 1, cfg));
  CHECK(x == 0);
  cfg.amsgrad = false;
  cfg.lr = -1;
  CHECK_THROWS(InvalidArgument, adam_step(&x, &x, DType::f32, &x, &x, nullptr, nullptr, DType::bf16, 1, cfg));
  SgdConfig scfg;
  scfg.momentum = 0.9f;
  CHECK_THROWS(InvalidArgument, sgd_step(&x, &x, DType::f32, nullptr, nullptr, DType::bf16, 1, scfg));
  CHECK_THROWS(InvalidArgument, l2_norm_sq(nullptr, DType::f32, 3));
  CHECK_THROWS(InvalidArgument, cast(&x, DType::f32, nullptr, DType::bf16, 1));
  // Zero-size calls accept null pointers.
  CHECK(!adam_step(nullptr, nullptr, DType::f32, nullptr, nullptr, nullptr, nullptr, DType::bf16, 0, AdamConfig{}));
}

// Once the process has libgomp loaded (as torch loads it), parallel_for runs on the OpenMP team
// instead of the pool. Last test on purpose: from here on every call takes that path. The same
// guarantees hold there: full coverage, exceptions rethrown, nesting, thread-count-free results.
TEST(openmp_team_runs_parallel_for_like_the_pool) {
  const int saved = num_threads();
  const int64_t n = 300007;
  set_num_threads(1);
  std::vector<float> p1 = uniform(n, -1, 1, 30), m1(n, 0.0f), v1(n, 0.0f);
  const auto g = uniform(n, -1, 1, 31);
  AdamConfig cfg;
  CHECK(!adam_step(p1.data(), g.data(), DType::f32, m1.data(), v1.data(), nullptr, nullptr,
                   DType::bf16, n, cfg));
  if (dlopen("libgomp.so.1", RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::printf("skip openmp_team_runs_parallel_for_like_the_pool: no libgomp.so.1\n");
    set_num_threads(saved);
    return;
  }
  for (int threads = 1; threads <= 4; ++threads) {
    set_num_threads(threads);
    check_parallel_for_contract(threads);
    if (threads > 1)  // one thread runs inline, outside any task
      CHECK_THROWS(InvalidArgument, parallel_for(4, 1, [&](int64_t, int64_t) { set_num_threads(2); }));
    std::vector<float> p = uniform(n, -1, 1, 30), m(n, 0.0f), v(n, 0.0f);
    CHECK(!adam_step(p.data(), g.data(), DType::f32, m.data(), v.data(), nullptr, nullptr,
                     DType::bf16, n, cfg));
    CHECK_MSG(p == p1 && m == m1 && v == v1, "adam on the OpenMP team, threads " + std::to_string(threads));
  }
  set_num_threads(saved);
}

int main() { return zs_test::run_tests(); }
