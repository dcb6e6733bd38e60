// Backward selective scan. One thread owns one (batch, channel), walks the chunks of kChunk steps
// in reverse and carries g = dL/dh (kStates registers) backwards. For each chunk it restarts from
// the state the forward saved at the chunk's start: a first pass stores the state at every
// kSub-th step in shared memory, then each sub-chunk of kSub steps (last first) is recomputed into
// registers and walked in reverse. dB/dC (sums over the channels of a group) are reduced across
// each warp with shuffles, across warps in shared memory, and written (or atomically added when a
// group spans several blocks) once per chunk. dA, dD, d(delta_bias) are summed per thread and
// added atomically at the end.
#include "scan_common.cuh"

namespace defmamba_scan {

constexpr int kSub = 4;                 // steps held in registers during the reverse walk
constexpr int kSubs = kChunk / kSub;    // sub-chunks per chunk
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kRedPitch = 2 * kStates + 1;  // padded row of the per-warp dB/dC buffer

// Shared memory in floats for a block of `threads` threads.
static size_t bwd_smem_floats(int threads) {
  return 2 * kChunk * kStates                  // B, C chunk
         + 4 * (size_t)kChunk * threads        // dt, u, dy, dsoftplus per (step, thread)
         + (size_t)(kSubs - 1) * kStates * threads  // states at the sub-chunk starts
         + (size_t)(threads / 32) * kChunk * kRedPitch;  // per-warp dB/dC rows
}

// Load the kStates floats of a saved state (64-byte aligned).
__device__ __forceinline__ void load_state(const float *src, float (&h)[kStates]) {
#pragma unroll
  for (int s = 0; s < kStates; s += 4) {
    const float4 v = reinterpret_cast<const float4 *>(src)[s / 4];
    h[s] = v.x; h[s + 1] = v.y; h[s + 2] = v.z; h[s + 3] = v.w;
  }
}

// One level of the warp transpose-sum: lanes exchange half of their first 2*kWidth values with
// the lane kWidth away and keep the sums of the other half.
template <int kWidth>
__device__ __forceinline__ void transpose_sum_level(float (&v)[2 * kStates], int lane) {
  const bool upper = lane & kWidth;
#pragma unroll
  for (int i = 0; i < kWidth; ++i) {
    const float send = upper ? v[i] : v[i + kWidth];
    const float keep = upper ? v[i + kWidth] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kWidth);
  }
}

// Sum v[0..31] over the 32 lanes; lane i ends with the total of v[i] (31 shuffles).
__device__ __forceinline__ float warp_transpose_sum(float (&v)[2 * kStates]) {
  const int lane = threadIdx.x & 31;
  transpose_sum_level<16>(v, lane);
  transpose_sum_level<8>(v, lane);
  transpose_sum_level<4>(v, lane);
  transpose_sum_level<2>(v, lane);
  transpose_sum_level<1>(v, lane);
  return v[0];
}

template <typename in_t, typename dy_t>
__global__ void __launch_bounds__(kMaxThreads) scan_bwd_kernel(const ScanParams p) {
  extern __shared__ __align__(16) float smem[];
  const int T = blockDim.x;
  const int t = threadIdx.x;
  const int warp = t / 32, lane = t % 32;
  float *sB = smem;
  float *sC = sB + kChunk * kStates;
  float *sDt = sC + kChunk * kStates;   // [step][thread]; reused for d(delta) after the reverse step
  float *sU = sDt + kChunk * T;         // reused for du
  float *sDy = sU + kChunk * T;
  float *sSig = sDy + kChunk * T;
  float *sH = sSig + kChunk * T;        // [(sub-1)*kStates + state][thread]
  float *sRed = sH + (kSubs - 1) * kStates * T;  // [warp][step][kRedPitch]

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
  const float *saved = p.states_in + row_index * p.n_chunks * kStates;

  float A2[kStates], g[kStates], a_next[kStates], dA[kStates];
#pragma unroll
  for (int s = 0; s < kStates; ++s) {
    A2[s] = p.A[bc.channel * kStates + s] * kLog2e;
    g[s] = 0.f;
    a_next[s] = 0.f;
    dA[s] = 0.f;
  }
  const float Dv = p.D ? p.D[bc.channel] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[bc.channel] : 0.f;
  float dD = 0.f, dbias = 0.f;

  for (int j = p.n_chunks - 1; j >= 0; --j) {
    const int l0 = j * kChunk;
    const int n = min(kChunk, L - l0);
    __syncthreads();  // the previous chunk's readers of sB/sC/sRed are done
    stage_bc(Bg, Cg, L, l0, n, sB, sC);
    {
      float cu[kChunk], cd[kChunk], cg[kChunk];
      load_chunk(u + l0, n, p.vec, cu);
      load_chunk(delta + l0, n, p.vec, cd);
      load_chunk(dy + l0, n, p.vec, cg);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const float x = cd[i] + bias;
        // Inactive threads (past the group's channels) contribute nothing: zero u and dy.
        sU[i * T + t] = bc.active ? cu[i] : 0.f;
        sDy[i * T + t] = bc.active ? cg[i] : 0.f;
        sDt[i * T + t] = p.softplus ? softplus(x) : x;
        sSig[i * T + t] = p.softplus ? softplus_grad(x) : 1.f;
      }
    }
    __syncthreads();

    // Pass 1: from the saved chunk start, store the state before each later sub-chunk.
    const float *chunk_start = saved + (size_t)j * kStates;
    {
      float h[kStates];
      load_state(chunk_start, h);
#pragma unroll
      for (int i = 0; i < kChunk - kSub; ++i) {
        if (i < n) {
          const float dt = sDt[i * T + t];
          const float dtu = dt * sU[i * T + t];
#pragma unroll
          for (int s = 0; s < kStates; ++s)
            h[s] = fmaf(fast_exp2(dt * A2[s]), h[s], dtu * sB[i * kStates + s]);
        }
        if (i % kSub == kSub - 1) {
#pragma unroll
          for (int s = 0; s < kStates; ++s) sH[((i / kSub) * kStates + s) * T + t] = h[s];
        }
      }
    }

    // Pass 2: sub-chunks in reverse.
#pragma unroll
    for (int sub = kSubs - 1; sub >= 0; --sub) {
      const int i0 = sub * kSub;
      if (i0 >= n) continue;
      float hs[kSub][kStates];
      {
        float h[kStates];
        if (sub == 0) {
          load_state(chunk_start, h);
        } else {
#pragma unroll
          for (int s = 0; s < kStates; ++s) h[s] = sH[((sub - 1) * kStates + s) * T + t];
        }
#pragma unroll
        for (int q = 0; q < kSub; ++q) {
          const int i = i0 + q;
          if (i < n) {
            const float dt = sDt[i * T + t];
            const float dtu = dt * sU[i * T + t];
#pragma unroll
            for (int s = 0; s < kStates; ++s)
              h[s] = fmaf(fast_exp2(dt * A2[s]), h[s], dtu * sB[i * kStates + s]);
          }
#pragma unroll
          for (int s = 0; s < kStates; ++s) hs[q][s] = h[s];
        }
      }
#pragma unroll
      for (int q = kSub - 1; q >= 0; --q) {
        const int i = i0 + q;
        if (i >= n) continue;
        const float dt = sDt[i * T + t];
        const float uu = sU[i * T + t];
        const float gy = sDy[i * T + t];
        const float dtu = dt * uu;
        float acc_du = 0.f, acc_dt = 0.f;  // sum g*B, and sum g*A2*(a h_prev)
        float red[2 * kStates];
#pragma unroll
        for (int s = 0; s < kStates; ++s) {
          const float Bs = sB[i * kStates + s];
          const float Cs = sC[i * kStates + s];
          const float a = fast_exp2(dt * A2[s]);
          g[s] = fmaf(a_next[s], g[s], gy * Cs);          // dL/dh at step i
          const float prev = fmaf(-dtu, Bs, hs[q][s]);      // a_i * h_{i-1}
          acc_du = fmaf(g[s], Bs, acc_du);
          acc_dt = fmaf(g[s] * prev, A2[s], acc_dt);
          dA[s] = fmaf(g[s] * prev, dt, dA[s]);
          red[s] = g[s] * dtu;                              // dB contribution
          red[kStates + s] = gy * hs[q][s];                 // dC contribution
          a_next[s] = a;
        }
        // dL/d(dt) = sum_s g (A a h_prev + u B); A = A2 * ln 2.
        const float gdelta = fmaf(acc_dt, kLn2, uu * acc_du) * sSig[i * T + t];
        sU[i * T + t] = fmaf(Dv, gy, dt * acc_du);  // du
        sDt[i * T + t] = gdelta;                     // d(delta)
        dD = fmaf(gy, uu, dD);
        dbias += gdelta;
        const float total = warp_transpose_sum(red);
        sRed[(warp * kChunk + i) * kRedPitch + lane] = total;
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
      float o[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) o[i] = sU[i * T + t];
      store_chunk(du + l0, n, p.vec, o);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) o[i] = sDt[i * T + t];
      store_chunk(ddelta + l0, n, p.vec, o);
    }
  }

  if (bc.active) {
#pragma unroll
    for (int s = 0; s < kStates; ++s) atomicAdd(p.dA + bc.channel * kStates + s, dA[s]);
    if (p.dD) atomicAdd(p.dD + bc.channel, dD);
    if (p.dbias) atomicAdd(p.dbias + bc.channel, dbias);
  }
}

template <typename in_t, typename dy_t>
static cudaError_t launch_bwd_typed(const ScanParams &p, cudaStream_t stream) {
  auto kernel = scan_bwd_kernel<in_t, dy_t>;
  const size_t smem = bwd_smem_floats(p.threads) * sizeof(float);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
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
