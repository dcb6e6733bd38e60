// PyTorch binding of the selective-scan kernels: argument checks, allocation, dtype dispatch.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <initializer_list>
#include <optional>
#include <vector>

#include "scan.h"

namespace ds = defmamba_scan;

namespace {

ds::DType to_dtype(const at::Tensor &t, const char *name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ds::DType::kFloat32;
    case at::kHalf: return ds::DType::kFloat16;
    case at::kBFloat16: return ds::DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16 for the CUDA selective scan; got ",
                  t.scalar_type(), " (use backend='torch' for float64)");
  }
}

void check_tensor(const at::Tensor &t, const at::Tensor &ref, const char *name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but u is on ", ref.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (the Python wrapper makes it so)");
}

void check_param(const std::optional<at::Tensor> &t, const at::Tensor &u, int64_t channels, const char *name) {
  if (!t) return;
  check_tensor(*t, u, name);
  TORCH_CHECK(t->scalar_type() == at::kFloat, name, " must be float32; got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, name, " must have shape (", channels, ",); got ", t->sizes());
}

// Validate the shared inputs and fill the sizes of the kernel parameters.
ds::ScanParams make_params(const at::Tensor &u, const at::Tensor &delta, const at::Tensor &A, const at::Tensor &B,
                           const at::Tensor &C, const std::optional<at::Tensor> &D,
                           const std::optional<at::Tensor> &delta_bias, bool softplus) {
  check_tensor(u, u, "u");
  check_tensor(delta, u, "delta");
  check_tensor(A, u, "A");
  check_tensor(B, u, "B");
  check_tensor(C, u, "C");
  TORCH_CHECK(u.dim() == 3, "u must be (batch, channels, L); got ", u.sizes());
  TORCH_CHECK(delta.sizes() == u.sizes(), "delta must have u's shape ", u.sizes(), "; got ", delta.sizes());
  const int64_t batch = u.size(0), channels = u.size(1), length = u.size(2);
  TORCH_CHECK(length >= 1, "the sequence length L must be at least 1");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == channels && A.size(1) == ds::kStates, "A must be (", channels, ", ",
              ds::kStates, ") float32 (the wrapper pads smaller N); got ", A.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat, "A must be float32; got ", A.scalar_type());
  TORCH_CHECK(B.dim() == 4 && B.size(0) == batch && B.size(2) == ds::kStates && B.size(3) == length,
              "B must be (", batch, ", K, ", ds::kStates, ", ", length, "); got ", B.sizes());
  TORCH_CHECK(C.sizes() == B.sizes(), "C must have B's shape ", B.sizes(), "; got ", C.sizes());
  const int64_t groups = B.size(1);
  TORCH_CHECK(groups >= 1 && channels % groups == 0, "channels (", channels, ") must be a multiple of K=", groups);
  for (const at::Tensor *t : {&delta, &B, &C})
    TORCH_CHECK(t->scalar_type() == u.scalar_type(), "delta, B and C must have u's dtype ", u.scalar_type(),
                " (the wrapper converts them)");
  check_param(D, u, channels, "D");
  check_param(delta_bias, u, channels, "delta_bias");
  TORCH_CHECK(batch * channels * length < (int64_t(1) << 40), "input too large");
  // The state recompute before the backward launches one row of blocks per saved state (grid y <= 65535).
  const int64_t max_length = int64_t(ds::kChunk) * ds::kChunksPerState * 65535;
  TORCH_CHECK(length <= max_length, "the CUDA selective scan supports L <= ", max_length, "; got L=", length,
              " (use backend='triton')");

  ds::ScanParams p;
  p.batch = (int)batch;
  p.channels = (int)channels;
  p.length = (int)length;
  p.groups = (int)groups;
  p.group_channels = (int)(channels / groups);
  p.softplus = softplus;
  ds::plan_blocks(p);
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  p.A = A.data_ptr<float>();
  p.D = D ? D->data_ptr<float>() : nullptr;
  p.delta_bias = delta_bias ? delta_bias->data_ptr<float>() : nullptr;
  return p;
}

// The widest vector access (16 or 8 bytes, else 0 for element-wise) that the start of every row
// of these tensors allows: all rows hold `length` elements of the inputs' width (a float32 dy or y
// has rows twice as long in bytes, so it is aligned whenever the 16-bit inputs are).
int vector_bytes(int64_t length, int64_t element_size, std::initializer_list<const at::Tensor *> tensors) {
  for (int bytes : {16, 8}) {
    bool ok = (length * element_size) % bytes == 0;
    for (const at::Tensor *t : tensors) ok = ok && reinterpret_cast<uintptr_t>(t->data_ptr()) % bytes == 0;
    if (ok) return bytes;
  }
  return 0;
}

}  // namespace

// Returns (y, states). states (batch, channels, n_saved, 16) float32, the state at every
// kChunksPerState * kChunk-th step, is filled when save_states, else an empty tensor.
std::vector<at::Tensor> scan_fwd(const at::Tensor &u, const at::Tensor &delta, const at::Tensor &A,
                                 const at::Tensor &B, const at::Tensor &C, const std::optional<at::Tensor> &D,
                                 const std::optional<at::Tensor> &delta_bias, bool softplus, bool out_float32,
                                 bool save_states) {
  const c10::cuda::CUDAGuard guard(u.device());
  ds::ScanParams p = make_params(u, delta, A, B, C, D, delta_bias, softplus);
  at::Tensor y = at::empty_like(u, u.options().dtype(out_float32 ? at::kFloat : u.scalar_type()));
  at::Tensor states = save_states ? at::empty({p.batch, p.channels, p.n_saved, ds::kStates}, u.options().dtype(at::kFloat))
                                  : at::empty({0}, u.options().dtype(at::kFloat));
  p.vec_bytes = vector_bytes(p.length, u.element_size(), {&u, &delta, &B, &C, &y});
  p.y = y.data_ptr();
  p.states = save_states ? states.data_ptr<float>() : nullptr;
  const cudaError_t err = ds::launch_scan_fwd(p, to_dtype(u, "u"), to_dtype(y, "y"), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "selective scan forward kernel failed: ", cudaGetErrorString(err));
  return {y, states};
}

// Returns (du, ddelta, dA, dB, dC, dD, ddelta_bias); du/ddelta in u's dtype, the rest float32
// (dD and ddelta_bias are empty tensors when D / delta_bias are None).
std::vector<at::Tensor> scan_bwd(const at::Tensor &u, const at::Tensor &delta, const at::Tensor &A,
                                 const at::Tensor &B, const at::Tensor &C, const std::optional<at::Tensor> &D,
                                 const std::optional<at::Tensor> &delta_bias, bool softplus, const at::Tensor &dy,
                                 const at::Tensor &states) {
  const c10::cuda::CUDAGuard guard(u.device());
  ds::ScanParams p = make_params(u, delta, A, B, C, D, delta_bias, softplus);
  check_tensor(dy, u, "dy");
  check_tensor(states, u, "states");
  TORCH_CHECK(dy.sizes() == u.sizes(), "dy must have u's shape ", u.sizes(), "; got ", dy.sizes());
  TORCH_CHECK(dy.scalar_type() == u.scalar_type() || dy.scalar_type() == at::kFloat,
              "dy must be float32 or u's dtype; got ", dy.scalar_type());
  TORCH_CHECK(states.scalar_type() == at::kFloat && states.numel() == (int64_t)p.batch * p.channels * p.n_saved * ds::kStates,
              "states must be the float32 tensor saved by the forward with save_states=True");
  const auto f32 = u.options().dtype(at::kFloat);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  p.vec_bytes = vector_bytes(p.length, u.element_size(), {&u, &delta, &B, &C, &dy});
  // The state at every chunk start, recomputed from the saved ones (freed when this call returns).
  at::Tensor chunk_states = at::empty({p.batch, p.channels, p.n_chunks, ds::kStates}, f32);
  p.states_in = states.data_ptr<float>();
  p.states = chunk_states.data_ptr<float>();
  cudaError_t err = ds::launch_scan_expand(p, to_dtype(u, "u"), stream);
  TORCH_CHECK(err == cudaSuccess, "selective scan state recompute kernel failed: ", cudaGetErrorString(err));
  at::Tensor du = at::empty_like(u);
  at::Tensor ddelta = at::empty_like(u);
  at::Tensor dA = at::zeros({p.channels, ds::kStates}, f32);
  at::Tensor dB = p.tiles > 1 ? at::zeros(B.sizes(), f32) : at::empty(B.sizes(), f32);
  at::Tensor dC = p.tiles > 1 ? at::zeros(C.sizes(), f32) : at::empty(C.sizes(), f32);
  at::Tensor dD = D ? at::zeros({p.channels}, f32) : at::empty({0}, f32);
  at::Tensor dbias = delta_bias ? at::zeros({p.channels}, f32) : at::empty({0}, f32);
  p.dy = dy.data_ptr();
  p.states_in = chunk_states.data_ptr<float>();
  p.states = nullptr;
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dA = dA.data_ptr<float>();
  p.dB = dB.data_ptr<float>();
  p.dC = dC.data_ptr<float>();
  p.dD = D ? dD.data_ptr<float>() : nullptr;
  p.dbias = delta_bias ? dbias.data_ptr<float>() : nullptr;
  err = ds::launch_scan_bwd(p, to_dtype(u, "u"), to_dtype(dy, "dy"), stream);
  TORCH_CHECK(err == cudaSuccess, "selective scan backward kernel failed: ", cudaGetErrorString(err));
  return {du, ddelta, dA, dB, dC, dD, dbias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "DefMamba selective scan (CUDA)";
  m.attr("STATES") = ds::kStates;
  m.attr("CHUNK") = ds::kChunk;
  m.attr("STATE_INTERVAL") = ds::kChunk * ds::kChunksPerState;
  m.def("fwd", &scan_fwd, "selective scan forward -> (y, states)", py::arg("u"), py::arg("delta"), py::arg("A"),
        py::arg("B"), py::arg("C"), py::arg("D"), py::arg("delta_bias"), py::arg("softplus"),
        py::arg("out_float32"), py::arg("save_states"));
  m.def("bwd", &scan_bwd, "selective scan backward -> (du, ddelta, dA, dB, dC, dD, ddelta_bias)", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("delta_bias"),
        py::arg("softplus"), py::arg("dy"), py::arg("states"));
}
