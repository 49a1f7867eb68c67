// Hyper-parameters of one optimizer step, shared by the CPU and CUDA kernels, and the scalars
// derived from them once per step (bias corrections) so both back ends compute identical values.
#pragma once

#include <cstdint>

namespace zeroshard {

// torch.optim.Adam / AdamW semantics. `step` is the step number after increment (1 first).
// Hyper-parameters are double, as Python floats are: 1 - beta2 computed from a float beta2 of
// 0.999 is off by 1.3e-5 relative, which would show in exp_avg_sq against torch.
struct AdamConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  int64_t step = 1;
  bool decoupled = true;     // true: AdamW (param *= 1 - lr*wd); false: Adam (grad += wd*param)
  bool amsgrad = false;      // keep max(exp_avg_sq) over steps and divide by its root instead
  bool maximize = false;     // ascend: the gradient is negated before anything else
  double grad_scale = 1.0;   // the gradient is divided by this (loss scale, clip factor)
  bool check_finite = true;  // false: the caller already knows the gradient is finite
};

// torch.optim.SGD semantics. `first_step` initialises the momentum buffer to the gradient.
struct SgdConfig {
  double lr = 1e-3;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
  bool first_step = true;
  bool maximize = false;  // ascend: the gradient is negated before weight decay and momentum
  double grad_scale = 1.0;
  bool check_finite = true;
};

// Per-step scalars in the form the kernels use. Computed in double, as torch does.
struct AdamScalars {
  float lr, beta1, beta2, eps, weight_decay;
  float one_minus_beta1, one_minus_beta2;
  float step_size;            // lr / (1 - beta1^step)
  float bias_correction2_sqrt; // sqrt(1 - beta2^step)
  float decay_factor;         // 1 - lr*wd for decoupled decay, else 1
  // The gradient is multiplied by this: 1/grad_scale, negated when maximizing. Negation is
  // exact, so folding it in gives torch's -grad bit for bit at no cost.
  float grad_factor;
  bool decoupled, amsgrad;
};

struct SgdScalars {
  float lr, momentum, dampening_complement, weight_decay;
  float grad_factor;  // as in AdamScalars: +-1/grad_scale

  bool nesterov, first_step;
};

// Throws InvalidArgument naming the bad field (e.g. "lr must be >= 0").
void validate(const AdamConfig& cfg);
void validate(const SgdConfig& cfg);
// max_exp_avg_sq must be non-null (for n > 0) exactly when cfg.amsgrad: a buffer without the
// flag, or the flag without a buffer, means the caller's state and hyper-parameters disagree.
void require_amsgrad_buffer(const AdamConfig& cfg, const float* max_exp_avg_sq, int64_t n);
AdamScalars adam_scalars(const AdamConfig& cfg);
SgdScalars sgd_scalars(const SgdConfig& cfg);

}  // namespace zeroshard
