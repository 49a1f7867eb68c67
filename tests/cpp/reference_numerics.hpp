// Independent references for the kernel tests: half/bfloat16 conversions written with double
// arithmetic and nearbyint (no bit tricks shared with the kernels), and torch.optim's Adam,
// AdamW and SGD update rules evaluated in double.
#pragma once

#include <algorithm>
#include <cfenv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace zs_ref {

inline float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// bfloat16 is the high half of a float by definition.
inline float bf16_to_float(uint16_t h) { return float_from_bits(static_cast<uint32_t>(h) << 16); }

inline float f16_to_float(uint16_t h) {
  const bool negative = (h & 0x8000u) != 0;
  const int exponent = (h >> 10) & 0x1f;
  const int mantissa = h & 0x3ff;
  double value;
  if (exponent == 0x1f) {
    value = mantissa == 0 ? std::numeric_limits<double>::infinity()
                          : std::numeric_limits<double>::quiet_NaN();
  } else if (exponent == 0) {
    value = std::ldexp(static_cast<double>(mantissa), -24);
  } else {
    value = std::ldexp(static_cast<double>(1024 + mantissa), exponent - 25);
  }
  return static_cast<float>(negative ? -value : value);
}

// Rounds |x| to a multiple of `quantum` (a power of two), ties to even: exact in double.
inline double round_to_quantum(double magnitude, double quantum) {
  return std::nearbyint(magnitude / quantum) * quantum;  // default rounding mode: to even
}

inline uint16_t float_to_f16(float x) {
  const uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
  if (std::isnan(x)) return sign | 0x7e00u;
  const double a = std::fabs(static_cast<double>(x));
  const double smallest_normal = std::ldexp(1.0, -14);
  int exp2 = 0;
  std::frexp(a, &exp2);  // a = f * 2^exp2, f in [0.5, 1)
  const double quantum = a < smallest_normal ? std::ldexp(1.0, -24) : std::ldexp(1.0, exp2 - 11);
  const double r = round_to_quantum(a, quantum);
  if (r > 65504.0) return sign | 0x7c00u;  // overflow (inf input included)
  if (r < smallest_normal) return sign | static_cast<uint16_t>(r / std::ldexp(1.0, -24));
  std::frexp(r, &exp2);
  const double mantissa = r / std::ldexp(1.0, exp2 - 1) - 1.0;  // in [0, 1)
  return sign | static_cast<uint16_t>(((exp2 - 1 + 15) << 10) | static_cast<int>(mantissa * 1024.0));
}

inline uint16_t float_to_bf16(float x) {
  const uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
  if (std::isnan(x)) return static_cast<uint16_t>(bits_of(x) >> 16) | 0x40u;
  const double a = std::fabs(static_cast<double>(x));
  if (std::isinf(a)) return sign | 0x7f80u;
  int exp2 = 0;
  std::frexp(a, &exp2);
  const double smallest_normal = std::ldexp(1.0, -126);
  const double quantum = a < smallest_normal ? std::ldexp(1.0, -133) : std::ldexp(1.0, exp2 - 8);
  const double r = round_to_quantum(a, quantum);
  if (r >= std::ldexp(1.0, 128)) return sign | 0x7f80u;
  return sign | static_cast<uint16_t>(bits_of(static_cast<float>(r)) >> 16);  // r is a bf16 value
}

struct AdamParams {
  double lr, beta1, beta2, eps, weight_decay, grad_scale;
  int64_t step;
  bool decoupled;
  bool amsgrad = false;
  bool maximize = false;
};

struct AdamState {
  double param, exp_avg, exp_avg_sq;
  double max_exp_avg_sq = 0.0;  // AMSGrad only
};

// One torch.optim.Adam/AdamW element update, in double (torch/optim/adam.py,
// _single_tensor_adam: negate for maximize first; AMSGrad takes the max after updating v).
inline AdamState adam_reference(const AdamParams& h, double param, double grad, double exp_avg,
                                double exp_avg_sq, double max_exp_avg_sq = 0.0) {
  double g = (h.maximize ? -grad : grad) / h.grad_scale;
  if (h.weight_decay != 0.0) {
    if (h.decoupled) param *= 1.0 - h.lr * h.weight_decay;
    else g += h.weight_decay * param;
  }
  exp_avg += (1.0 - h.beta1) * (g - exp_avg);
  exp_avg_sq = h.beta2 * exp_avg_sq + (1.0 - h.beta2) * g * g;
  const double bias_correction1 = 1.0 - std::pow(h.beta1, static_cast<double>(h.step));
  const double bias_correction2 = 1.0 - std::pow(h.beta2, static_cast<double>(h.step));
  if (h.amsgrad) max_exp_avg_sq = std::max(max_exp_avg_sq, exp_avg_sq);
  const double second_moment = h.amsgrad ? max_exp_avg_sq : exp_avg_sq;
  const double denom = std::sqrt(second_moment) / std::sqrt(bias_correction2) + h.eps;
  param -= h.lr / bias_correction1 * exp_avg / denom;
  return {param, exp_avg, exp_avg_sq, max_exp_avg_sq};
}

struct SgdParams {
  double lr, momentum, dampening, weight_decay, grad_scale;
  bool nesterov, first_step;
  bool maximize = false;
};

// One torch.optim.SGD element update, in double; returns {param, momentum_buffer}.
inline AdamState sgd_reference(const SgdParams& h, double param, double grad, double buf) {
  double d = (h.maximize ? -grad : grad) / h.grad_scale;
  if (h.weight_decay != 0.0) d += h.weight_decay * param;
  if (h.momentum != 0.0) {
    buf = h.first_step ? d : h.momentum * buf + (1.0 - h.dampening) * d;
    d = h.nesterov ? d + h.momentum * buf : buf;
  }
  return {param - h.lr * d, buf, 0.0};
}

}  // namespace zs_ref
