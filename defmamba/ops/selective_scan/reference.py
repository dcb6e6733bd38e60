"""Pure-PyTorch selective scan (Mamba S6): the numerical ground truth of every backend.

The recurrence, for every batch element b and channel c (c = k·Dg + d in group k):

    Δ_l = softplus(delta_l + delta_bias_c)          (softplus optional)
    h_l = exp(Δ_l · A_c) ⊙ h_{l-1} + Δ_l · u_l · B_{k,l}
    y_l = <C_{k,l}, h_l> + D_c · u_l

is a first-order linear recurrence h_l = a_l ⊙ h_{l-1} + b_l. Composing two steps is
associative, (a1, b1) then (a2, b2) = (a1·a2, a2·b1 + b2), so the whole sequence is solved in
ceil(log2 L) vectorised doubling passes (Hillis–Steele) instead of L Python iterations. Every
factor a = exp(Δ·A) lies in [0, 1] because Δ ≥ 0 and A ≤ 0 in the model; products of them only
shrink, so the scan cannot overflow for any sequence length or magnitude of Δ·A (there is no
division and no exp of a positive cumulative sum, unlike the cumsum formulation).

The computation runs in float64 when any floating input is float64 and in float32 otherwise
(float16/bfloat16 inputs are upcast), so the state is never held in a half type. Autograd
differentiates it directly; it is meant for correctness and CPU use, not speed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_torch", "scan_compute_dtype"]


def scan_compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any given tensor is float64, else float32 (the state precision)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _linear_recurrence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve h_l = a_l * h_{l-1} + b_l (h_{-1} = 0) along dim -2 by recursive doubling."""
    length = a.shape[-2]
    if length == 1:  # h_0 = a_0·h_{-1} + b_0 with h_{-1} = 0: keep a in the graph (its gradient is 0),
        return b + a * 0  # as distributed training requires of every parameter
    shift = 1
    while shift < length:
        # Prefix [0, shift) is already final; positions >= shift absorb the block ending shift earlier.
        b = torch.cat([b[..., :shift, :], b[..., shift:, :] + a[..., shift:, :] * b[..., :-shift, :]], dim=-2)
        if shift * 2 < length:  # the composed decay is only needed by a further pass
            a = torch.cat([a[..., :shift, :], a[..., shift:, :] * a[..., :-shift, :]], dim=-2)
        shift *= 2
    return b


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Selective scan in plain PyTorch; same signature as :func:`defmamba.ops.selective_scan`.

    Shapes: u, delta (batch, K·Dg, L); A (K·Dg, N); B, C (batch, K, N, L); D, delta_bias (K·Dg,).
    Returns y (batch, K·Dg, L) in ``out_dtype`` (default: u's dtype).
    """
    batch, channels, length = u.shape
    groups = B.shape[1]
    compute = scan_compute_dtype(u, delta, A, B, C, D, delta_bias)
    out_dtype = u.dtype if out_dtype is None else out_dtype

    u_c = u.to(compute)
    dt = delta.to(compute)
    if delta_bias is not None:
        dt = dt + delta_bias.to(compute)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    # Per-channel B/C: channel c reads group c // (channels // groups).
    B_c = B.to(compute).repeat_interleave(channels // groups, dim=1).transpose(-1, -2)  # (b, c, L, N)
    C_c = C.to(compute).repeat_interleave(channels // groups, dim=1).transpose(-1, -2)

    decay = torch.exp(dt.unsqueeze(-1) * A.to(compute)[:, None, :])  # (b, c, L, N), in [0, 1] for A <= 0
    drive = (dt * u_c).unsqueeze(-1) * B_c
    state = _linear_recurrence(decay, drive)
    y = (state * C_c).sum(-1)
    if D is not None:
        y = y + D.to(compute)[:, None] * u_c
    return y.to(out_dtype)
