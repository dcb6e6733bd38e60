// Forward selective scan. Two threads own one (batch, channel), each with half of its kStates
// states in registers, and walk the sequence in chunks of kChunk steps. The next chunk of
// u/delta/B/C is loaded into registers while the current one is computed; B/C chunks are shared
// by the block's channels (all in one group) through double-buffered shared memory.
//
// The same kernel with kExpand recomputes, for the backward, the state at every chunk start from
// the states the forward saved every kChunksPerState chunks: each block walks one such span
// (blockIdx.y) from its saved state, without computing outputs.
#include "scan_common.cuh"

namespace defmamba_scan {

template <typename in_t, typename out_t, bool kExpand>
__global__ void __launch_bounds__(kMaxThreads, kFwdBlocksPerSM) scan_fwd_kernel(const ScanParams p) {
  __shared__ __align__(16) float s_bc[2][2][kChunk * kStates];  // [buffer][B or C][l][state]

  const BlockCoords bc = block_coords(p);
  const bool upper = threadIdx.x & 1;  // which half of the channel's states this thread holds
  const int s0 = upper ? kHalfStates : 0;
  const int L = p.length;
  const size_t row_index = (size_t)bc.b * p.channels + bc.channel;
  const size_t row = row_index * L;
  const in_t *u = static_cast<const in_t *>(p.u) + row;
  const in_t *delta = static_cast<const in_t *>(p.delta) + row;
  out_t *y = static_cast<out_t *>(p.y) + row;
  const size_t bc_off = ((size_t)bc.b * p.groups + bc.k) * kStates * L;
  const in_t *Bg = static_cast<const in_t *>(p.B) + bc_off;
  const in_t *Cg = static_cast<const in_t *>(p.C) + bc_off;

  // The chunks this block walks: the whole sequence, or (kExpand) the span of saved state blockIdx.y.
  const int j_begin = kExpand ? blockIdx.y * kChunksPerState : 0;
  const int j_end = kExpand ? min(p.n_chunks, j_begin + kChunksPerState) : p.n_chunks;

  float A2[kHalfStates], h[kHalfStates];
#pragma unroll
  for (int s = 0; s < kHalfStates; ++s) {
    A2[s] = p.A[bc.channel * kStates + s0 + s] * kLog2e;
    h[s] = 0.f;
  }
  if (kExpand) load_state(p.states_in + (row_index * p.n_saved + blockIdx.y) * kStates + s0, h);
  const float Dv = p.D ? p.D[bc.channel] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[bc.channel] : 0.f;

  // The lower thread of a pair loads u, the upper one delta; they swap copies before use.
  const in_t *mine_src = upper ? delta : u;
  float cm[kChunk];
  const int n0 = min(kChunk, L - j_begin * kChunk);
  load_chunk(mine_src + j_begin * kChunk, n0, p.vec_bytes, cm);
  const bool bc_loader = threadIdx.x < 32;
  if (bc_loader) {
    float stg[kChunk];
    load_bc(Bg, Cg, L, j_begin * kChunk, n0, p.vec_bytes, stg);
    store_bc(stg, s_bc[j_begin & 1][0], s_bc[j_begin & 1][1]);
  }
  __syncthreads();

  for (int j = j_begin; j < j_end; ++j) {
    const int l0 = j * kChunk;
    const int n = min(kChunk, L - l0);
    if (kExpand) {
      if (bc.active) store_state(p.states + (row_index * p.n_chunks + j) * kStates + s0, h);
      if (j + 1 == j_end) break;  // the span's last chunk only needs its start state
    } else if (p.states && bc.active && j % kChunksPerState == 0) {
      store_state(p.states + (row_index * p.n_saved + j / kChunksPerState) * kStates + s0, h);
    }
    const bool has_next = j + 1 < (kExpand ? j_end - 1 : j_end);  // (kExpand: the span's last chunk is not read)
    float nm[kChunk], nbc[kChunk];
    if (has_next) {
      const int nn = min(kChunk, L - l0 - kChunk);
      load_chunk(mine_src + l0 + kChunk, nn, p.vec_bytes, nm);
      if (bc_loader) load_bc(Bg, Cg, L, l0 + kChunk, nn, p.vec_bytes, nbc);
    }

    float cu[kChunk], dts[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      const float other = __shfl_xor_sync(0xffffffffu, cm[i], 1);
      cu[i] = pick(upper, cm[i], other);
      dts[i] = pick(upper, other, cm[i]) + bias;
    }
    if (p.softplus) {
      // Each thread of the pair evaluates softplus for every other step and they swap results.
#pragma unroll
      for (int i = 0; i < kChunk; i += 2) {
        const float mine = softplus(pick(upper, dts[i], dts[i + 1]));
        const float other = __shfl_xor_sync(0xffffffffu, mine, 1);
        dts[i] = pick(upper, mine, other);
        dts[i + 1] = pick(upper, other, mine);
      }
    }

    const float *sB = s_bc[j & 1][0] + s0;
    const float *sC = s_bc[j & 1][1] + s0;
    float out[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      const float dt = dts[i];
      const float dtu = dt * cu[i];
      float acc[2] = {0.f, 0.f};  // two partial sums halve the dependent chain
#pragma unroll
      for (int s4 = 0; s4 < kHalfStates; s4 += 4) {
        const float4 b4 = *reinterpret_cast<const float4 *>(sB + i * kStates + s4);
        const float4 c4 = *reinterpret_cast<const float4 *>(sC + i * kStates + s4);
        const float bv[4] = {b4.x, b4.y, b4.z, b4.w};
        const float cv[4] = {c4.x, c4.y, c4.z, c4.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int s = s4 + q;
          const float a = fast_exp2(dt * A2[s]);
          h[s] = fmaf(a, h[s], dtu * bv[q]);
          if (!kExpand) acc[q & 1] = fmaf(cv[q], h[s], acc[q & 1]);
        }
      }
      if (!kExpand) {
        const float part = acc[0] + acc[1];
        out[i] = fmaf(Dv, cu[i], part + __shfl_xor_sync(0xffffffffu, part, 1));
      }
    }
    // Steps past the end (i >= n) read zero u/B/C; their outputs are not stored and the state
    // after them is never used.
    if (!kExpand && bc.active && !upper) store_chunk(y + l0, n, p.vec_bytes, out);

    if (has_next) {
      if (bc_loader) store_bc(nbc, s_bc[(j + 1) & 1][0], s_bc[(j + 1) & 1][1]);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) cm[i] = nm[i];
    }
    __syncthreads();
  }
}

void plan_blocks(ScanParams &p) {
  p.tiles = (p.group_channels + kMaxChannels - 1) / kMaxChannels;
  const int per_tile = (p.group_channels + p.tiles - 1) / p.tiles;
  constexpr int kChannelsPerWarp = 32 / kThreadsPerChannel;
  p.threads = (per_tile + kChannelsPerWarp - 1) / kChannelsPerWarp * 32;
  p.n_chunks = (p.length + kChunk - 1) / kChunk;
  p.n_saved = (p.n_chunks + kChunksPerState - 1) / kChunksPerState;
}

template <typename in_t, typename out_t, bool kExpand = false>
static cudaError_t launch_fwd_typed(const ScanParams &p, cudaStream_t stream) {
  const dim3 grid((unsigned)p.batch * p.groups * p.tiles, kExpand ? (unsigned)p.n_saved : 1u);
  scan_fwd_kernel<in_t, out_t, kExpand><<<grid, p.threads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_scan_expand(const ScanParams &p, DType in, cudaStream_t stream) {
  if (p.batch == 0 || p.channels == 0) return cudaSuccess;
  switch (in) {  // no outputs are written: the output type is a placeholder
    case DType::kFloat32: return launch_fwd_typed<float, float, true>(p, stream);
    case DType::kFloat16: return launch_fwd_typed<__half, float, true>(p, stream);
    case DType::kBFloat16: return launch_fwd_typed<__nv_bfloat16, float, true>(p, stream);
  }
  return cudaErrorInvalidValue;
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
