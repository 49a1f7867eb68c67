// The AVX-512 (F/BW/VL/DQ) path. cpp/CMakeLists.txt compiles only this file with those flags;
// cpu_runtime.cpp calls avx512_kernels()'s entries only after __builtin_cpu_supports confirmed
// them. Same ODR discipline as kernels_avx2.cpp: everything here has internal linkage.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernel_table.hpp"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernels_avx512.cpp must be compiled with the AVX-512 flags (see cpp/CMakeLists.txt)"
#endif

// GCC 12 flags _mm512_cvtps_ph's deliberately undefined pass-through operand (a false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace zeroshard::cpu {
namespace simd_avx512 {
namespace {
#include "vec_scalar.hpp"
#include "vec_avx512.hpp"
using Vec = Avx512Vec;
#include "kernels.inl"
}  // namespace
}  // namespace simd_avx512

const KernelTable* avx512_kernels() { return &simd_avx512::kTable; }

}  // namespace zeroshard::cpu
