"""Triton backend of the selective scan: forward and backward kernels, no build step.

Same contract as :func:`defmamba.ops.selective_scan` for CUDA tensors in float32/float16/bfloat16,
any strides; the state is float32. With ``A_is_log`` the kernels take the logs log(−A), compute A
from them and return the logs' gradient. The forward keeps the state every 64 positions when a
gradient is needed; the backward recomputes the forward segment by segment and runs the reverse
recurrence one position at a time (:func:`_step_back`). When the batch leaves the GPU mostly idle
(long sequences of a few images), both directions cut the sequence into chunks run side by side
(:func:`_chunking`). Design and tile choices: docs/ops.md.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from torch import Tensor

from ..triton_launch import fast_launch
from ..triton_support import IMPORT_ERROR, interpreting, is_available, next_power_of_2, tl, triton
from .backend_op import scan_kernel_op

__all__ = ["is_available", "selective_scan_triton"]

_LOG2E = 1.4426950408889634
_CL = 4  # positions per register tile (the kernels are written for exactly 4)
_SEG = 64  # positions between stored forward states (multiple of _CL)
_poison = False


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Fill every output buffer with NaN before the kernels run (for tests: catches unwritten elements)."""
    global _poison
    old, _poison = _poison, True
    try:
        yield
    finally:
        _poison = old


def _new(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


if triton is not None:

    @triton.jit
    def _rows4(t):
        """[4, R] tile -> its four rows ([R] each), without leaving registers."""
        x = tl.trans(t)  # [R, 4]
        R: tl.constexpr = x.shape[0]
        even, odd = tl.split(tl.reshape(x, [R, 2, 2]))  # even[:, i] = row 2i of t, odd[:, i] = row 2i+1
        r0, r2 = tl.split(even)
        r1, r3 = tl.split(odd)
        return r0, r1, r2, r3

    @triton.jit
    def _stack4(r0, r1, r2, r3):
        """Inverse of _rows4: four [R] rows -> [4, R] tile."""
        R: tl.constexpr = r0.shape[0]
        return tl.trans(tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [R, 4]))

    @triton.jit
    def _time_step(raw, bias, SOFTPLUS: tl.constexpr):
        """Δ = softplus(raw + bias) (torch's threshold 20) or raw + bias, and dΔ/d(raw). raw: [CL, BLOCK_C]."""
        x = raw + bias[None, :]
        if SOFTPLUS:
            z = tl.exp(tl.minimum(x, 20.0))
            w = 1.0 + z
            # log1p(z) accurate for tiny z (w == 1 exactly means log1p(z) == z to float32 precision).
            log1p = tl.where(w == 1.0, z, tl.log(w) * (z / (w - 1.0)))
            dt = tl.where(x > 20.0, x, log1p)
            grad = tl.where(x > 20.0, 1.0, z / w)
        else:
            dt = x
            grad = tl.full(x.shape, 1.0, tl.float32)
        return dt, grad

    @triton.jit
    def _load_tiles(u_rows, dl_rows, B_rows, C_rows, pos, mc, mn, L_lim, su_l, sd_l, sB_l, sC_l):
        """u, delta ([CL, BLOCK_C]) and B, C ([N, CL]) at positions pos, in their stored dtype; 0 outside."""
        ml = (pos < L_lim) & (pos >= 0)
        m_lc = ml[:, None] & mc[None, :]
        m_nl = mn[:, None] & ml[None, :]
        uu = tl.load(u_rows[None, :] + pos[:, None] * su_l, mask=m_lc, other=0.0)
        raw = tl.load(dl_rows[None, :] + pos[:, None] * sd_l, mask=m_lc, other=0.0)
        bb = tl.load(B_rows[:, None] + pos[None, :] * sB_l, mask=m_nl, other=0.0)
        cc = tl.load(C_rows[:, None] + pos[None, :] * sC_l, mask=m_nl, other=0.0)
        return uu, raw, bb, cc

    @triton.jit
    def _load_A(A_ptr, n, c, m_nc, sA_n, sA_c, A_LOG: tl.constexpr):
        """A ([NP, BLOCK_C] float32, 0 outside the states and channels), or −exp of the logs stored there."""
        a = tl.load(A_ptr + n[:, None] * sA_n + c[None, :] * sA_c, mask=m_nc, other=0.0).to(tl.float32)
        if A_LOG:
            a = tl.where(m_nc, -tl.exp(a), 0.0)
        return a

    @triton.jit
    def _advance(h, a2, dt, du, b_col):
        """One step for all channels: h <- exp(Δ·A)·h + Δ·u·B; h, a2: [N, BLOCK_C]; dt, du: [BLOCK_C]; b_col: [N]."""
        return tl.exp2(dt[None, :] * a2) * h + du[None, :] * b_col[:, None]

    @triton.jit
    def _step_back(carry, dA_acc, h, h_prev, a2, dt, du, u, dy, b_col, c_col):
        """One position l of the backward, for all channels: h = h_l, h_prev = h_{l-1} ([N, BLOCK_C]);
        dt, du = Δ·u, u, dy: [BLOCK_C]; b_col, c_col: [N]. With g = dL/dh_l (its own output's part
        plus the carry from l+1) and t = dL/da_l · a_l, returns (the carry into l-1, dA_acc + t·Δ,
        the gradients of Δ (before softplus) and of u, of B_l and of C_l)."""
        g = carry + dy[None, :] * c_col[:, None]
        g_C = tl.sum(dy[None, :] * h, axis=1)
        a = tl.exp2(dt[None, :] * a2)
        t = g * a * h_prev
        dA_acc += t * dt[None, :]
        gb = tl.sum(g * b_col[:, None], axis=0)
        g_delta = tl.sum(t * a2, axis=0) * 0.6931471805599453 + u * gb  # Σ_n t·A
        g_u = dt * gb
        g_B = tl.sum(g * du[None, :], axis=1)
        return a * g, dA_acc, g_delta, g_u, g_B, g_C

    @triton.jit
    def _fold_chunks(state, a2, sdt_ptr, summary_ptr, rows, n, mc, m_nc, n_chunks, first, count, step,
                     NP: tl.constexpr):
        """state <- exp(ΣΔ_m·A)·state + summary_m for the ``count`` chunks m = first, first + step, …
        (the decay across chunk m is the exponential of its summed time steps ΣΔ_m): the state
        entering a chunk from the summaries of the chunks before it (forward, step 1), or the
        carry entering its last position from those after it (backward, step −1). rows: b·C + c."""
        for i in range(0, count):
            m = first + i * step
            sdt = tl.load(sdt_ptr + rows * n_chunks + m, mask=mc, other=0.0)
            part = tl.load(summary_ptr + (rows[None, :] * n_chunks + m) * NP + n[:, None], mask=m_nc, other=0.0)
            state = tl.exp2(sdt[None, :] * a2) * state + part
        return state

    @triton.jit
    def _program_tiles(A_ptr, bias_ptr, Dg, n_cb, K, n_chunks, sA_c, sA_n, N: tl.constexpr, NP: tl.constexpr,
                       BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, A_LOG: tl.constexpr):
        """A program's place in the flat grid of (image, group, channel block, chunk): its chunk, image
        b, group k, channels c with their mask, states n with their masks; and its tiles of A·log2(e)
        and of the time-step bias."""
        prog = tl.program_id(0).to(tl.int64)
        chunk = prog % n_chunks
        group_prog = prog // n_chunks
        b = group_prog // (K * n_cb)
        pid = (group_prog % (K * n_cb)).to(tl.int32)
        k = pid // n_cb
        cg = (pid % n_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
        mc = cg < Dg
        c = k * Dg + cg
        n = tl.arange(0, NP)
        mn = n < N
        m_nc = mn[:, None] & mc[None, :]
        a2 = _load_A(A_ptr, n, c, m_nc, sA_n, sA_c, A_LOG) * 1.4426950408889634
        if HAS_BIAS:
            bias = tl.load(bias_ptr + c, mask=mc, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros([BLOCK_C], tl.float32)
        return chunk, b, k, c, mc, n, mn, m_nc, a2, bias

    @fast_launch
    @triton.jit
    def _scan_fwd_summary_kernel(
        u_ptr, dl_ptr, A_ptr, B_ptr, bias_ptr, sdt_ptr, hl_ptr,
        L, L_al, Dg, C_tot, n_cb, K, n_chunks, chunk_len,
        su_b, su_c, su_l, sd_b, sd_c, sd_l, sA_c, sA_n, sB_b, sB_k, sB_n, sB_l,
        N: tl.constexpr, NP: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        ALIGN: tl.constexpr, A_LOG: tl.constexpr,
    ):
        """Per chunk of a chunked forward: the state at the chunk's end when it starts from zero,
        and the chunk's summed time steps ΣΔ (hl_ptr: (batch, C, chunks, NP), sdt_ptr: (batch, C,
        chunks), float32), which _fold_chunks combines."""
        CL: tl.constexpr = 4
        chunk, b, k, c, mc, n, mn, m_nc, a2, bias = _program_tiles(
            A_ptr, bias_ptr, Dg, n_cb, K, n_chunks, sA_c, sA_n, N, NP, BLOCK_C, HAS_BIAS, A_LOG)
        lc = tl.arange(0, CL)
        u_rows = u_ptr + (b * su_b + c * su_c) * ALIGN
        dl_rows = dl_ptr + (b * sd_b + c * sd_c) * ALIGN
        B_rows = B_ptr + (b * sB_b + k * sB_k + n * sB_n) * ALIGN
        L_lim = L_al * ALIGN
        l_begin = chunk * chunk_len
        h = tl.zeros([NP, BLOCK_C], tl.float32)
        sdt = tl.zeros([BLOCK_C], tl.float32)
        for l0 in range(l_begin, tl.minimum(L, l_begin + chunk_len), CL):
            pos = tl.max_contiguous(tl.multiple_of(l0 + lc, CL), CL)
            ml = pos < L_lim
            m_lc = ml[:, None] & mc[None, :]
            uu = tl.load(u_rows[None, :] + pos[:, None] * su_l, mask=m_lc, other=0.0).to(tl.float32)
            raw = tl.load(dl_rows[None, :] + pos[:, None] * sd_l, mask=m_lc, other=0.0).to(tl.float32)
            bb = tl.load(B_rows[:, None] + pos[None, :] * sB_l, mask=mn[:, None] & ml[None, :], other=0.0)
            dt, _ = _time_step(raw, bias, SOFTPLUS)
            dt = tl.where(m_lc, dt, 0.0)
            du = dt * uu
            dt0, dt1, dt2, dt3 = _rows4(dt)
            du0, du1, du2, du3 = _rows4(du)
            b0, b1, b2, b3 = _rows4(tl.trans(bb.to(tl.float32)))
            h = _advance(h, a2, dt0, du0, b0)
            h = _advance(h, a2, dt1, du1, b1)
            h = _advance(h, a2, dt2, du2, b2)
            h = _advance(h, a2, dt3, du3, b3)
            sdt += tl.sum(dt, axis=0)
        rows = b * C_tot + c
        tl.store(hl_ptr + (rows[None, :] * n_chunks + chunk) * NP + n[:, None], h, mask=mc[None, :])
        tl.store(sdt_ptr + rows * n_chunks + chunk, sdt, mask=mc)

    @fast_launch
    @triton.jit
    def _scan_bwd_summary_kernel(
        dl_ptr, A_ptr, C_ptr, bias_ptr, dy_ptr, sdt_ptr, cl_ptr,
        L, L_al, Dg, C_tot, n_cb, K, n_chunks, chunk_len,
        sd_b, sd_c, sd_l, sA_c, sA_n, sC_b, sC_k, sC_n, sC_l, sy_b, sy_c, sy_l,
        N: tl.constexpr, NP: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        ALIGN: tl.constexpr, A_LOG: tl.constexpr,
    ):
        """Per chunk of a chunked backward: the carry out of the chunk's first position when none
        enters its last (the reverse recurrence g_l = dy_l·C_l + exp(Δ_{l+1}A)·g_{l+1} over the
        chunk alone), and the chunk's summed time steps ΣΔ (cl_ptr: (batch, C, chunks, NP), sdt_ptr:
        (batch, C, chunks), float32), which _fold_chunks combines."""
        CL: tl.constexpr = 4
        chunk, b, k, c, mc, n, mn, m_nc, a2, bias = _program_tiles(
            A_ptr, bias_ptr, Dg, n_cb, K, n_chunks, sA_c, sA_n, N, NP, BLOCK_C, HAS_BIAS, A_LOG)
        lc = tl.arange(0, CL)
        dl_rows = dl_ptr + (b * sd_b + c * sd_c) * ALIGN
        dy_rows = dy_ptr + (b * sy_b + c * sy_c) * ALIGN
        C_rows = C_ptr + (b * sC_b + k * sC_k + n * sC_n) * ALIGN
        L_lim = L_al * ALIGN
        l_begin = chunk * chunk_len
        n_tiles = tl.cdiv(tl.minimum(L, l_begin + chunk_len) - l_begin, CL)
        carry = tl.zeros([NP, BLOCK_C], tl.float32)
        sdt = tl.zeros([BLOCK_C], tl.float32)
        for j in range(0, n_tiles):
            pos = tl.max_contiguous(tl.multiple_of(l_begin + (n_tiles - 1 - j) * CL + lc, CL), CL)
            ml = pos < L_lim
            m_lc = ml[:, None] & mc[None, :]
            raw = tl.load(dl_rows[None, :] + pos[:, None] * sd_l, mask=m_lc, other=0.0).to(tl.float32)
            dy = tl.load(dy_rows[None, :] + pos[:, None] * sy_l, mask=m_lc, other=0.0).to(tl.float32)
            cc = tl.load(C_rows[:, None] + pos[None, :] * sC_l, mask=mn[:, None] & ml[None, :], other=0.0)
            dt, _ = _time_step(raw, bias, SOFTPLUS)
            dt = tl.where(m_lc, dt, 0.0)
            dt0, dt1, dt2, dt3 = _rows4(dt)
            dy0, dy1, dy2, dy3 = _rows4(dy)
            c0, c1, c2, c3 = _rows4(tl.trans(cc.to(tl.float32)))
            carry = tl.exp2(dt3[None, :] * a2) * (carry + dy3[None, :] * c3[:, None])
            carry = tl.exp2(dt2[None, :] * a2) * (carry + dy2[None, :] * c2[:, None])
            carry = tl.exp2(dt1[None, :] * a2) * (carry + dy1[None, :] * c1[:, None])
            carry = tl.exp2(dt0[None, :] * a2) * (carry + dy0[None, :] * c0[:, None])
            sdt += tl.sum(dt, axis=0)
        rows = b * C_tot + c
        tl.store(cl_ptr + (rows[None, :] * n_chunks + chunk) * NP + n[:, None], carry, mask=mc[None, :])
        tl.store(sdt_ptr + rows * n_chunks + chunk, sdt, mask=mc)

    def _scan_fwd_kernel(
        u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, hs_ptr, sdt_ptr, hl_ptr,
        L, L_al, Dg, C_tot, n_cb, n_seg, K, n_chunks, chunk_len, st_c, st_n,
        su_b, su_c, su_l, sd_b, sd_c, sd_l, sA_c, sA_n,
        sB_b, sB_k, sB_n, sB_l, sC_b, sC_k, sC_n, sC_l, sy_b, sy_c, sy_l,
        N: tl.constexpr, NP: tl.constexpr, BLOCK_C: tl.constexpr, SEG: tl.constexpr,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE: tl.constexpr, ALIGN: tl.constexpr,
        A_LOG: tl.constexpr, CHUNKED: tl.constexpr,
    ):
        CL: tl.constexpr = 4
        # one flat grid axis (any batch size fits); with CHUNKED, the positions
        # [chunk·chunk_len, (chunk+1)·chunk_len) only
        chunk, b, k, c, mc, n, mn, m_nc, a2, bias = _program_tiles(
            A_ptr, bias_ptr, Dg, n_cb, K, n_chunks, sA_c, sA_n, N, NP, BLOCK_C, HAS_BIAS, A_LOG)
        lc = tl.arange(0, CL)
        if HAS_D:
            d_skip = tl.load(D_ptr + c, mask=mc, other=0.0).to(tl.float32)

        u_rows = u_ptr + (b * su_b + c * su_c) * ALIGN
        dl_rows = dl_ptr + (b * sd_b + c * sd_c) * ALIGN
        y_rows = y_ptr + (b * sy_b + c * sy_c) * ALIGN
        B_rows = B_ptr + (b * sB_b + k * sB_k + n * sB_n) * ALIGN
        C_rows = C_ptr + (b * sC_b + k * sC_k + n * sC_n) * ALIGN

        h = tl.zeros([NP, BLOCK_C], tl.float32)
        l_begin = 0
        l_end = L
        if CHUNKED:  # the state entering the chunk, from the summaries of the chunks before it
            l_begin = chunk * chunk_len
            l_end = tl.minimum(L, l_begin + chunk_len)
            h = _fold_chunks(h, a2, sdt_ptr, hl_ptr, b * C_tot + c, n, mc, m_nc, n_chunks, 0, chunk, 1, NP)
        L_lim = L_al * ALIGN  # == L; written so that the compiler sees 4-aligned bounds
        # Software pipelining: the tiles of the next 4 positions load while these are computed.
        nxt = tl.max_contiguous(tl.multiple_of(l_begin + lc, CL), CL)
        u_n, raw_n, b_n, c_n = _load_tiles(u_rows, dl_rows, B_rows, C_rows, nxt, mc, mn, L_lim, su_l, sd_l, sB_l, sC_l)
        for l0 in range(l_begin, l_end, CL):
            pos = tl.max_contiguous(tl.multiple_of(l0 + lc, CL), CL)
            m_lc = (pos < L_lim)[:, None] & mc[None, :]
            uu = u_n.to(tl.float32)
            raw = raw_n.to(tl.float32)
            bb = b_n.to(tl.float32)
            cc = c_n.to(tl.float32)
            nxt = tl.max_contiguous(tl.multiple_of(l0 + CL + lc, CL), CL)
            u_n, raw_n, b_n, c_n = _load_tiles(u_rows, dl_rows, B_rows, C_rows, nxt, mc, mn, L_lim, su_l, sd_l, sB_l, sC_l)
            dt, _ = _time_step(raw, bias, SOFTPLUS)
            dt = tl.where(m_lc, dt, 0.0)  # padded positions/channels: exp(0)=1, no input -> state unchanged
            du = dt * uu
            dt0, dt1, dt2, dt3 = _rows4(dt)
            du0, du1, du2, du3 = _rows4(du)
            b0, b1, b2, b3 = _rows4(tl.trans(bb))
            c0, c1, c2, c3 = _rows4(tl.trans(cc))
            h = _advance(h, a2, dt0, du0, b0)
            y0 = tl.sum(h * c0[:, None], axis=0)
            h = _advance(h, a2, dt1, du1, b1)
            y1 = tl.sum(h * c1[:, None], axis=0)
            h = _advance(h, a2, dt2, du2, b2)
            y2 = tl.sum(h * c2[:, None], axis=0)
            h = _advance(h, a2, dt3, du3, b3)
            y3 = tl.sum(h * c3[:, None], axis=0)
            y = _stack4(y0, y1, y2, y3)
            if HAS_D:
                y += d_skip[None, :] * uu
            tl.store(y_rows[None, :] + pos[:, None] * sy_l, y.to(y_ptr.dtype.element_ty), mask=m_lc)
            if SAVE:
                if ((l0 + CL) % SEG == 0) | (l0 + CL >= L):  # end of a segment: keep the state for the backward
                    hs_off = ((b * C_tot + c[None, :]) * n_seg + l0 // SEG) * st_c + n[:, None] * st_n
                    tl.store(hs_ptr + hs_off, h, mask=mc[None, :])

    def _scan_bwd_kernel(
        u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, dy_ptr, hs_ptr, sc_ptr,
        du_ptr, dd_ptr, parts_ptr, dB_ptr, dC_ptr, sdt_ptr, cl_ptr,
        L, L_al, Dg, C_tot, n_cb, n_seg, K, n_chunks, chunk_len, st_c, st_n,
        su_b, su_c, su_l, sd_b, sd_c, sd_l, sA_c, sA_n,
        sB_b, sB_k, sB_n, sB_l, sC_b, sC_k, sC_n, sC_l, sy_b, sy_c, sy_l,
        N: tl.constexpr, NP: tl.constexpr, BLOCK_C: tl.constexpr, SEG: tl.constexpr,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ALIGN: tl.constexpr,
        A_LOG: tl.constexpr, CHUNKED: tl.constexpr,
    ):
        CL: tl.constexpr = 4
        prog = tl.program_id(0).to(tl.int64)  # one flat grid axis: any batch size fits
        # with CHUNKED, the segments of positions [chunk·chunk_len, (chunk+1)·chunk_len) only
        chunk, b, k, c, mc, n, mn, m_nc, a2, bias = _program_tiles(
            A_ptr, bias_ptr, Dg, n_cb, K, n_chunks, sA_c, sA_n, N, NP, BLOCK_C, HAS_BIAS, A_LOG)
        cl_local = tl.arange(0, BLOCK_C)
        lc = tl.arange(0, CL)
        if HAS_D:
            d_skip = tl.load(D_ptr + c, mask=mc, other=0.0).to(tl.float32)

        # du/ddelta (batch, C, L) and dB/dC (batch, K, N, L) are contiguous buffers of the wrapper.
        u_rows = u_ptr + (b * su_b + c * su_c) * ALIGN
        dl_rows = dl_ptr + (b * sd_b + c * sd_c) * ALIGN
        dy_rows = dy_ptr + (b * sy_b + c * sy_c) * ALIGN
        g_rows = (b * C_tot + c) * L_al * ALIGN
        B_rows = B_ptr + (b * sB_b + k * sB_k + n * sB_n) * ALIGN
        C_rows = C_ptr + (b * sC_b + k * sC_k + n * sC_n) * ALIGN
        gBC_rows = ((b * K + k) * N + n) * L_al * ALIGN
        sc_tile = sc_ptr + prog * (SEG // CL * BLOCK_C * NP) + n[:, None] * st_n + cl_local[None, :] * st_c
        hs_rows = hs_ptr + (b * C_tot + c[None, :]) * n_seg * st_c + n[:, None] * st_n

        L_lim = L_al * ALIGN  # == L; written so that the compiler sees 4-aligned bounds
        carry = tl.zeros([NP, BLOCK_C], tl.float32)  # exp(Δ_{l+1}A)·g_{l+1}: what flows from l+1 into h_l
        seg_first = 0
        seg_end = n_seg
        if CHUNKED:  # the carry entering the chunk's last position, from the summaries of the chunks after it
            seg_first = chunk * (chunk_len // SEG)
            seg_end = tl.minimum(n_seg, seg_first + chunk_len // SEG)
            carry = _fold_chunks(carry, a2, sdt_ptr, cl_ptr, b * C_tot + c, n, mc, m_nc, n_chunks, n_chunks - 1,
                                 n_chunks - 1 - chunk, -1, NP)
        dA_acc = tl.zeros([NP, BLOCK_C], tl.float32)
        dD_acc = tl.zeros([BLOCK_C], tl.float32)
        db_acc = tl.zeros([BLOCK_C], tl.float32)
        for s in range(0, seg_end - seg_first):
            seg = seg_end - 1 - s
            l_start = seg * SEG
            n_sub = tl.cdiv(tl.minimum(SEG, L - l_start), CL)
            # State entering the segment (stored by the forward at the end of the previous one).
            h = tl.load(hs_rows + (seg - 1) * st_c, mask=m_nc & (seg > 0), other=0.0)
            # Pass 1: recompute the segment forward, parking the state entering each sub-chunk.
            # (Both passes load the tiles of their next sub-chunk while computing the current one.)
            nxt = tl.max_contiguous(tl.multiple_of(l_start + lc, CL), CL)
            u_n, raw_n, b_n, c_n = _load_tiles(u_rows, dl_rows, B_rows, C_rows, nxt, mc, mn, L_lim, su_l, sd_l, sB_l, sC_l)
            for i in range(0, n_sub):
                tl.store(sc_tile + i * (BLOCK_C * NP), h)
                pos = tl.max_contiguous(tl.multiple_of(l_start + i * CL + lc, CL), CL)
                m_lc = (pos < L_lim)[:, None] & mc[None, :]
                uu = u_n.to(tl.float32)
                raw = raw_n.to(tl.float32)
                bb = b_n.to(tl.float32)
                nxt = tl.max_contiguous(tl.multiple_of(l_start + i * CL + CL + lc, CL), CL)
                u_n, raw_n, b_n, c_n = _load_tiles(u_rows, dl_rows, B_rows, C_rows, nxt, mc, mn, L_lim, su_l, sd_l, sB_l, sC_l)
                dt, _ = _time_step(raw, bias, SOFTPLUS)
                dt = tl.where(m_lc, dt, 0.0)
                du = dt * uu
                dt0, dt1, dt2, dt3 = _rows4(dt)
                du0, du1, du2, du3 = _rows4(du)
                b0, b1, b2, b3 = _rows4(tl.trans(bb))
                h = _advance(h, a2, dt0, du0, b0)
                h = _advance(h, a2, dt1, du1, b1)
                h = _advance(h, a2, dt2, du2, b2)
                h = _advance(h, a2, dt3, du3, b3)
            # Pass 2: sub-chunks in reverse.
            nxt = tl.max_contiguous(tl.multiple_of(l_start + (n_sub - 1) * CL + lc, CL), CL)
            u_n, raw_n, b_n, c_n = _load_tiles(u_rows, dl_rows, B_rows, C_rows, nxt, mc, mn, L_lim, su_l, sd_l, sB_l, sC_l)
            dy_n = tl.load(dy_rows[None, :] + nxt[:, None] * sy_l, mask=(nxt < L_lim)[:, None] & mc[None, :], other=0.0)
            for j in range(0, n_sub):
                i = n_sub - 1 - j
                pos = tl.max_contiguous(tl.multiple_of(l_start + i * CL + lc, CL), CL)
                ml = pos < L_lim
                m_lc = ml[:, None] & mc[None, :]
                m_nl = mn[:, None] & ml[None, :]
                hp = tl.load(sc_tile + i * (BLOCK_C * NP))  # state before the sub-chunk (this thread wrote it)
                uu = u_n.to(tl.float32)
                raw = raw_n.to(tl.float32)
                dy = dy_n.to(tl.float32)
                bb = b_n.to(tl.float32)
                cc = c_n.to(tl.float32)
                # previous sub-chunk (positions -4..-1 when i == 0: masked off)
                nxt = tl.max_contiguous(tl.multiple_of(l_start + i * CL - CL + lc, CL), CL)
                m_nx = (nxt < L_lim) & (nxt >= 0)
                u_n, raw_n, b_n, c_n = _load_tiles(u_rows, dl_rows, B_rows, C_rows, nxt, mc, mn, L_lim, su_l, sd_l, sB_l, sC_l)
                dy_n = tl.load(dy_rows[None, :] + nxt[:, None] * sy_l, mask=m_nx[:, None] & mc[None, :], other=0.0)
                dt, sp_grad = _time_step(raw, bias, SOFTPLUS)
                dt = tl.where(m_lc, dt, 0.0)
                du = dt * uu
                dt0, dt1, dt2, dt3 = _rows4(dt)
                du0, du1, du2, du3 = _rows4(du)
                u0, u1, u2, u3 = _rows4(uu)
                dy0, dy1, dy2, dy3 = _rows4(dy)
                b0, b1, b2, b3 = _rows4(tl.trans(bb))
                c0, c1, c2, c3 = _rows4(tl.trans(cc))
                h0 = _advance(hp, a2, dt0, du0, b0)
                h1 = _advance(h0, a2, dt1, du1, b1)
                h2 = _advance(h1, a2, dt2, du2, b2)
                h3 = _advance(h2, a2, dt3, du3, b3)
                # The positions of the sub-chunk in reverse, each taking the carry from the next.
                carry, dA_acc, gd3, gu3, gB3, gC3 = _step_back(carry, dA_acc, h3, h2, a2, dt3, du3, u3, dy3, b3, c3)
                carry, dA_acc, gd2, gu2, gB2, gC2 = _step_back(carry, dA_acc, h2, h1, a2, dt2, du2, u2, dy2, b2, c2)
                carry, dA_acc, gd1, gu1, gB1, gC1 = _step_back(carry, dA_acc, h1, h0, a2, dt1, du1, u1, dy1, b1, c1)
                carry, dA_acc, gd0, gu0, gB0, gC0 = _step_back(carry, dA_acc, h0, hp, a2, dt0, du0, u0, dy0, b0, c0)

                g_u = _stack4(gu0, gu1, gu2, gu3)
                if HAS_D:
                    g_u += d_skip[None, :] * dy
                g_raw = tl.where(m_lc, _stack4(gd0, gd1, gd2, gd3) * sp_grad, 0.0)
                dD_acc += tl.sum(dy * uu, axis=0)
                db_acc += tl.sum(g_raw, axis=0)
                out_off = g_rows[None, :] + pos[:, None]
                tl.store(du_ptr + out_off, g_u.to(du_ptr.dtype.element_ty), mask=m_lc)
                tl.store(dd_ptr + out_off, g_raw.to(dd_ptr.dtype.element_ty), mask=m_lc)
                bc_off = gBC_rows[:, None] + pos[None, :]
                tl.atomic_add(dB_ptr + bc_off, tl.trans(_stack4(gB0, gB1, gB2, gB3)), mask=m_nl)
                tl.atomic_add(dC_ptr + bc_off, tl.trans(_stack4(gC0, gC1, gC2, gC3)), mask=m_nl)

        if A_LOG:  # the logs' gradient: dL/dlog = dL/dA · A
            dA_acc *= _load_A(A_ptr, n, c, m_nc, sA_n, sA_c, A_LOG)
        # This batch element's (and chunk's) partial sums, in its row of the wrapper's
        # (batch · chunks, C·NP + 2C) buffer: [dA (C, NP) | dD (C) | dbias (C)], reduced by one sum.
        row = (b * n_chunks + chunk) * (C_tot * NP + 2 * C_tot)
        tl.store(parts_ptr + row + c[None, :] * NP + n[:, None], dA_acc, mask=mc[None, :])
        tl.store(parts_ptr + row + C_tot * NP + c, dD_acc, mask=mc)
        tl.store(parts_ptr + row + C_tot * NP + C_tot + c, db_acc, mask=mc)


if triton is not None:
    # Each kernel in two compilations. "opaque": A's strides and the state strides st_c, st_n
    # (always NP and 1) are hidden from the compiler, so that no vectorised load of them chooses
    # the register layout of the state tile; it then follows the input tiles (one channel per
    # lane). "plain": the compiler sees them and settles on 4 states x 4 channels per thread,
    # which makes the reductions over channels (dB, dC) cheaper but moves every input column
    # through shared memory.
    _OPAQUE = ["sA_c", "sA_n", "st_c", "st_n"]
    _KERNELS = {
        ("fwd", True): fast_launch(triton.jit(do_not_specialize=_OPAQUE)(_scan_fwd_kernel)),
        ("fwd", False): fast_launch(triton.jit(_scan_fwd_kernel)),
        ("bwd", True): fast_launch(triton.jit(do_not_specialize=_OPAQUE)(_scan_bwd_kernel)),
        ("bwd", False): fast_launch(triton.jit(_scan_bwd_kernel)),
    }

# Launch configuration per direction: (most channels per program, opaque compilation).
_CONFIG = {"fwd": (32, False), "bwd": (16, True)}  # measured best on an H100 (docs/benchmarks.md)


def _block_c(group_channels: int, direction: str) -> int:
    """Channels per program: a power of two, at most one warp's worth, inside one group."""
    return max(8, min(_CONFIG[direction][0], next_power_of_2(group_channels)))


def _row_strides(length: int, a_t: torch.Tensor, *tensors: torch.Tensor) -> tuple[int, list[int]]:
    """(ALIGN, kernel stride arguments). Every stride but the last (position) one of u, delta,
    B, C and y/dy is passed divided by ALIGN = 4 when all of them (and L) are multiples of 4, so
    that the compiler can prove 16-byte alignment of each 4-position tile and vectorise it."""
    row = [st for t in tensors for st in t.stride()[:-1]]
    align = 4 if length % 4 == 0 and all(st % 4 == 0 for st in row) else 1
    args = []
    for i, t in enumerate(tensors):
        *lead, last = t.stride()
        args += [st // align for st in lead] + [last]
        if i == 1:  # A (read as its (N, C) transpose) comes after u and delta in the kernel signature
            args += [a_t.stride(1), a_t.stride(0)]
    return align, args


def _n_seg(length: int) -> int:
    return -(-length // _SEG)


# Chunked scans. Each program of the kernels runs its channels through the whole sequence, one
# warp each: a short batch (detection and segmentation sizes, small-batch inference) leaves most
# of the GPU idle while a few programs walk tens of thousands of positions. Then the sequence is
# cut into chunks of whole stored segments, run side by side: a summary pass gives each chunk's
# end state from a zero start (forward) or its outgoing carry from a zero end (backward) and its
# summed time steps, and the main kernels start each chunk from the combined summaries of the
# chunks before (after) it. The result is the same recurrence, rounded differently.
_CHUNK_BELOW = 2  # chunk when the grid has fewer programs than this per multiprocessor
_PROGRAMS_PER_SM = 8  # programs per multiprocessor a chunked grid aims for
_MIN_CHUNK_SEGMENTS = 4  # 256 positions: shorter chunks gain less than their summary pass costs
_multiprocessor_counts: dict[int, int] = {}


def _multiprocessors(device: torch.device) -> int:
    """The GPU's streaming multiprocessors (0 off the GPU: Triton's interpreter runs unchunked)."""
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _multiprocessor_counts:
        _multiprocessor_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _multiprocessor_counts[index]


def _chunking(n_seg: int, group_programs: int, device: torch.device) -> tuple[int, int]:
    """(chunks, positions per chunk) for a scan of ``n_seg`` stored segments whose unchunked grid
    has ``group_programs`` programs: (1, the whole sequence) unless that grid is short."""
    sms = _multiprocessors(device)
    whole = (1, n_seg * _SEG)
    if group_programs >= _CHUNK_BELOW * sms:
        return whole
    chunks = min(-(-_PROGRAMS_PER_SM * sms // group_programs), n_seg // _MIN_CHUNK_SEGMENTS)
    if chunks <= 1:
        return whole
    per_chunk = -(-n_seg // chunks)
    return -(-n_seg // per_chunk), per_chunk * _SEG


def _check_dtypes(u, delta, A, B, C, D, delta_bias) -> None:
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.dtype == torch.float64:
            raise TypeError(f"the triton selective-scan backend takes float32/float16/bfloat16 inputs; {name} is float64 "
                            "(use backend='torch' for float64)")
        if t is not None and not t.is_cuda and not interpreting():
            raise RuntimeError(f"the triton selective-scan backend needs CUDA tensors; {name} is on {t.device}")


def _forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             delta_bias: Optional[Tensor], delta_softplus: bool, out_dtype: Optional[torch.dtype],
             save_states: bool, A_is_log: bool) -> tuple[Tensor, Tensor]:
    batch, channels, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    dg = channels // groups
    block_c = _block_c(dg, "fwd")
    n_cb = -(-dg // block_c)
    n_seg = _n_seg(length)
    np_ = next_power_of_2(n_state)
    y = _new((batch, channels, length), out_dtype or u.dtype, u.device)
    states = _new((batch, channels, n_seg, np_) if save_states else (0,), torch.float32, u.device)
    # (N, C), A read in place through its strides: each program loads its (N, BLOCK_C) tile once
    a_t = A.to(torch.float32).t()
    align, strides = _row_strides(length, a_t, u, delta, B, C, y)
    group_programs = batch * groups * n_cb
    n_chunks, chunk_len = _chunking(n_seg, group_programs, u.device)
    bias = delta_bias if delta_bias is not None else A
    flags = dict(N=n_state, NP=np_, BLOCK_C=block_c, HAS_BIAS=delta_bias is not None,
                 SOFTPLUS=bool(delta_softplus), ALIGN=align, A_LOG=bool(A_is_log))
    summed_dt = end_states = y
    if n_chunks > 1:
        summed_dt = torch.empty((batch, channels, n_chunks), dtype=torch.float32, device=u.device)
        end_states = torch.empty((batch, channels, n_chunks, np_), dtype=torch.float32, device=u.device)
        _scan_fwd_summary_kernel[(group_programs * n_chunks,)](
            u, delta, a_t, B, bias, summed_dt, end_states,
            length, length // align, dg, channels, n_cb, groups, n_chunks, chunk_len, *strides[:12],
            **flags, num_warps=1)
    _KERNELS["fwd", _CONFIG["fwd"][1]][(group_programs * n_chunks,)](
        u, delta, a_t, B, C, D if D is not None else A, bias, y, states, summed_dt, end_states,
        length, length // align, dg, channels, n_cb, n_seg, groups, n_chunks, chunk_len, np_, 1, *strides,
        SEG=_SEG, HAS_D=D is not None, SAVE=bool(save_states), CHUNKED=n_chunks > 1, **flags,
        num_warps=1,
    )
    return y, states


def _forward_fake(u, delta, A, B, C, D, delta_bias, delta_softplus, out_dtype, save_states, A_is_log):
    batch, channels, length = u.shape
    np_ = 1 << max(A.shape[1] - 1, 0).bit_length()
    y = u.new_empty((batch, channels, length), dtype=out_dtype or u.dtype)
    shape = (batch, channels, _n_seg(length), np_) if save_states else (0,)
    return y, u.new_empty(shape, dtype=torch.float32)


def _gradients(dy: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
               delta_bias: Optional[Tensor], states: Tensor, delta_softplus: bool,
               A_is_log: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward kernel's raw outputs (du, ddelta, dBC, partials); :func:`_unpack_gradients`
    turns them into the seven gradients. dBC (2, batch, K, N, L) float32 holds dB and dC, which the
    kernel accumulates atomically (one zero fill for both); partials (batch, C·NP + 2C) float32
    holds each batch element's dA (of the logs with ``A_is_log``), dD and dbias, reduced by one sum."""
    batch, channels, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    dg = channels // groups
    block_c = _block_c(dg, "bwd")
    n_cb = -(-dg // block_c)
    n_seg = _n_seg(length)
    np_ = next_power_of_2(n_state)
    if states.shape != (batch, channels, n_seg, np_):
        raise RuntimeError("selective scan backward: the forward did not keep its states; "
                           "run the forward with gradients enabled")
    dev = u.device
    group_programs = batch * groups * n_cb
    n_chunks, chunk_len = _chunking(n_seg, group_programs, dev)
    du = _new((batch, channels, length), u.dtype, dev)
    ddelta = _new((batch, channels, length), delta.dtype, dev)
    partials = _new((batch * n_chunks, channels * np_ + 2 * channels), torch.float32, dev)
    dBC = torch.zeros((2, batch, groups, n_state, length), dtype=torch.float32, device=dev)
    scratch = torch.empty((group_programs * n_chunks, _SEG // _CL, block_c, np_), dtype=torch.float32, device=dev)
    a_t = A.to(torch.float32).t()
    # du/ddelta/dB/dC are fresh contiguous buffers: aligned exactly when the inputs' rows are.
    align, strides = _row_strides(length, a_t, u, delta, B, C, dy)
    bias = delta_bias if delta_bias is not None else A
    flags = dict(N=n_state, NP=np_, BLOCK_C=block_c, HAS_BIAS=delta_bias is not None,
                 SOFTPLUS=bool(delta_softplus), ALIGN=align, A_LOG=bool(A_is_log))
    summed_dt = carries = partials
    if n_chunks > 1:
        summed_dt = torch.empty((batch, channels, n_chunks), dtype=torch.float32, device=dev)
        carries = torch.empty((batch, channels, n_chunks, np_), dtype=torch.float32, device=dev)
        _scan_bwd_summary_kernel[(group_programs * n_chunks,)](
            delta, a_t, C, bias, dy, summed_dt, carries,
            length, length // align, dg, channels, n_cb, groups, n_chunks, chunk_len,
            *strides[3:8], *strides[12:19], **flags, num_warps=1)
    _KERNELS["bwd", _CONFIG["bwd"][1]][(group_programs * n_chunks,)](
        u, delta, a_t, B, C, D if D is not None else A, bias, dy, states, scratch,
        du, ddelta, partials, dBC[0], dBC[1], summed_dt, carries,
        length, length // align, dg, channels, n_cb, n_seg, groups, n_chunks, chunk_len, np_, 1, *strides,
        SEG=_SEG, HAS_D=D is not None, CHUNKED=n_chunks > 1, **flags,
        num_warps=1,
    )
    if n_chunks > 1:  # one row per batch element, as the fake (shape-only) implementation promises
        partials = partials.view(batch, n_chunks, -1).sum(1)
    return du, ddelta, dBC, partials


def _gradients_fake(dy, u, delta, A, B, C, D, delta_bias, states, delta_softplus, A_is_log):
    # The real backward returns fresh contiguous buffers; the fake must promise the same strides
    # (empty_like would copy the strides of non-contiguous inputs such as sliced B/C views).
    batch, channels, length = u.shape
    np_ = 1 << max(A.shape[1] - 1, 0).bit_length()
    f32 = torch.float32
    return (u.new_empty(u.shape), delta.new_empty(delta.shape), B.new_empty((2, *B.shape), dtype=f32),
            u.new_empty((batch, channels * np_ + 2 * channels), dtype=f32))


def _unpack_gradients(raw: tuple[Tensor, ...], A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      delta_bias: Optional[Tensor]) -> tuple[Tensor, ...]:
    """The seven gradients (du, ddelta, dA, dB, dC, dD, dbias) in their inputs' dtypes from
    :func:`_gradients`' packed buffers: one sum for dA, dD and dbias, at most one cast for dB and dC."""
    du, ddelta, dBC, partials = raw
    channels, n_state = A.shape
    np_ = (partials.shape[1] - 2 * channels) // channels
    sums = partials.sum(0)
    dA = sums[: channels * np_].view(channels, np_)[:, :n_state].to(A.dtype)
    dD = sums[channels * np_: channels * np_ + channels]
    dbias = sums[channels * np_ + channels:]
    if B.dtype == C.dtype:
        dB, dC = dBC.to(B.dtype).unbind(0)
    else:
        dB, dC = dBC[0].to(B.dtype), dBC[1].to(C.dtype)
    return (du, ddelta, dA, dB, dC, dD if D is None else dD.to(D.dtype),
            dbias if delta_bias is None else dbias.to(delta_bias.dtype))


_scan = scan_kernel_op("selective_scan_triton", _forward, _forward_fake, _gradients, _gradients_fake,
                       unpack=_unpack_gradients)


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    out_dtype: Optional[torch.dtype] = None,
    A_is_log: bool = False,
) -> torch.Tensor:
    """Selective scan on the GPU through Triton; same contract as :func:`defmamba.ops.selective_scan`.

    u, delta, B, C may be float32, float16 or bfloat16 and non-contiguous; A, D, delta_bias are
    read as float32; the state is float32. With ``A_is_log``, A holds log(−A) and the kernels
    compute −exp of it in float32. Differentiable in all tensor inputs.
    """
    if triton is None:
        raise RuntimeError(f"the triton selective-scan backend is not available: {IMPORT_ERROR}")
    _check_dtypes(u, delta, A, B, C, D, delta_bias)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, delta_bias))
    y, _ = _scan(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), out_dtype, need_grad, bool(A_is_log))
    return y
