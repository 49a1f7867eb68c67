// Chunk access: how a thread reads and writes kChunk consecutive elements of a flat buffer as
// floats, for each element type. The vector form moves 16 bytes per access (one uint4 for 8
// 16-bit values, two float4 for 8 floats) and needs 16-byte aligned base pointers; the scalar
// form works at any alignment. Both compute on the same chunk, so results never depend on which
// was used. Owns: element conversions on the device (round-to-nearest-even on narrowing).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "zeroshard/dtype.hpp"

namespace zeroshard::gpu::detail {

constexpr int kChunk = 8;  // elements per thread per loop step

template <DType D>
struct Element {
  using Storage = uint16_t;  // bf16 / fp16 bits
};
template <>
struct Element<DType::f32> {
  using Storage = float;
};

template <DType D>
__device__ __forceinline__ float to_float(typename Element<D>::Storage x) {
  if constexpr (D == DType::f32) return x;
  else if constexpr (D == DType::bf16) return __uint_as_float(static_cast<uint32_t>(x) << 16);
  else return __half2float(__ushort_as_half(x));
}

// RNE, overflow to inf, NaN stays NaN (its payload may differ from the CPU kernels' NaN).
template <DType D>
__device__ __forceinline__ typename Element<D>::Storage from_float(float f) {
  if constexpr (D == DType::f32) return f;
  else if constexpr (D == DType::bf16) return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  else return __half_as_ushort(__float2half_rn(f));
}

__host__ __device__ inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

template <DType D, bool Vec, class Index>
__device__ __forceinline__ void load_chunk(const void* base, Index first, float (&out)[kChunk]) {
  using S = typename Element<D>::Storage;
  const S* p = static_cast<const S*>(base) + first;
  if constexpr (Vec && D == DType::f32) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
  } else if constexpr (Vec) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {  // little endian: the lower half is the earlier element
      out[2 * w] = to_float<D>(static_cast<uint16_t>(words[w] & 0xffffu));
      out[2 * w + 1] = to_float<D>(static_cast<uint16_t>(words[w] >> 16));
    }
  } else {
#pragma unroll
    for (int k = 0; k < kChunk; ++k) out[k] = to_float<D>(p[k]);
  }
}

template <DType D, bool Vec, class Index>
__device__ __forceinline__ void store_chunk(void* base, Index first, const float (&in)[kChunk]) {
  using S = typename Element<D>::Storage;
  S* p = static_cast<S*>(base) + first;
  if constexpr (Vec && D == DType::f32) {
    reinterpret_cast<float4*>(p)[0] = make_float4(in[0], in[1], in[2], in[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(in[4], in[5], in[6], in[7]);
  } else if constexpr (Vec) {
    uint32_t words[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      words[w] = static_cast<uint32_t>(from_float<D>(in[2 * w])) |
                 (static_cast<uint32_t>(from_float<D>(in[2 * w + 1])) << 16);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(words[0], words[1], words[2], words[3]);
  } else {
#pragma unroll
    for (int k = 0; k < kChunk; ++k) p[k] = from_float<D>(in[k]);
  }
}

template <DType D, class Index>
__device__ __forceinline__ float load_one(const void* base, Index i) {
  return to_float<D>(static_cast<const typename Element<D>::Storage*>(base)[i]);
}

template <DType D, class Index>
__device__ __forceinline__ void store_one(void* base, Index i, float v) {
  static_cast<typename Element<D>::Storage*>(base)[i] = from_float<D>(v);
}

}  // namespace zeroshard::gpu::detail
