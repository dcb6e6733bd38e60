// Backward selective scan. Two threads own one (batch, channel), each with half of its states,
// walk the chunks of kChunk steps in reverse and carry g = dL/dh backwards. For each chunk they
// restart from the state at the chunk's start (recomputed by the expand kernel from the forward's): a first pass stores the state at
// every kSub-th step in shared memory, then each sub-chunk of kSub steps (last first) is recomputed
// into registers and walked in reverse. dB/dC (sums over the channels of a group) are reduced
// across each warp through a shared-memory tile, across warps in shared memory, and written (or
// atomically added when a group spans several blocks) once per chunk. dA, dD, d(delta_bias) are
// summed per thread and added atomically at the end.
#include "scan_common.cuh"

namespace defmamba_scan {

constexpr int kSub = 4;                     // steps held in registers during the reverse walk
constexpr int kSubs = kChunk / kSub;        // sub-chunks per chunk
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kRedPitch = 2 * kStates + 1;  // padded row of the per-warp dB/dC rows
constexpr int kTPitch = 2 * kHalfStates + 4;  // row of the per-warp transpose tile (16-byte aligned)
constexpr int kBwdBlocksPerSM = 5;

// Shared memory in floats for a block of `threads` threads.
static size_t bwd_smem_floats(int threads) {
  const size_t channels = threads / kThreadsPerChannel, warps = threads / 32;
  return 2 * kChunk * kStates                            // B, C chunk
         + 4 * kChunk * channels                         // dt, u, dy, dsoftplus per (step, channel)
         + (size_t)(kSubs - 1) * kHalfStates * threads   // states at the sub-chunk starts
         + warps * kChunk * kRedPitch                    // per-warp dB/dC rows
         + warps * 32 * kTPitch;                         // per-warp transpose tile
}

// Sum over a warp's channels of the dB/dC contributions of one step. Lane r holds vb/vc for the
// states of its half (r odd: upper) of channel r/2 and writes them as row r of a padded tile;
// lane o then adds up output o (dB of state o for o < 16, dC of state o - 16) over the 16 rows
// of the matching half. 4 vector stores, 16 loads, 15 adds per lane.
__device__ __forceinline__ float warp_column_sum(float *__restrict__ tile, int lane, const float (&vb)[kHalfStates],
                                                 const float (&vc)[kHalfStates]) {
  float *row = tile + lane * kTPitch;
#pragma unroll
  for (int s = 0; s < kHalfStates; s += 4) {
    *reinterpret_cast<float4 *>(row + s) = make_float4(vb[s], vb[s + 1], vb[s + 2], vb[s + 3]);
    *reinterpret_cast<float4 *>(row + kHalfStates + s) = make_float4(vc[s], vc[s + 1], vc[s + 2], vc[s + 3]);
  }
  __syncwarp();
  const int state = lane % kStates;
  const int half = state / kHalfStates;
  const int col = (lane / kStates) * kHalfStates + state % kHalfStates;
  float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int k = 0; k < 16; ++k) part[k & 3] += tile[(2 * k + half) * kTPitch + col];
  __syncwarp();  // the tile is rewritten by the next step
  return (part[0] + part[1]) + (part[2] + part[3]);
}

template <typename in_t, typename dy_t>
__global__ void __launch_bounds__(kMaxThreads, kBwdBlocksPerSM) scan_bwd_kernel(const ScanParams p) {
  extern __shared__ __align__(16) float smem[];
  const int T = blockDim.x;
  const int TC = T / kThreadsPerChannel;
  const int t = threadIdx.x;
  const int slot = t / kThreadsPerChannel;
  const bool upper = t & 1;
  const int s0 = upper ? kHalfStates : 0;
  const int warp = t / 32, lane = t % 32;
  float *sB = smem;
  float *sC = sB + kChunk * kStates;
  float *sDt = sC + kChunk * kStates;   // [step][channel]; reused for d(delta) after the reverse step
  float *sU = sDt + kChunk * TC;        // reused for du
  float *sDy = sU + kChunk * TC;
  float *sSig = sDy + kChunk * TC;
  float *sH = sSig + kChunk * TC;       // [(sub-1)*kHalfStates + state][thread]
  float *sRed = sH + (kSubs - 1) * kHalfStates * T;  // [warp][step][kRedPitch]
  float *sTile = sRed + (T / 32) * kChunk * kRedPitch + warp * 32 * kTPitch;

  const BlockCoords bc = block_coords(p);
  const int L = p.length;
  const size_t row_index = (size_t)bc.b * p.channels + bc.channel;
  const size_t row = row_index * L;
  const in_t *u = static_cast<const in_t *>(p.u) + row;
  const in_t *delta = static_cast<const in_t *>(p.delta) + row;
  const dy_t *dy = static_cast<const dy_t *>(p.dy) + row;
  in_t *du = static_cast<in_t *>(p.du) + row;
  in_t *ddelta = static_cast<in_t *>(p.ddelta) + row;
  const size_t bc_off = ((size_t)bc.b * p.groups + bc.k) * kStates * L;
  const in_t *Bg = static_cast<const in_t *>(p.B) + bc_off;
  const in_t *Cg = static_cast<const in_t *>(p.C) + bc_off;
  const float *saved = p.states_in + row_index * p.n_chunks * kStates + s0;

  float A2[kHalfStates], g[kHalfStates], a_next[kHalfStates], dA[kHalfStates];
#pragma unroll
  for (int s = 0; s < kHalfStates; ++s) {
    A2[s] = p.A[bc.channel * kStates + s0 + s] * kLog2e;
    g[s] = 0.f;
    a_next[s] = 0.f;
    dA[s] = 0.f;
  }
  const float Dv = p.D ? p.D[bc.channel] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[bc.channel] : 0.f;
  float dD = 0.f, dbias = 0.f;  // kept by the lower thread of each pair

  for (int j = p.n_chunks - 1; j >= 0; --j) {
    const int l0 = j * kChunk;
    const int n = min(kChunk, L - l0);
    __syncthreads();  // the previous chunk's readers of the shared buffers are done
    if (t < 32) {
      float stg[kChunk];
      load_bc(Bg, Cg, L, l0, n, p.vec_bytes, stg);
      store_bc(stg, sB, sC);
    }
    {
      // The lower thread of a pair handles u and dy, the upper one delta (softplus and its slope).
      float c0[kChunk];
      if (upper) {
        load_chunk(delta + l0, n, p.vec_bytes, c0);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          const float x = c0[i] + bias;
          sDt[i * TC + slot] = p.softplus ? softplus(x) : x;
          sSig[i * TC + slot] = p.softplus ? softplus_grad(x) : 1.f;
        }
      } else {
        float c1[kChunk];
        load_chunk(u + l0, n, p.vec_bytes, c0);
        load_chunk(dy + l0, n, p.vec_bytes, c1);
        // Inactive threads (past the group's channels) contribute nothing: zero u and dy.
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          sU[i * TC + slot] = bc.active ? c0[i] : 0.f;
          sDy[i * TC + slot] = bc.active ? c1[i] : 0.f;
        }
      }
    }
    __syncthreads();

    // Steps past the end (i >= n) have u = dy = B = C = 0: they leave g at 0 and add nothing, so
    // the unrolled steps below need no per-step branch (which would split them into blocks).
    // Pass 1: from the saved chunk start, store the state before each later sub-chunk.
    const float *chunk_start = saved + (size_t)j * kStates;
    {
      float h[kHalfStates];
      load_state(chunk_start, h);
#pragma unroll
      for (int i = 0; i < kChunk - kSub; ++i) {
        const float dt = sDt[i * TC + slot];
        const float dtu = dt * sU[i * TC + slot];
        const float *Bi = sB + i * kStates + s0;
#pragma unroll
        for (int s = 0; s < kHalfStates; ++s) h[s] = fmaf(fast_exp2(dt * A2[s]), h[s], dtu * Bi[s]);
        if (i % kSub == kSub - 1) {
#pragma unroll
          for (int s = 0; s < kHalfStates; ++s) sH[((i / kSub) * kHalfStates + s) * T + t] = h[s];
        }
      }
    }

    // Pass 2: sub-chunks in reverse.
#pragma unroll 1
    for (int sub = kSubs - 1; sub >= 0; --sub) {
      const int i0 = sub * kSub;
      if (i0 >= n) continue;
      float hs[kSub][kHalfStates];
      {
        float h[kHalfStates];
        if (sub == 0) {
          load_state(chunk_start, h);
        } else {
#pragma unroll
          for (int s = 0; s < kHalfStates; ++s) h[s] = sH[((sub - 1) * kHalfStates + s) * T + t];
        }
#pragma unroll
        for (int q = 0; q < kSub; ++q) {
          const int i = i0 + q;
          const float dt = sDt[i * TC + slot];
          const float dtu = dt * sU[i * TC + slot];
          const float *Bi = sB + i * kStates + s0;
#pragma unroll
          for (int s = 0; s < kHalfStates; ++s) {
            h[s] = fmaf(fast_exp2(dt * A2[s]), h[s], dtu * Bi[s]);
            hs[q][s] = h[s];
          }
        }
      }
#pragma unroll
      for (int q = kSub - 1; q >= 0; --q) {
        const int i = i0 + q;
        const float dt = sDt[i * TC + slot];
        const float uu = sU[i * TC + slot];
        const float gy = sDy[i * TC + slot];
        const float sig = sSig[i * TC + slot];
        const float dtu = dt * uu;
        const float *Bi = sB + i * kStates + s0;
        const float *Ci = sC + i * kStates + s0;
        float acc_du = 0.f, acc_dt = 0.f;  // sum g*B, and sum g*A2*(a h_prev), over this half
        float vb[kHalfStates], vc[kHalfStates];
#pragma unroll
        for (int s = 0; s < kHalfStates; ++s) {
          const float Bs = Bi[s];
          const float a = fast_exp2(dt * A2[s]);
          g[s] = fmaf(a_next[s], g[s], gy * Ci[s]);       // dL/dh at step i
          const float prev = fmaf(-dtu, Bs, hs[q][s]);      // a_i * h_{i-1}
          const float gp = g[s] * prev;
          acc_du = fmaf(g[s], Bs, acc_du);
          acc_dt = fmaf(gp, A2[s], acc_dt);
          dA[s] = fmaf(gp, dt, dA[s]);
          vb[s] = g[s] * dtu;                               // dB contribution
          vc[s] = gy * hs[q][s];                            // dC contribution
          a_next[s] = a;
        }
        acc_du += __shfl_xor_sync(0xffffffffu, acc_du, 1);
        acc_dt += __shfl_xor_sync(0xffffffffu, acc_dt, 1);
        const float total = warp_column_sum(sTile, lane, vb, vc);
        sRed[(warp * kChunk + i) * kRedPitch + lane] = total;
        if (!upper) {
          // dL/d(dt) = sum_s g (A a h_prev + u B), A = A2 * ln 2; the partner has read this step.
          const float gdelta = fmaf(acc_dt, kLn2, uu * acc_du) * sig;
          sU[i * TC + slot] = fmaf(Dv, gy, dt * acc_du);  // du
          sDt[i * TC + slot] = gdelta;                     // d(delta)
          dD = fmaf(gy, uu, dD);
          dbias += gdelta;
        }
      }
    }
    __syncthreads();

    // dB/dC of this chunk: sum the warps' rows, write along the sequence (coalesced).
    const int warps = T / 32;
    float *dBg = p.dB + bc_off;
    float *dCg = p.dC + bc_off;
    for (int e = t; e < 2 * kStates * kChunk; e += T) {
      const int i = e % kChunk;
      const int v = e / kChunk;  // 0..15: dB state v; 16..31: dC state v-16
      if (i >= n) continue;
      float sum = 0.f;
      for (int w = 0; w < warps; ++w) sum += sRed[(w * kChunk + i) * kRedPitch + v];
      float *dst = (v < kStates ? dBg + (size_t)v * L : dCg + (size_t)(v - kStates) * L) + l0 + i;
      if (p.tiles > 1) atomicAdd(dst, sum);
      else *dst = sum;
    }
    if (bc.active) {
      // The lower thread writes du, the upper one d(delta).
      const float *src = upper ? sDt : sU;
      float o[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) o[i] = src[i * TC + slot];
      store_chunk((upper ? ddelta : du) + l0, n, p.vec_bytes, o);
    }
  }

  if (bc.active) {
#pragma unroll
    for (int s = 0; s < kHalfStates; ++s) atomicAdd(p.dA + bc.channel * kStates + s0 + s, dA[s]);
    if (!upper) {
      if (p.dD) atomicAdd(p.dD + bc.channel, dD);
      if (p.dbias) atomicAdd(p.dbias + bc.channel, dbias);
    }
  }
}

template <typename in_t, typename dy_t>
static cudaError_t launch_bwd_typed(const ScanParams &p, cudaStream_t stream) {
  auto kernel = scan_bwd_kernel<in_t, dy_t>;
  const size_t smem = bwd_smem_floats(p.threads) * sizeof(float);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (err != cudaSuccess) return err;
  const dim3 grid((unsigned)p.batch * p.groups * p.tiles);
  kernel<<<grid, p.threads, smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_scan_bwd(const ScanParams &p, DType in, DType grad_out, cudaStream_t stream) {
  if (p.batch == 0 || p.channels == 0) return cudaSuccess;
  switch (in) {
    case DType::kFloat32:
      if (grad_out == DType::kFloat32) return launch_bwd_typed<float, float>(p, stream);
      break;
    case DType::kFloat16:
      if (grad_out == DType::kFloat16) return launch_bwd_typed<__half, __half>(p, stream);
      if (grad_out == DType::kFloat32) return launch_bwd_typed<__half, float>(p, stream);
      break;
    case DType::kBFloat16:
      if (grad_out == DType::kBFloat16) return launch_bwd_typed<__nv_bfloat16, __nv_bfloat16>(p, stream);
      if (grad_out == DType::kFloat32) return launch_bwd_typed<__nv_bfloat16, float>(p, stream);
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace defmamba_scan
