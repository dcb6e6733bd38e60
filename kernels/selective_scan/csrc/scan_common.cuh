// Device helpers shared by the forward and backward kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "scan.h"

namespace defmamba_scan {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 2^x on the special-function unit (relative error about 2^-22; flushes results below 2^-126 to 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// torch.nn.functional.softplus with beta=1, threshold=20.
__device__ __forceinline__ float softplus(float x) {
  return x > 20.f ? x : log1pf(__expf(x));
}

// d softplus / dx = sigmoid(x) (exactly 1 above the threshold, as in torch).
__device__ __forceinline__ float softplus_grad(float x) {
  if (x > 20.f) return 1.f;
  const float e = __expf(x);
  return __fdividef(e, 1.f + e);
}

// Read kChunk consecutive elements of a row into floats. `n` valid elements (the rest are 0);
// `vec` allows 16-byte loads (row start 16-byte aligned) when the chunk is full.
template <typename T>
__device__ __forceinline__ void load_chunk(const T *__restrict__ p, int n, bool vec, float (&out)[kChunk]) {
  if (vec && n == kChunk) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int v = 0; v < kChunk / kPer; ++v) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4 *>(p) + v);
      const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
      for (int i = 0; i < kPer; ++i) out[v * kPer + i] = to_float(e[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) out[i] = i < n ? to_float(p[i]) : 0.f;
  }
}

// Write the first `n` of kChunk floats to a row, converted to T.
template <typename T>
__device__ __forceinline__ void store_chunk(T *__restrict__ p, int n, bool vec, const float (&in)[kChunk]) {
  if (vec && n == kChunk) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int v = 0; v < kChunk / kPer; ++v) {
      uint4 raw;
      T *e = reinterpret_cast<T *>(&raw);
#pragma unroll
      for (int i = 0; i < kPer; ++i) e[i] = from_float<T>(in[v * kPer + i]);
      reinterpret_cast<uint4 *>(p)[v] = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
      if (i < n) p[i] = from_float<T>(in[i]);
  }
}

// Cooperative copy of one chunk of B and C (group k of batch b) into shared memory, transposed
// to [l][state] so a timestep's 16 states are one contiguous 64-byte row. Zeros past the end.
template <typename T>
__device__ __forceinline__ void stage_bc(const T *__restrict__ Bg, const T *__restrict__ Cg, int length,
                                         int l0, int n, float *__restrict__ sB, float *__restrict__ sC) {
  constexpr int kElems = 2 * kStates * kChunk;
  for (int e = threadIdx.x; e < kElems; e += blockDim.x) {
    const int l = e % kChunk;
    const int s = (e / kChunk) % kStates;
    const bool is_c = e >= kStates * kChunk;
    const T *src = is_c ? Cg : Bg;
    const float v = l < n ? to_float(src[(size_t)s * length + l0 + l]) : 0.f;
    (is_c ? sC : sB)[l * kStates + s] = v;
  }
}

// Block coordinates shared by both kernels.
struct BlockCoords {
  int b, k, channel;  // batch index, group, channel (clamped to the group when inactive)
  bool active;        // this thread owns a real channel
};

__device__ __forceinline__ BlockCoords block_coords(const ScanParams &p) {
  BlockCoords bc;
  const int per_batch = p.groups * p.tiles;
  bc.b = blockIdx.x / per_batch;
  const int rem = blockIdx.x % per_batch;
  bc.k = rem / p.tiles;
  const int d = (rem % p.tiles) * blockDim.x + threadIdx.x;
  bc.active = d < p.group_channels;
  bc.channel = bc.k * p.group_channels + (bc.active ? d : p.group_channels - 1);
  return bc;
}

template <typename T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::kFloat32; };
template <> struct DTypeOf<__half> { static constexpr DType value = DType::kFloat16; };
template <> struct DTypeOf<__nv_bfloat16> { static constexpr DType value = DType::kBFloat16; };

}  // namespace defmamba_scan
