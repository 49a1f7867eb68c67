// The unvalidated launcher of the finiteness check, shared by check_finite() and the fused
// step entry points (which validate their own arguments first).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "zeroshard/dtype.hpp"

namespace zeroshard::gpu::detail {

void launch_check_finite(const void* x, DType dtype, int64_t n, int32_t* found_inf,
                         cudaStream_t stream);

}  // namespace zeroshard::gpu::detail
