// Hyper-parameters of one optimizer step, shared by the CPU and CUDA kernels, and the scalars
// derived from them once per step (bias corrections) so both back ends compute identical values.
#pragma once

#include <cstdint>

namespace zeroshard {

// torch.optim.Adam / AdamW semantics. `step` is the step number after increment (1 first).
struct AdamConfig {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  int64_t step = 1;
  bool decoupled = true;     // true: AdamW (param *= 1 - lr*wd); false: Adam (grad += wd*param)
  float grad_scale = 1.0f;   // the gradient is divided by this (loss scale, clip factor)
  bool check_finite = true;  // false: the caller already knows the gradient is finite
};

// torch.optim.SGD semantics. `first_step` initialises the momentum buffer to the gradient.
struct SgdConfig {
  float lr = 1e-3f;
  float momentum = 0.0f;
  float dampening = 0.0f;
  float weight_decay = 0.0f;
  bool nesterov = false;
  bool first_step = true;
  float grad_scale = 1.0f;
  bool check_finite = true;
};

// Per-step scalars in the form the kernels use. Computed in double, as torch does.
struct AdamScalars {
  float lr, beta1, beta2, eps, weight_decay;
  float one_minus_beta1, one_minus_beta2;
  float step_size;            // lr / (1 - beta1^step)
  float bias_correction2_sqrt; // sqrt(1 - beta2^step)
  float decay_factor;         // 1 - lr*wd for decoupled decay, else 1
  float inv_grad_scale;
  bool decoupled;
};

// Throws InvalidArgument naming the bad field (e.g. "lr must be >= 0").
void validate(const AdamConfig& cfg);
void validate(const SgdConfig& cfg);
AdamScalars adam_scalars(const AdamConfig& cfg);

}  // namespace zeroshard
