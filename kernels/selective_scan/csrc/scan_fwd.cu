// Forward selective scan: one thread owns one (batch, channel) and its kStates states in registers
// and walks the sequence in chunks of kChunk steps. The next chunk of u/delta is loaded into
// registers while the current one is computed; B/C chunks are shared by the block's channels
// (all in one group) through double-buffered shared memory.
#include "scan_common.cuh"

namespace defmamba_scan {

template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kMaxThreads) scan_fwd_kernel(const ScanParams p) {
  __shared__ __align__(16) float s_bc[2][2][kChunk * kStates];  // [buffer][B or C][l][state]

  const BlockCoords bc = block_coords(p);
  const int L = p.length;
  const size_t row = ((size_t)bc.b * p.channels + bc.channel) * L;
  const in_t *u = static_cast<const in_t *>(p.u) + row;
  const in_t *delta = static_cast<const in_t *>(p.delta) + row;
  out_t *y = static_cast<out_t *>(p.y) + row;
  const size_t bc_off = ((size_t)bc.b * p.groups + bc.k) * kStates * L;
  const in_t *Bg = static_cast<const in_t *>(p.B) + bc_off;
  const in_t *Cg = static_cast<const in_t *>(p.C) + bc_off;

  float A2[kStates], h[kStates];
#pragma unroll
  for (int s = 0; s < kStates; ++s) {
    A2[s] = p.A[bc.channel * kStates + s] * kLog2e;
    h[s] = 0.f;
  }
  const float Dv = p.D ? p.D[bc.channel] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[bc.channel] : 0.f;

  float cu[kChunk], cd[kChunk];
  int n0 = min(kChunk, L);
  load_chunk(u, n0, p.vec, cu);
  load_chunk(delta, n0, p.vec, cd);
  stage_bc(Bg, Cg, L, 0, n0, s_bc[0][0], s_bc[0][1]);
  __syncthreads();

  for (int j = 0; j < p.n_chunks; ++j) {
    const int l0 = j * kChunk;
    const int n = min(kChunk, L - l0);
    const bool has_next = j + 1 < p.n_chunks;
    float nu[kChunk], nd[kChunk];
    if (has_next) {
      const int nn = min(kChunk, L - l0 - kChunk);
      load_chunk(u + l0 + kChunk, nn, p.vec, nu);
      load_chunk(delta + l0 + kChunk, nn, p.vec, nd);
    }
    if (p.states && bc.active) {
      float4 *dst = reinterpret_cast<float4 *>(p.states + (row / L * p.n_chunks + j) * kStates);
#pragma unroll
      for (int s = 0; s < kStates; s += 4) dst[s / 4] = make_float4(h[s], h[s + 1], h[s + 2], h[s + 3]);
    }

    const float *sB = s_bc[j & 1][0];
    const float *sC = s_bc[j & 1][1];
    float out[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      float dt = cd[i] + bias;
      if (p.softplus) dt = softplus(dt);
      const float dtu = dt * cu[i];
      float acc = 0.f;
#pragma unroll
      for (int s4 = 0; s4 < kStates; s4 += 4) {
        const float4 b4 = *reinterpret_cast<const float4 *>(sB + i * kStates + s4);
        const float4 c4 = *reinterpret_cast<const float4 *>(sC + i * kStates + s4);
        const float bv[4] = {b4.x, b4.y, b4.z, b4.w};
        const float cv[4] = {c4.x, c4.y, c4.z, c4.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int s = s4 + q;
          const float a = fast_exp2(dt * A2[s]);
          h[s] = fmaf(a, h[s], dtu * bv[q]);
          acc = fmaf(cv[q], h[s], acc);
        }
      }
      out[i] = fmaf(Dv, cu[i], acc);
    }
    // Steps past the end (i >= n) read zero u/delta/B/C: the state is unchanged and nothing is stored.
    if (bc.active) store_chunk(y + l0, n, p.vec, out);

    if (has_next) {
      stage_bc(Bg, Cg, L, l0 + kChunk, min(kChunk, L - l0 - kChunk), s_bc[(j + 1) & 1][0], s_bc[(j + 1) & 1][1]);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        cu[i] = nu[i];
        cd[i] = nd[i];
      }
    }
    __syncthreads();
  }
}

void plan_blocks(ScanParams &p) {
  p.tiles = (p.group_channels + kMaxThreads - 1) / kMaxThreads;
  const int per_tile = (p.group_channels + p.tiles - 1) / p.tiles;
  p.threads = (per_tile + 31) / 32 * 32;
  p.n_chunks = (p.length + kChunk - 1) / kChunk;
}

template <typename in_t, typename out_t>
static cudaError_t launch_fwd_typed(const ScanParams &p, cudaStream_t stream) {
  const dim3 grid((unsigned)p.batch * p.groups * p.tiles);
  scan_fwd_kernel<in_t, out_t><<<grid, p.threads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_scan_fwd(const ScanParams &p, DType in, DType out, cudaStream_t stream) {
  if (p.batch == 0 || p.channels == 0) return cudaSuccess;
  switch (in) {
    case DType::kFloat32:
      if (out == DType::kFloat32) return launch_fwd_typed<float, float>(p, stream);
      break;
    case DType::kFloat16:
      if (out == DType::kFloat16) return launch_fwd_typed<__half, __half>(p, stream);
      if (out == DType::kFloat32) return launch_fwd_typed<__half, float>(p, stream);
      break;
    case DType::kBFloat16:
      if (out == DType::kBFloat16) return launch_fwd_typed<__nv_bfloat16, __nv_bfloat16>(p, stream);
      if (out == DType::kFloat32) return launch_fwd_typed<__nv_bfloat16, float>(p, stream);
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace defmamba_scan
