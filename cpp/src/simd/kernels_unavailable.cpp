// Placeholder until the AVX2 / AVX-512 paths land: the build has only the scalar path.
#include "kernel_table.hpp"

namespace zeroshard::cpu {
const KernelTable* avx2_kernels() { return nullptr; }
const KernelTable* avx512_kernels() { return nullptr; }
}  // namespace zeroshard::cpu
