// Targets other than x86-64 build only the scalar path: the wide paths report "not built".
#include "kernel_table.hpp"

namespace zeroshard::cpu {
const KernelTable* avx2_kernels() { return nullptr; }
const KernelTable* avx512_kernels() { return nullptr; }
}  // namespace zeroshard::cpu
