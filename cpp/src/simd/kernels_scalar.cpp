// The portable path: built with the compiler's baseline flags, used on any CPU.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernel_table.hpp"

namespace zeroshard::cpu {
namespace simd_scalar {
#include "vec_scalar.hpp"
using Vec = ScalarVec;
#include "kernels.inl"
}  // namespace simd_scalar

const KernelTable& scalar_kernels() { return simd_scalar::kTable; }

}  // namespace zeroshard::cpu
