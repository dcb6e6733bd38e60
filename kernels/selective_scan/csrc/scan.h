// Host-side interface of the selective-scan kernels (no torch headers, so the .cu files compile fast).
#pragma once
#include <cuda_runtime.h>

namespace defmamba_scan {

// Number of SSM states per channel the kernels are compiled for (the binding pads smaller N).
constexpr int kStates = 16;
// Timesteps per chunk, the unit the kernels walk the sequence in.
constexpr int kChunk = 16;
// The forward saves the state for the backward every kChunksPerState chunks (64 steps). Before the
// backward, the expand kernel recomputes the states at the chunks in between, all spans in
// parallel, into a temporary buffer; the backward restarts every chunk from those.
constexpr int kChunksPerState = 4;
// Two threads share a channel, each holding half of its states (more warps per SM, fewer
// registers per thread). At most kMaxChannels channels (2 * kMaxChannels threads) in a block.
constexpr int kThreadsPerChannel = 2;
constexpr int kHalfStates = kStates / kThreadsPerChannel;
constexpr int kMaxChannels = 48;
constexpr int kMaxThreads = kThreadsPerChannel * kMaxChannels;
// Blocks of kMaxThreads the forward kernel is compiled to fit on one SM (caps its registers).
constexpr int kFwdBlocksPerSM = 5;

enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct ScanParams {
  int batch = 0, channels = 0, length = 0, groups = 0;
  int group_channels = 0;   // channels / groups
  int tiles = 0;            // blocks per group along channels
  int threads = 0;          // threads per block (2 per channel, multiple of 32, <= kMaxThreads)
  int n_chunks = 0;         // ceil(length / kChunk)
  int n_saved = 0;          // ceil(n_chunks / kChunksPerState): states the forward saves per row
  bool softplus = false;
  int vec_bytes = 0;        // widest access (16, 8 or 0 bytes) every row start of u/delta/B/C/dy/outputs allows
  // Inputs (u, delta, B, C, dy in the input dtypes; the rest float32; D and delta_bias may be null).
  const void *u = nullptr, *delta = nullptr, *B = nullptr, *C = nullptr, *dy = nullptr;
  const float *A = nullptr, *D = nullptr, *delta_bias = nullptr;
  // Forward outputs: y, and (optional, may be null) the state at the start of every
  // kChunksPerState-th chunk (batch, channels, n_saved, kStates) float32.
  // Expand: the forward's saved states in (states_in), the state at the start of every chunk out
  // (states: batch, channels, n_chunks, kStates).
  void *y = nullptr;
  float *states = nullptr;
  // Backward: the states at every chunk start in (from the expand kernel), gradients out.
  // dB/dC (batch, groups, kStates, length) float32 are accumulated atomically when tiles > 1
  // (then they must be zeroed); dA, dD, dbias always are.
  const float *states_in = nullptr;
  void *du = nullptr, *ddelta = nullptr;
  float *dA = nullptr, *dB = nullptr, *dC = nullptr, *dD = nullptr, *dbias = nullptr;
};

// Choose tiles/threads (and n_chunks) from group_channels and length.
void plan_blocks(ScanParams &p);

// Launch the kernels on `stream`; return the launch error (cudaSuccess when fine).
cudaError_t launch_scan_fwd(const ScanParams &p, DType in, DType out, cudaStream_t stream);
cudaError_t launch_scan_expand(const ScanParams &p, DType in, cudaStream_t stream);
cudaError_t launch_scan_bwd(const ScanParams &p, DType in, DType grad_out, cudaStream_t stream);

}  // namespace defmamba_scan
