"""The deformable state-space token mixer (DSSM) of a DefMamba block.

Three token orders of the same (B, D, h, w) map are scanned by one selective scan call:
raster, reversed raster and the content-dependent deformable order; the three outputs are
brought back to raster order, averaged, gated by SiLU(z) and projected out.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops.depthwise_conv import DepthwiseConv2d, depthwise_conv2d_silu
from ..ops.scan_orders import merge_and_gate, stack_scan_orders
from ..ops.selective_scan import selective_scan
from ..ops.time_step_projection import project_time_steps
from .deformable import DeformableLayer

__all__ = ["DSSM", "NUM_SCANS"]

NUM_SCANS = 3  # raster, reversed raster, deformable


def _dt_bias_init(size: tuple[int, ...], dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> torch.Tensor:
    """Inverse softplus of time steps drawn log-uniformly in [dt_min, dt_max]."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class DSSM(nn.Module):
    """Deformable SSM mixer on a channels-last (B, h, w, C) map.

    Parameter names follow the official checkpoints (``x_proj_weight``, ``dt_projs_*``,
    ``A_logs``, ``Ds``, ``DS``), so their weights load unchanged.
    """

    def __init__(self, d_model: int, deform_kernel_size: int, d_state: int = 16, ssm_ratio: float = 1.0,
                 conv_kernel_size: int = 3, scan_backend: str = "auto") -> None:
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        dt_rank = math.ceil(d_model / 16)
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.scan_backend = scan_backend

        # Directly registered parameters come first in the state dict, as in the official model.
        bound = d_inner ** -0.5  # default nn.Linear(d_inner, ...) init of the per-scan projections
        self.x_proj_weight = nn.Parameter(torch.empty(NUM_SCANS, dt_rank + 2 * d_state, d_inner).uniform_(-bound, bound))
        self.dt_projs_weight = nn.Parameter(torch.empty(NUM_SCANS, d_inner, dt_rank).uniform_(-dt_rank ** -0.5, dt_rank ** -0.5))
        self.dt_projs_bias = nn.Parameter(_dt_bias_init((NUM_SCANS, d_inner)))
        a_init = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(NUM_SCANS * d_inner, 1)
        self.A_logs = nn.Parameter(a_init)
        self.Ds = nn.Parameter(torch.ones(NUM_SCANS * d_inner))

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = DepthwiseConv2d(d_inner, conv_kernel_size)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.DS = DeformableLayer(d_inner, deform_kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, h, w, _ = x.shape
        length = h * w
        x_in, z = self.in_proj(x).chunk(2, dim=-1)
        # Both halves are read in place: the depthwise conv reads the channel slice of the
        # channels-last in_proj output directly (its Triton kernels take the pixel stride 2D), and
        # so does the gate at the end, which applies SiLU(z) itself. The two keep in_proj's output
        # for their backward, as many bytes as dense copies of both halves would be, without the
        # copies, and no SiLU(z) tensor is written or kept.
        # The conv's SiLU is applied as the conv writes its output (ops/depthwise_conv/).
        x_in = depthwise_conv2d_silu(x_in.permute(0, 3, 1, 2), self.conv2d.weight, self.conv2d.bias)  # (B, D, h, w)

        deformable = self.DS(x_in)
        # Raster, reversed raster and deformable order as one (B, 3, D, L) scan input, all three in
        # the activation dtype (the PyTorch sampling gives float32 under autocast; the state stays
        # float32 in the scan).
        xs = stack_scan_orders(x_in, deformable.sequence)
        ys = self._scan(xs).view(batch, NUM_SCANS, self.d_inner, length)

        # The three outputs averaged in raster order, channels-last, times SiLU(z) (ops/scan_orders/).
        return self.out_proj(merge_and_gate(ys, deformable.order, deformable.inverse, z))

    def _scan(self, xs: torch.Tensor) -> torch.Tensor:
        """Per-scan projections to (Δ, B, C), then one grouped selective scan over all K·D channels.

        The projections are batched matmuls over (batch, scan) (the rank-R one to Δ through
        ops/time_step_projection/): they read the stacked sequences and the time steps in place
        and write (B, K, ·, L) results, so no transposed copy of xs is made or kept for the
        backward (an einsum would make one)."""
        batch, _, _, length = xs.shape
        x_dbl = torch.matmul(self.x_proj_weight, xs)  # (K, R+2N, D) @ (B, K, D, L) → (B, K, R+2N, L)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        # dt, B and C are read in place (views of x_dbl, which the scan's backward keeps for B and C).
        delta = project_time_steps(self.dt_projs_weight, dt)  # (K, D, R) @ (B, K, R, L) → (B, K, D, L)
        return selective_scan(
            xs.reshape(batch, -1, length), delta.reshape(batch, -1, length),
            self.A_logs.float(), B, C, self.Ds.float(), self.dt_projs_bias.float().flatten(),
            delta_softplus=True, out_dtype=torch.promote_types(xs.dtype, torch.float32), backend=self.scan_backend,
            A_is_log=True,
        )
