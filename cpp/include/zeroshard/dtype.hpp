// DType: the element types the core's buffers hold, and their sizes and names.
// Owns: the numbering shared with the Python bindings (keep in sync with zeroshard/ops.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace zeroshard {

enum class DType : int32_t { f32 = 0, bf16 = 1, f16 = 2 };

inline std::size_t dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::bf16: return "bfloat16";
    case DType::f16: return "float16";
  }
  return "unknown";
}

inline bool is_valid_dtype(int32_t code) { return code >= 0 && code <= 2; }

}  // namespace zeroshard
