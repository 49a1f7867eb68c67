#include "zeroshard/optim_config.hpp"

#include <cmath>
#include <string>

#include "zeroshard/error.hpp"

namespace zeroshard {
namespace {
void require_finite(double v, const char* name) {
  ZS_REQUIRE(std::isfinite(v), std::string(name) + " must be finite, got " + std::to_string(v));
}
}  // namespace

void validate(const AdamConfig& c) {
  require_finite(c.lr, "lr");
  ZS_REQUIRE(c.lr >= 0.0, "lr must be >= 0, got " + std::to_string(c.lr));
  ZS_REQUIRE(c.beta1 >= 0.0 && c.beta1 < 1.0,
             "betas[0] must be in [0, 1), got " + std::to_string(c.beta1));
  ZS_REQUIRE(c.beta2 >= 0.0 && c.beta2 < 1.0,
             "betas[1] must be in [0, 1), got " + std::to_string(c.beta2));
  ZS_REQUIRE(c.eps >= 0.0 && std::isfinite(c.eps), "eps must be finite and >= 0");
  ZS_REQUIRE(c.weight_decay >= 0.0 && std::isfinite(c.weight_decay),
             "weight_decay must be finite and >= 0, got " + std::to_string(c.weight_decay));
  ZS_REQUIRE(c.step >= 1, "step must be >= 1 (the step number after increment), got " +
                              std::to_string(c.step));
  ZS_REQUIRE(c.grad_scale > 0.0 && std::isfinite(c.grad_scale),
             "grad_scale must be finite and > 0, got " + std::to_string(c.grad_scale));
}

void validate(const SgdConfig& c) {
  require_finite(c.lr, "lr");
  ZS_REQUIRE(c.lr >= 0.0, "lr must be >= 0, got " + std::to_string(c.lr));
  ZS_REQUIRE(c.momentum >= 0.0 && std::isfinite(c.momentum), "momentum must be finite and >= 0");
  require_finite(c.dampening, "dampening");
  ZS_REQUIRE(c.weight_decay >= 0.0 && std::isfinite(c.weight_decay),
             "weight_decay must be finite and >= 0");
  ZS_REQUIRE(!c.nesterov || (c.momentum > 0.0 && c.dampening == 0.0),
             "nesterov requires momentum > 0 and dampening == 0");
  ZS_REQUIRE(c.grad_scale > 0.0 && std::isfinite(c.grad_scale),
             "grad_scale must be finite and > 0, got " + std::to_string(c.grad_scale));
}

void require_amsgrad_buffer(const AdamConfig& c, const float* max_exp_avg_sq, int64_t n) {
  if (c.amsgrad)
    ZS_REQUIRE(n == 0 || max_exp_avg_sq != nullptr,
               "amsgrad needs max_exp_avg_sq: pass a float32 buffer of n elements, zeroed "
               "before the first step");
  else
    ZS_REQUIRE(max_exp_avg_sq == nullptr,
               "max_exp_avg_sq was given but amsgrad is off: set amsgrad or pass no buffer");
}

AdamScalars adam_scalars(const AdamConfig& c) {
  const double step = static_cast<double>(c.step);
  const double bc1 = 1.0 - std::pow(static_cast<double>(c.beta1), step);
  const double bc2 = 1.0 - std::pow(static_cast<double>(c.beta2), step);
  AdamScalars s{};
  s.lr = static_cast<float>(c.lr);
  s.beta1 = static_cast<float>(c.beta1);
  s.beta2 = static_cast<float>(c.beta2);
  s.eps = static_cast<float>(c.eps);
  s.weight_decay = static_cast<float>(c.weight_decay);
  s.one_minus_beta1 = static_cast<float>(1.0 - c.beta1);
  s.one_minus_beta2 = static_cast<float>(1.0 - c.beta2);
  s.step_size = static_cast<float>(static_cast<double>(c.lr) / bc1);
  s.bias_correction2_sqrt = static_cast<float>(std::sqrt(bc2));
  s.decay_factor = c.decoupled ? static_cast<float>(1.0 - static_cast<double>(c.lr) *
                                                              static_cast<double>(c.weight_decay))
                               : 1.0;
  s.grad_factor = static_cast<float>((c.maximize ? -1.0 : 1.0) / c.grad_scale);
  s.decoupled = c.decoupled;
  s.amsgrad = c.amsgrad;
  return s;
}

SgdScalars sgd_scalars(const SgdConfig& c) {
  return SgdScalars{static_cast<float>(c.lr), static_cast<float>(c.momentum),
                    static_cast<float>(1.0 - c.dampening), static_cast<float>(c.weight_decay),
                    static_cast<float>((c.maximize ? -1.0 : 1.0) / c.grad_scale), c.nesterov,
                    c.first_step};
}

}  // namespace zeroshard
