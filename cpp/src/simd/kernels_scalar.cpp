// The portable path: built with the compiler's baseline flags, used on any CPU.
// Everything sits in an anonymous namespace so no copy of it can be merged with a wider path's.
#include <cstdint>
#include <cstring>

#include "kernel_table.hpp"

namespace zeroshard::cpu {
namespace simd_scalar {
namespace {
#include "vec_scalar.hpp"
using Vec = ScalarVec;
#include "kernels.inl"
}  // namespace
}  // namespace simd_scalar

const KernelTable& scalar_kernels() { return simd_scalar::kTable; }

}  // namespace zeroshard::cpu
