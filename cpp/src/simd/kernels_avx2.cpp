// The AVX2 + FMA + F16C path. cpp/CMakeLists.txt compiles only this file with those flags; the
// rest of the library stays baseline x86-64, and cpu_runtime.cpp calls avx2_kernels()'s entries
// only after __builtin_cpu_supports confirmed the instructions.
// ODR: the vector type and kernels have internal linkage (anonymous namespace), and no <cmath>
// or other header inline is used here, so no AVX2-compiled copy can stand in for another TU's.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernel_table.hpp"

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernels_avx2.cpp must be compiled with -mavx2 -mfma -mf16c (see cpp/CMakeLists.txt)"
#endif

namespace zeroshard::cpu {
namespace simd_avx2 {
namespace {
#include "vec_scalar.hpp"
#include "vec_avx2.hpp"
using Vec = Avx2Vec;
#include "kernels.inl"
}  // namespace
}  // namespace simd_avx2

const KernelTable* avx2_kernels() { return &simd_avx2::kTable; }

}  // namespace zeroshard::cpu
