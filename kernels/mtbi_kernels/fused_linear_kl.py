"""The imitation loss through the LM head at the 3-GEMM floor: cuBLAS logits, one Triton row pass.

For student rows ``h_s`` [N, H], teacher rows ``h_t`` [N, Ht], head weights ``W`` [V, H] and
``W_t`` [V, Ht] (optional biases), temperature ``T``, and integer targets with an ignore index::

    z_s = h_s W^T + b        z_t = h_t W_t^T + b_t
    row_loss = kl_weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
             + ce_weight * CE(z_s, target)                   (0 on ignored rows)

and, in the same call, the gradients of ``sum_i row_scale[i] * row_loss[i]`` with respect to
``h_s``, ``W`` and ``b`` (the loss is the last op of a step: the gradients are formed in the
forward and only scaled in backward, so the head is not needed after this call).

Per chunk of rows (the chunk size comes from a memory budget, 1 GiB by default):

1. One GEMM of the stacked rows ``[h_s; h_t]`` against the shared head (two GEMMs when the teacher
   has its own head) into an fp32 buffer ``[2 * rows, V]``: half inputs on tensor cores with fp32
   accumulation *and* fp32 output, so a logit is never rounded to half (the rounding that costs
   Liger-Kernel 4-23% gradient error, its issue #1432).
2. ``_kl_rows_kernel``, one program per row: it reads the row's two logit vectors once for the
   statistics (per-lane running max and sum of exp of both tempered distributions, the running
   ``sum e^(t - m_t) (t - s)`` for the KL, the untempered log-sum-exp for CE) and once more to
   write the logit gradient ``G = row_scale * (kl_weight T (p_s - p_t) + ce_weight (softmax(z_s)
   - onehot))`` in place of the student logits (in the input's half dtype, or fp32).
3. ``G @ W`` into the fp32 hidden gradient; ``G^T @ h_s`` and ``sum_rows G`` only when the head's
   weight or bias requires grad.

That is 3 GEMMs of N x H x V per step (6 N H V flops), the floor for a frozen head shared by
teacher and student. (Why not a two-pass design that keeps only O(N) extra memory: docs/gpu.md.)
"""

from __future__ import annotations

import torch

from .compile_check import LaunchConfig
from .runtime import addmm_fp32_, mm_fp32, require_triton_device, tl, triton

DEFAULT_MEMORY_BUDGET = 2**30  # bytes of extra memory per call (the chunk's logits)


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
    chunk_size: int | None = None,
    memory_budget: int | None = None,
):
    """Row losses and gradients of ``sum(row_scale * row_loss)`` (see the module docstring).

    Shapes: ``student_hidden`` [N, H], ``teacher_hidden`` [N, Ht], ``weight`` [V, H],
    ``teacher_weight`` [V, Ht] (``teacher_weight is weight`` selects the stacked single GEMM),
    biases [V], ``target`` [N] (int) or None, ``row_scale`` [N]. Inputs are assumed validated by
    the caller (``mtbi_fast.loss``). ``chunk_size`` rows per chunk, or derived from
    ``memory_budget`` bytes (default 1 GiB): the chunk's fp32 logits, ``8 * V`` bytes a row.

    Returns ``(row_kl [N] fp32, row_ce [N] fp32, grad_hidden [N, H] fp32 | None, grad_weight
    [V, H] fp32 | None, grad_bias [V] fp32 | None)``: the unweighted KL and CE of each row (0 on
    ignored rows; CE 0 when ``ce_weight`` is 0).
    """
    require_triton_device(student_hidden, "the triton loss backend", "backend='torch'")
    device = student_hidden.device
    n, hidden = student_hidden.shape
    vocab = weight.shape[0]
    f32 = dict(device=device, dtype=torch.float32)
    shared_head = teacher_weight is weight or (
        teacher_weight.data_ptr() == weight.data_ptr() and teacher_weight.shape == weight.shape)
    h_s, h_t = student_hidden.contiguous(), teacher_hidden.contiguous()
    w = weight.contiguous()
    w_t = w if shared_head else teacher_weight.contiguous()
    if shared_head and h_t.dtype != h_s.dtype:
        h_t = h_t.to(h_s.dtype)

    valid = (target != ignore_index) if target is not None else torch.ones(n, dtype=torch.bool,
                                                                            device=device)
    # the kernel reads "ignored" as a negative target; without targets every row counts
    tgt = torch.where(valid, target, -1) if target is not None else torch.zeros(n, device=device)
    tgt = tgt.to(torch.int64).contiguous()
    scale = torch.where(valid, row_scale.to(torch.float32), 0.0).contiguous()
    need_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    half = h_s.dtype in (torch.float16, torch.bfloat16) and w.dtype == h_s.dtype
    g_dtype = h_s.dtype if half else torch.float32

    row_kl, row_ce = torch.zeros(n, **f32), torch.zeros(n, **f32)
    grad_hidden = torch.zeros(n, hidden, **f32) if need_grad_hidden else None
    grad_weight = torch.zeros(vocab, hidden, **f32) if need_grad_weight else None
    grad_bias = torch.zeros(vocab, **f32) if need_grad_bias else None
    if n == 0:
        return row_kl, row_ce, grad_hidden, grad_weight, grad_bias

    rows = chunk_rows(n, vocab, chunk_size, memory_budget)
    logits = torch.empty(2 * rows, vocab, **f32)
    dummy = torch.empty(1, **f32)
    b = bias.contiguous() if bias is not None else dummy
    b_t = teacher_bias.contiguous() if teacher_bias is not None else dummy
    block_v, num_warps = row_config(vocab)
    inv_t = 1.0 / float(temperature)
    do_ce = ce_weight != 0.0
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        c = r1 - r0
        z_s, z_t = logits[:c], logits[c:2 * c]
        if shared_head:  # one GEMM over the stacked rows
            mm_fp32(torch.cat([h_s[r0:r1], h_t[r0:r1]]), w.t(), out=logits[:2 * c])
        else:
            mm_fp32(h_s[r0:r1], w.t(), out=z_s)
            mm_fp32(h_t[r0:r1], w_t.t(), out=z_t)
        # G overwrites the student logits; in half precision it is a [c, V] view with row stride
        # 2V (the first half of each fp32 row's bytes), which the kernel writes behind its reads.
        g = z_s.view(g_dtype)[:, :vocab] if half else z_s
        _kl_rows_kernel[(c,)](
            z_s, z_t, b, b_t, tgt[r0:], scale[r0:], row_kl[r0:], row_ce[r0:], g,
            vocab, z_s.stride(0), z_t.stride(0), g.stride(0),
            inv_t, kl_weight * float(temperature), ce_weight,
            HAS_BIAS=bias is not None, HAS_T_BIAS=teacher_bias is not None, DO_CE=do_ce,
            SEPARATE_CE=do_ce and inv_t != 1.0, WRITE_GRAD=need_grad, BLOCK_V=block_v,
            num_warps=num_warps)
        if need_grad_hidden:
            mm_fp32(g, w, out=grad_hidden[r0:r1])
        if need_grad_weight:  # ignored rows may hold NaN padding: 0 * NaN would poison G^T h
            h_rows = torch.where(valid[r0:r1, None], h_s[r0:r1], 0)
            addmm_fp32_(grad_weight, g.t(), h_rows)
        if need_grad_bias:
            grad_bias += g.sum(0, dtype=torch.float32)
    return row_kl, row_ce, grad_hidden, grad_weight, grad_bias


def chunk_rows(n: int, vocab: int, chunk_size: int | None = None,
               memory_budget: int | None = None) -> int:
    """Rows per chunk: ``chunk_size``, or as many as fit ``memory_budget`` bytes of fp32 logits
    (two rows of V floats per row), a multiple of 64 when above 64 (GEMM tiles), at least 1."""
    if chunk_size is None:
        budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
        chunk_size = max(1, budget // (8 * vocab))
        if chunk_size > 64:
            chunk_size -= chunk_size % 64
    return max(1, min(int(chunk_size), n))


def row_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernel: 2048-column tiles, 8 warps (8 floats a thread per
    tile and vector: no spills), smaller for small vocabularies."""
    if vocab >= 8192:
        return 2048, 8
    if vocab >= 1024:
        return 1024, 4
    return max(16, 1 << (vocab - 1).bit_length()), 4


def launch_configs() -> list[LaunchConfig]:
    """Every compilation the launcher above can ask for on a GPU (for ``compile_check``): each
    tile size of ``row_config``, each input dtype (the bias and G are in it) and CE off or on at
    T != 1 (the most state); biases on."""
    configs = []
    for block_v, warps in sorted({row_config(v) for v in (128256, 4096, 200)}):
        for ty in ("bf16", "fp16", "fp32"):
            for ce in (False, True):
                configs.append(LaunchConfig(
                    name=f"_kl_rows_kernel {ty} BLOCK_V={block_v} ce={ce}",
                    kernel="mtbi_kernels.fused_linear_kl:_kl_rows_kernel",
                    signature=dict(ZS="*fp32", ZT="*fp32", B=f"*{ty}", BT=f"*{ty}", TGT="*i64",
                                   SCALE="*fp32", KL="*fp32", CE="*fp32", G=f"*{ty}",
                                   n_vocab="i32", stride_zs="i32", stride_zt="i32",
                                   stride_g="i32", inv_t="fp32", kl_grad_scale="fp32",
                                   ce_weight="fp32"),
                    constexprs=dict(HAS_BIAS=True, HAS_T_BIAS=True, DO_CE=ce, SEPARATE_CE=ce,
                                    WRITE_GRAD=True, BLOCK_V=block_v),
                    num_warps=warps))
    return configs


if triton is not None:

    @triton.jit
    def _row_logits(zs_row, zt_row, B, BT, cols, mask, HAS_BIAS: tl.constexpr,
                    HAS_T_BIAS: tl.constexpr):
        """One tile of a row's student and teacher logits (fp32), biases added."""
        zs = tl.load(zs_row + cols, mask=mask, other=0.0)
        zt = tl.load(zt_row + cols, mask=mask, other=0.0)
        if HAS_BIAS:
            zs += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_T_BIAS:
            zt += tl.load(BT + cols, mask=mask, other=0.0).to(tl.float32)
        return zs, zt

    @triton.jit
    def _kl_rows_kernel(
        ZS, ZT, B, BT, TGT, SCALE, KL, CE, G,
        n_vocab, stride_zs, stride_zt, stride_g,
        inv_t, kl_grad_scale, ce_weight,
        HAS_BIAS: tl.constexpr, HAS_T_BIAS: tl.constexpr, DO_CE: tl.constexpr,
        SEPARATE_CE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One row: KL (and CE) from its fp32 logits, then the logit gradient in place."""
        row = tl.program_id(0).to(tl.int64)
        zs_row = ZS + row * stride_zs
        zt_row = ZT + row * stride_zt
        offs = tl.arange(0, BLOCK_V)
        floor = -1.0e30  # finite start for the running maxima: exp(floor - floor) stays defined
        m_s = tl.full((BLOCK_V,), floor, tl.float32)
        l_s = tl.zeros((BLOCK_V,), tl.float32)
        m_t = tl.full((BLOCK_V,), floor, tl.float32)
        l_t = tl.zeros((BLOCK_V,), tl.float32)
        acc = tl.zeros((BLOCK_V,), tl.float32)  # per lane: sum e^(t - m_t) (t - s)
        m_c = tl.full((BLOCK_V,), floor, tl.float32)
        l_c = tl.zeros((BLOCK_V,), tl.float32)
        for v0 in range(0, n_vocab, BLOCK_V):
            cols = v0 + offs
            mask = cols < n_vocab
            zs, zt = _row_logits(zs_row, zt_row, B, BT, cols, mask, HAS_BIAS, HAS_T_BIAS)
            s = tl.where(mask, zs * inv_t, float("-inf"))
            t = tl.where(mask, zt * inv_t, float("-inf"))
            m_new = tl.maximum(m_s, s)
            l_s = l_s * tl.exp(m_s - m_new) + tl.exp(s - m_new)
            m_s = m_new
            m_new = tl.maximum(m_t, t)
            alpha = tl.exp(m_t - m_new)
            e_t = tl.exp(t - m_new)
            l_t = l_t * alpha + e_t
            acc = acc * alpha + e_t * ((zt - zs) * inv_t)
            m_t = m_new
            if SEPARATE_CE:  # CE's softmax is untempered
                c = tl.where(mask, zs, float("-inf"))
                m_new = tl.maximum(m_c, c)
                l_c = l_c * tl.exp(m_c - m_new) + tl.exp(c - m_new)
                m_c = m_new

        top_s = tl.max(m_s, axis=0)
        lse_s = top_s + tl.log(tl.sum(l_s * tl.exp(m_s - top_s), axis=0))
        top_t = tl.max(m_t, axis=0)
        rescale_t = tl.exp(m_t - top_t)
        sum_t = tl.sum(l_t * rescale_t, axis=0)
        lse_t = top_t + tl.log(sum_t)
        kl = tl.sum(acc * rescale_t, axis=0) / sum_t - lse_t + lse_s
        tgt = tl.load(TGT + row)
        valid = tgt >= 0
        tl.store(KL + row, tl.where(valid, kl, 0.0))
        lse_c = lse_s
        if DO_CE:
            if SEPARATE_CE:
                top_c = tl.max(m_c, axis=0)
                lse_c = top_c + tl.log(tl.sum(l_c * tl.exp(m_c - top_c), axis=0))
            safe = tl.where(valid, tgt, 0)
            z_tgt = tl.load(zs_row + safe)
            if HAS_BIAS:
                z_tgt += tl.load(B + safe).to(tl.float32)
            tl.store(CE + row, tl.where(valid, lse_c - z_tgt, 0.0))

        if WRITE_GRAD:
            scale = tl.load(SCALE + row)
            g_row = G + row * stride_g
            for v0 in range(0, n_vocab, BLOCK_V):
                cols = v0 + offs
                mask = cols < n_vocab
                if scale == 0.0:  # ignored row: a zero gradient, whatever its logits hold
                    g = tl.zeros((BLOCK_V,), tl.float32)
                else:
                    zs, zt = _row_logits(zs_row, zt_row, B, BT, cols, mask, HAS_BIAS, HAS_T_BIAS)
                    g = kl_grad_scale * (tl.exp(zs * inv_t - lse_s) - tl.exp(zt * inv_t - lse_t))
                    if DO_CE:
                        g += ce_weight * (tl.exp(zs - lse_c) - tl.where(cols == tgt, 1.0, 0.0))
                    g = g * scale
                # every lane has read this tile before any lane writes G over it (G may alias
                # the student logits, in half precision at half the byte offsets)
                tl.debug_barrier()
                tl.store(g_row + cols, g.to(G.dtype.element_ty), mask=mask)
