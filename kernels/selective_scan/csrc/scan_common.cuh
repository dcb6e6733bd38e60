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

// torch.nn.functional.softplus (beta 1, threshold 20), branch-free so unrolled steps stay one
// basic block: softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1], with
// log1p(e) = 2 atanh(s), s = e / (2 + e) in (0, 1/3], summed to s^15 (truncation < 2e-9 relative).
// Above 20 the correction is below half an ulp of x, so the result is x exactly, as in torch.
__device__ __forceinline__ float softplus(float x) {
  const float e = fast_exp2(-fabsf(x) * kLog2e);
  const float s = __fdividef(e, 2.f + e);
  const float s2 = s * s;
  float p = 1.f / 15.f;
  p = fmaf(p, s2, 1.f / 13.f);
  p = fmaf(p, s2, 1.f / 11.f);
  p = fmaf(p, s2, 1.f / 9.f);
  p = fmaf(p, s2, 1.f / 7.f);
  p = fmaf(p, s2, 1.f / 5.f);
  p = fmaf(p, s2, 1.f / 3.f);
  p = fmaf(p, s2, 1.f);
  return fmaxf(x, 0.f) + 2.f * s * p;
}

// d softplus / dx = sigmoid(x), branch-free (1 exactly above the threshold, as in torch).
__device__ __forceinline__ float softplus_grad(float x) {
  const float e = fast_exp2(-fabsf(x) * kLog2e);
  return __fdividef(x >= 0.f ? 1.f : e, 1.f + e);
}

// Vector loads and stores of a row's chunk: kChunk elements as sizeof(V)-byte words.
template <typename T, typename V>
__device__ __forceinline__ void load_words(const T *__restrict__ p, float (&out)[kChunk]) {
  constexpr int kPer = sizeof(V) / sizeof(T);
#pragma unroll
  for (int v = 0; v < kChunk / kPer; ++v) {
    const V raw = __ldg(reinterpret_cast<const V *>(p) + v);
    const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
    for (int i = 0; i < kPer; ++i) out[v * kPer + i] = to_float(e[i]);
  }
}

template <typename T, typename V>
__device__ __forceinline__ void store_words(T *__restrict__ p, const float (&in)[kChunk]) {
  constexpr int kPer = sizeof(V) / sizeof(T);
#pragma unroll
  for (int v = 0; v < kChunk / kPer; ++v) {
    V raw;
    T *e = reinterpret_cast<T *>(&raw);
#pragma unroll
    for (int i = 0; i < kPer; ++i) e[i] = from_float<T>(in[v * kPer + i]);
    reinterpret_cast<V *>(p)[v] = raw;
  }
}

// Read kChunk consecutive elements of a row into floats. `n` valid elements (the rest are 0);
// `vec_bytes` (16, 8 or 0) is the widest access every row start allows, used when the chunk is full.
template <typename T>
__device__ __forceinline__ void load_chunk(const T *__restrict__ p, int n, int vec_bytes, float (&out)[kChunk]) {
  if (n == kChunk && vec_bytes == 16) {
    load_words<T, uint4>(p, out);
  } else if (n == kChunk && vec_bytes == 8) {
    load_words<T, uint2>(p, out);
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) out[i] = i < n ? to_float(p[i]) : 0.f;
  }
}

// Write the first `n` of kChunk floats to a row, converted to T.
template <typename T>
__device__ __forceinline__ void store_chunk(T *__restrict__ p, int n, int vec_bytes, const float (&in)[kChunk]) {
  if (n == kChunk && vec_bytes == 16) {
    store_words<T, uint4>(p, in);
  } else if (n == kChunk && vec_bytes == 8) {
    store_words<T, uint2>(p, in);
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
      if (i < n) p[i] = from_float<T>(in[i]);
  }
}

// One chunk of B and C (group k of batch b) goes to shared memory transposed to [l][state], so a
// timestep's 16 states are one contiguous 64-byte row. The first warp moves it: lane r < 16 owns
// row r of B, lane 16 + r row r of C. Split into load and store so that the global loads can be
// issued a chunk ahead. Zeros past the end.
template <typename T>
__device__ __forceinline__ void load_bc(const T *__restrict__ Bg, const T *__restrict__ Cg, int length, int l0,
                                        int n, int vec_bytes, float (&stg)[kChunk]) {
  const int lane = threadIdx.x;  // only called by threads < 32
  const T *src = (lane < kStates ? Bg : Cg) + (size_t)(lane % kStates) * length + l0;
  load_chunk(src, n, vec_bytes, stg);
}

__device__ __forceinline__ void store_bc(const float (&stg)[kChunk], float *__restrict__ sB, float *__restrict__ sC) {
  const int lane = threadIdx.x;
  float *dst = (lane < kStates ? sB : sC) + lane % kStates;
#pragma unroll
  for (int l = 0; l < kChunk; ++l) dst[l * kStates] = stg[l];
}

// A thread's half of a state (kHalfStates floats, 16-byte aligned) from and to memory.
__device__ __forceinline__ void load_state(const float *src, float (&h)[kHalfStates]) {
  const float4 a = reinterpret_cast<const float4 *>(src)[0];
  const float4 b = reinterpret_cast<const float4 *>(src)[1];
  h[0] = a.x; h[1] = a.y; h[2] = a.z; h[3] = a.w;
  h[4] = b.x; h[5] = b.y; h[6] = b.z; h[7] = b.w;
}

__device__ __forceinline__ void store_state(float *dst, const float (&h)[kHalfStates]) {
  reinterpret_cast<float4 *>(dst)[0] = make_float4(h[0], h[1], h[2], h[3]);
  reinterpret_cast<float4 *>(dst)[1] = make_float4(h[4], h[5], h[6], h[7]);
}

// Of a pair of values, the one for this thread's half (sel = 0 or 1) and the other one, with
// selects instead of a run-time register index.
__device__ __forceinline__ float pick(bool sel, float a, float b) { return sel ? b : a; }

// Block coordinates shared by both kernels.
struct BlockCoords {
  int b, k, channel;  // batch index, group, channel (clamped to the group when inactive);
                      // threads 2c and 2c+1 of the block share a channel
  bool active;        // this thread owns a real channel
};

__device__ __forceinline__ BlockCoords block_coords(const ScanParams &p) {
  BlockCoords bc;
  const int per_batch = p.groups * p.tiles;
  bc.b = blockIdx.x / per_batch;
  const int rem = blockIdx.x % per_batch;
  bc.k = rem / p.tiles;
  const int per_block = blockDim.x / kThreadsPerChannel;
  const int d = (rem % p.tiles) * per_block + threadIdx.x / kThreadsPerChannel;
  bc.active = d < p.group_channels;
  bc.channel = bc.k * p.group_channels + (bc.active ? d : p.group_channels - 1);
  return bc;
}

template <typename T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::kFloat32; };
template <> struct DTypeOf<__half> { static constexpr DType value = DType::kFloat16; };
template <> struct DTypeOf<__nv_bfloat16> { static constexpr DType value = DType::kBFloat16; };

}  // namespace defmamba_scan
