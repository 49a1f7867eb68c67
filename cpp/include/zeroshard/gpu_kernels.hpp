// The GPU kernels' C++ API. Declared in every build; in the CPU variant each function throws
// Error("zeroshard was built without CUDA ..."). This header includes no CUDA header: streams are
// passed as opaque pointers (a cudaStream_t), device pointers as plain pointers.
//
// No function here synchronises with the host. Non-finite detection goes through a device int32
// flag (`found_inf`, 0 = clean) that the step kernels read themselves, so a skipped step costs no
// round trip; the caller reads the flag only if and when it wants to.
#pragma once

#include <cstdint>
#include <string>

#include "zeroshard/dtype.hpp"
#include "zeroshard/optim_config.hpp"

namespace zeroshard::gpu {

using Stream = void*;  // cudaStream_t

bool built_with_cuda();
int device_count();                  // 0 when there is no driver or no device; never throws
std::string device_name(int device);  // throws when the device does not exist

// Page-locks the host range [ptr, ptr + bytes) for asynchronous copies (cudaHostRegister); the
// range must not overlap one already registered. host_unregister takes the same ptr.
void host_register(void* ptr, int64_t bytes);
void host_unregister(void* ptr);

// Sets *found_inf to 1 (never back to 0) when any of x[0..n) is inf or NaN.
void check_finite(const void* x, DType dtype, int64_t n, int32_t* found_inf, Stream stream);

// Fused Adam/AdamW over flat buffers (see cpu_kernels.hpp for the element types). When
// cfg.check_finite, first ORs the gradient's finiteness into *found_inf (required then). The
// step kernel returns without writing anything when found_inf is given and *found_inf != 0, so
// one flag can guard several buffers: check them all, then step them all. `max_exp_avg_sq` as
// in cpu::adam_step (required exactly when cfg.amsgrad).
void adam_step(float* param, const void* grad, DType grad_dtype, float* exp_avg,
               float* exp_avg_sq, float* max_exp_avg_sq, void* param_copy, DType copy_dtype,
               int64_t n, const AdamConfig& cfg, int32_t* found_inf, Stream stream);

void sgd_step(float* param, const void* grad, DType grad_dtype, float* momentum_buffer,
              void* param_copy, DType copy_dtype, int64_t n, const SgdConfig& cfg,
              int32_t* found_inf, Stream stream);

// Deterministic squared L2 norm: fp32 chunk sums added in double in a fixed order, the same
// bits for the same input on GPUs of one SM count ([Note: norm determinism], norm_kernel.cu).
// `workspace` is device memory of l2_norm_workspace_bytes(); *out receives the fp32
// result; *nonfinite (optional) is set to 1 when an element is inf/NaN.
int64_t l2_norm_workspace_bytes();
void l2_norm_sq(const void* x, DType dtype, int64_t n, float* out, int32_t* nonfinite,
                void* workspace, Stream stream);

void scale(void* x, DType dtype, int64_t n, float factor, Stream stream);
void cast(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n,
          Stream stream);

// Block quantization, bit for bit the CPU's (cpu_kernels.hpp's [Note: block quantization]).
// dequantize with accumulate (out_dtype f32): out += q * scale, else out = q * scale.
void quantize(const void* x, DType dtype, int64_t n, int bits, int64_t block, int8_t* q,
              float* scales, Stream stream);
void dequantize(const int8_t* q, const float* scales, int64_t n, int bits, int64_t block,
                void* out, DType out_dtype, bool accumulate, Stream stream);

}  // namespace zeroshard::gpu
