"""Fused linear + KL imitation loss in Triton: logits are never materialized.

For student rows ``h_s`` [N, H], teacher rows ``h_t`` [N, Ht], head weights ``W`` [V, H] and
``W_t`` [V, Ht] (optional biases), temperature ``T``, and integer targets with an ignore index::

    z_s = h_s W^T + b        z_t = h_t W_t^T + b_t
    row_loss = kl_weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
             + ce_weight * CE(z_s, target)                   (0 on ignored rows)

and, in the same call, the gradients of ``sum_i row_scale[i] * row_loss[i]`` with respect to
``h_s``, ``W`` and ``b`` (the loss is the last op of a step, so they are formed in the forward and
only scaled in backward; the head weight is not needed again after this call).

Two kernels, both tiled over rows (BLOCK_M) and vocabulary (BLOCK_V), with the hidden dimension
reduced in BLOCK_K chunks by ``tl.dot`` with fp32 accumulation:

1. ``_stats_kernel`` (grid: row blocks). One pass over V keeps, per row, the running max and sum of
   exp for both tempered distributions, the running sum of ``exp(z_t/T - m_t) * (z_t - z_s)/T``
   (rescaled like the sums whenever the teacher max moves), and for cross-entropy the running
   log-sum-exp of the untempered student logits and the target logit. At the end
   ``KL = acc / l_t - lse_t + lse_s``. Only O(N) floats are written.
2. ``_grad_kernel`` (grid: row blocks x vocabulary blocks). Recomputes the two logit tiles, forms
   ``G = row_scale * (kl_weight * T * (p_s - p_t) + ce_weight * (softmax(z_s) - onehot))`` for the
   tile and adds ``G @ W`` into the fp32 hidden gradient, ``G^T @ h_s`` into the fp32 weight
   gradient and the column sums of ``G`` into the bias gradient with atomic adds.

All logits and softmax arithmetic are fp32 whatever the input dtype. Under the Triton interpreter
(``TRITON_INTERPRET=1``, used by the CPU tests) half-precision tiles are upcast to fp32 right after
loading, since the interpreter's bf16 arithmetic is unreliable.
"""

from __future__ import annotations

import os

import torch

try:  # triton is a hard dependency of the package, but keep the import failure readable
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = exc


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if triton is None:
        return False
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return True
    return interpreter_enabled()


def fused_linear_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    target: torch.Tensor | None,
    row_scale: torch.Tensor,
    *,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    need_grad_hidden: bool = True,
    need_grad_weight: bool = False,
    need_grad_bias: bool = False,
    block_m: int | None = None,
    block_v: int | None = None,
    block_k: int | None = None,
):
    """Row losses and gradients of ``sum(row_scale * row_loss)`` (see the module docstring).

    Shapes: ``student_hidden`` [N, H], ``teacher_hidden`` [N, Ht], ``weight`` [V, H],
    ``teacher_weight`` [V, Ht], biases [V], ``target`` [N] (int) or None, ``row_scale`` [N] fp32.
    Inputs are assumed validated by the caller (``mtbi_fast.loss``).

    Returns ``(row_loss [N] fp32, grad_hidden [N, H] fp32 | None, grad_weight [V, H] fp32 | None,
    grad_bias [V] fp32 | None)``.
    """
    if triton is None:
        raise RuntimeError(f"triton could not be imported: {_TRITON_IMPORT_ERROR!r}")
    device = student_hidden.device
    if device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            "the triton backend needs CUDA tensors (got tensors on "
            f"{device.type!r}); set TRITON_INTERPRET=1 before importing triton to run the kernels "
            "on the CPU interpreter, or use backend='chunked'"
        )
    interpret = device.type != "cuda"

    h_s = student_hidden.contiguous()
    h_t = teacher_hidden.contiguous()
    w = weight.contiguous()
    w_t = teacher_weight.contiguous()
    n, hidden = h_s.shape
    vocab = w.shape[0]
    hidden_t = h_t.shape[1]
    has_target = target is not None
    tgt = target.contiguous().to(torch.int64) if has_target else h_s.new_empty(1, dtype=torch.int64)
    row_scale = row_scale.contiguous().to(torch.float32)
    dummy = h_s.new_empty(1, dtype=torch.float32)
    b = bias.contiguous() if bias is not None else dummy
    b_t = teacher_bias.contiguous() if teacher_bias is not None else dummy

    # fp32 inputs: exact fp32 dots (no TF32). Half inputs on GPU: tensor-core dots, fp32 accumulate.
    fp32_dots = interpret or h_s.dtype == torch.float32
    if block_m is None:
        block_m = 32 if interpret else 64
    if block_v is None:
        block_v = 64 if interpret else 128
    if block_k is None:
        block_k = 32 if interpret else 64

    row_loss = torch.empty(n, device=device, dtype=torch.float32)
    lse_s = torch.empty(n, device=device, dtype=torch.float32)
    lse_t = torch.empty(n, device=device, dtype=torch.float32)
    lse_c = torch.empty(n, device=device, dtype=torch.float32)
    if n == 0:
        return (row_loss, h_s.new_zeros(0, hidden, dtype=torch.float32) if need_grad_hidden else None,
                w.new_zeros(vocab, hidden, dtype=torch.float32) if need_grad_weight else None,
                w.new_zeros(vocab, dtype=torch.float32) if need_grad_bias else None)

    inv_t = 1.0 / float(temperature)
    separate_ce = ce_weight != 0.0 and inv_t != 1.0
    common = dict(
        HAS_BIAS=bias is not None, HAS_T_BIAS=teacher_bias is not None, HAS_TARGET=has_target,
        DO_CE=ce_weight != 0.0, SEPARATE_CE=separate_ce, FP32_DOTS=fp32_dots,
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k,
    )
    _stats_kernel[(triton.cdiv(n, block_m),)](
        h_s, h_t, w, w_t, b, b_t, tgt, row_loss, lse_s, lse_t, lse_c,
        n, vocab, hidden, hidden_t,
        h_s.stride(0), h_t.stride(0), w.stride(0), w_t.stride(0),
        inv_t, kl_weight * float(temperature) ** 2, ce_weight, ignore_index,
        **common,
    )

    grad_hidden = grad_weight = grad_bias = None
    if need_grad_hidden or need_grad_weight or need_grad_bias:
        gh = torch.zeros(n, hidden, device=device, dtype=torch.float32) if need_grad_hidden else dummy
        gw = torch.zeros(vocab, hidden, device=device, dtype=torch.float32) if need_grad_weight else dummy
        gb = torch.zeros(vocab, device=device, dtype=torch.float32) if need_grad_bias else dummy
        _grad_kernel[(triton.cdiv(n, block_m), triton.cdiv(vocab, block_v))](
            h_s, h_t, w, w_t, b, b_t, tgt, row_scale, lse_s, lse_t, lse_c, gh, gw, gb,
            n, vocab, hidden, hidden_t,
            h_s.stride(0), h_t.stride(0), w.stride(0), w_t.stride(0),
            inv_t, kl_weight * float(temperature), ce_weight, ignore_index,
            GRAD_H=need_grad_hidden, GRAD_W=need_grad_weight, GRAD_B=need_grad_bias,
            **common,
        )
        grad_hidden = gh if need_grad_hidden else None
        grad_weight = gw if need_grad_weight else None
        grad_bias = gb if need_grad_bias else None
    return row_loss, grad_hidden, grad_weight, grad_bias


if triton is not None:

    @triton.jit
    def _logits_tile(X, Wm, offs_m, offs_v, mask_m, mask_v, n_k, stride_x, stride_w,
                     FP32_DOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        """[BLOCK_M, BLOCK_V] fp32 tile of X[offs_m] @ W[offs_v]^T, reduced over n_k columns."""
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, n_k, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < n_k
            x = tl.load(X + offs_m[:, None] * stride_x + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(Wm + offs_v[:, None] * stride_w + offs_k[None, :],
                         mask=mask_v[:, None] & mask_k[None, :], other=0.0)
            if FP32_DOTS:
                acc += tl.dot(x.to(tl.float32), tl.trans(wt.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(wt))
        return acc

    @triton.jit
    def _stats_kernel(
        HS, HT, W, WT, B, BT, TGT, ROW_LOSS, LSE_S, LSE_T, LSE_C,
        n_rows, n_vocab, n_hidden, n_hidden_t,
        stride_hs, stride_ht, stride_w, stride_wt,
        inv_t, kl_scale, ce_weight, ignore_index,
        HAS_BIAS: tl.constexpr, HAS_T_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr,
        DO_CE: tl.constexpr, SEPARATE_CE: tl.constexpr, FP32_DOTS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < n_rows
        neg_inf = float("-inf")
        m_s = tl.full((BLOCK_M,), neg_inf, tl.float32)
        l_s = tl.zeros((BLOCK_M,), tl.float32)
        m_t = tl.full((BLOCK_M,), neg_inf, tl.float32)
        l_t = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M,), tl.float32)  # sum exp(t - m_t) * (t - s)
        m_c = tl.full((BLOCK_M,), neg_inf, tl.float32)
        l_c = tl.zeros((BLOCK_M,), tl.float32)
        z_tgt = tl.zeros((BLOCK_M,), tl.float32)
        if HAS_TARGET:
            tgt = tl.load(TGT + offs_m, mask=mask_m, other=ignore_index)
        else:
            tgt = tl.full((BLOCK_M,), -1, tl.int64)

        for v0 in range(0, n_vocab, BLOCK_V):
            offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            mask_v = offs_v < n_vocab
            zs = _logits_tile(HS, W, offs_m, offs_v, mask_m, mask_v, n_hidden, stride_hs, stride_w,
                              FP32_DOTS, BLOCK_M, BLOCK_V, BLOCK_K)
            zt = _logits_tile(HT, WT, offs_m, offs_v, mask_m, mask_v, n_hidden_t, stride_ht,
                              stride_wt, FP32_DOTS, BLOCK_M, BLOCK_V, BLOCK_K)
            if HAS_BIAS:
                zs += tl.load(B + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
            if HAS_T_BIAS:
                zt += tl.load(BT + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
            s = tl.where(mask_v[None, :], zs * inv_t, neg_inf)
            t = tl.where(mask_v[None, :], zt * inv_t, neg_inf)

            m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
            l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s - m_s_new[:, None]), axis=1)
            m_s = m_s_new

            m_t_new = tl.maximum(m_t, tl.max(t, axis=1))
            alpha_t = tl.exp(m_t - m_t_new)
            e_t = tl.exp(t - m_t_new[:, None])
            diff = (zt - zs) * inv_t  # finite everywhere; e_t is 0 on padded columns
            l_t = l_t * alpha_t + tl.sum(e_t, axis=1)
            acc = acc * alpha_t + tl.sum(e_t * diff, axis=1)
            m_t = m_t_new

            if DO_CE:
                if SEPARATE_CE:
                    c = tl.where(mask_v[None, :], zs, neg_inf)
                    m_c_new = tl.maximum(m_c, tl.max(c, axis=1))
                    l_c = l_c * tl.exp(m_c - m_c_new) + tl.sum(tl.exp(c - m_c_new[:, None]), axis=1)
                    m_c = m_c_new
                hit = offs_v[None, :] == tgt[:, None]
                z_tgt += tl.sum(tl.where(hit, zs, 0.0), axis=1)

        lse_s = m_s + tl.log(l_s)
        lse_t = m_t + tl.log(l_t)
        kl = acc / l_t - lse_t + lse_s
        loss = kl_scale * kl
        if DO_CE:
            if SEPARATE_CE:
                lse_c = m_c + tl.log(l_c)
            else:
                lse_c = lse_s
            loss += ce_weight * (lse_c - z_tgt)
            tl.store(LSE_C + offs_m, lse_c, mask=mask_m)
        valid = mask_m
        if HAS_TARGET:
            valid = valid & (tgt != ignore_index)
        loss = tl.where(valid, loss, 0.0)
        tl.store(ROW_LOSS + offs_m, loss, mask=mask_m)
        tl.store(LSE_S + offs_m, lse_s, mask=mask_m)
        tl.store(LSE_T + offs_m, lse_t, mask=mask_m)

    @triton.jit
    def _grad_kernel(
        HS, HT, W, WT, B, BT, TGT, ROW_SCALE, LSE_S, LSE_T, LSE_C, GH, GW, GB,
        n_rows, n_vocab, n_hidden, n_hidden_t,
        stride_hs, stride_ht, stride_w, stride_wt,
        inv_t, kl_grad_scale, ce_weight, ignore_index,
        HAS_BIAS: tl.constexpr, HAS_T_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr,
        DO_CE: tl.constexpr, SEPARATE_CE: tl.constexpr, FP32_DOTS: tl.constexpr,
        GRAD_H: tl.constexpr, GRAD_W: tl.constexpr, GRAD_B: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_v = tl.program_id(1)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_m = offs_m < n_rows
        mask_v = offs_v < n_vocab
        scale = tl.load(ROW_SCALE + offs_m, mask=mask_m, other=0.0)
        if HAS_TARGET:
            tgt = tl.load(TGT + offs_m, mask=mask_m, other=ignore_index)
            scale = tl.where(tgt != ignore_index, scale, 0.0)
        # A tile whose rows all have zero weight (ignored or padding) contributes nothing.
        if tl.max(tl.abs(scale), axis=0) > 0.0:
            zs = _logits_tile(HS, W, offs_m, offs_v, mask_m, mask_v, n_hidden, stride_hs, stride_w,
                              FP32_DOTS, BLOCK_M, BLOCK_V, BLOCK_K)
            zt = _logits_tile(HT, WT, offs_m, offs_v, mask_m, mask_v, n_hidden_t, stride_ht,
                              stride_wt, FP32_DOTS, BLOCK_M, BLOCK_V, BLOCK_K)
            if HAS_BIAS:
                zs += tl.load(B + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
            if HAS_T_BIAS:
                zt += tl.load(BT + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
            lse_s = tl.load(LSE_S + offs_m, mask=mask_m, other=0.0)
            lse_t = tl.load(LSE_T + offs_m, mask=mask_m, other=0.0)
            p_s = tl.exp(zs * inv_t - lse_s[:, None])
            p_t = tl.exp(zt * inv_t - lse_t[:, None])
            g = kl_grad_scale * (p_s - p_t)
            if DO_CE:
                lse_c = tl.load(LSE_C + offs_m, mask=mask_m, other=0.0)
                p_c = tl.exp(zs - lse_c[:, None])
                tgt_hit = offs_v[None, :] == tgt[:, None]
                g += ce_weight * (p_c - tl.where(tgt_hit, 1.0, 0.0))
            g = g * scale[:, None]
            g = tl.where(mask_m[:, None] & mask_v[None, :], g, 0.0)
            if GRAD_B:
                tl.atomic_add(GB + offs_v, tl.sum(g, axis=0), mask=mask_v)
            if FP32_DOTS:
                g_dot = g
            else:
                g_dot = g.to(W.dtype.element_ty)
            for k0 in range(0, n_hidden, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < n_hidden
                if GRAD_H:
                    wt = tl.load(W + offs_v[:, None] * stride_w + offs_k[None, :],
                                 mask=mask_v[:, None] & mask_k[None, :], other=0.0)
                    if FP32_DOTS:
                        dh = tl.dot(g_dot, wt.to(tl.float32), input_precision="ieee")
                    else:
                        dh = tl.dot(g_dot, wt)
                    tl.atomic_add(GH + offs_m[:, None] * n_hidden + offs_k[None, :], dh,
                                  mask=mask_m[:, None] & mask_k[None, :])
                if GRAD_W:
                    x = tl.load(HS + offs_m[:, None] * stride_hs + offs_k[None, :],
                                mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                    if FP32_DOTS:
                        dw = tl.dot(tl.trans(g_dot), x.to(tl.float32), input_precision="ieee")
                    else:
                        dw = tl.dot(tl.trans(g_dot), x)
                    tl.atomic_add(GW + offs_v[:, None] * n_hidden + offs_k[None, :], dw,
                                  mask=mask_v[:, None] & mask_k[None, :])
