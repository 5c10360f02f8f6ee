"""The imitation loss through the LM head in two Triton passes that never store the logits.

This is the low-memory design: it forms each logit tile twice (5 GEMM-equivalents per step
against the 3 of ``fused_linear_kl``) but its extra memory is O(N) statistics plus one
``N x grad_chunk`` gradient buffer, whatever the budget. ``mtbi_fast.loss`` calls it
``backend="triton_recompute"``.

For student rows ``h_s`` [N, H], teacher rows ``h_t`` [N, Ht], head weights ``W`` [V, H] and
``W_t`` [V, Ht] (optional biases), temperature ``T``, and integer targets with an ignore index::

    z_s = h_s W^T + b        z_t = h_t W_t^T + b_t
    row_loss = kl_weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
             + ce_weight * CE(z_s, target)                   (0 on ignored rows)

and, in the same call, the gradients of ``sum_i row_scale[i] * row_loss[i]`` with respect to
``h_s``, ``W`` and ``b`` (the loss is the last op of a step, so they are formed in the forward and
only scaled in backward; the head weight is not needed again after this call).

1. ``_stats_kernel``, grid (row blocks, vocabulary splits). Each program walks its share of the
   vocabulary in BLOCK_V tiles, forming both logit tiles with ``tl.dot`` (fp32 accumulation over
   BLOCK_K slices of the hidden size), and keeps per row the running max and sum of exp of both
   tempered distributions, the running sum of ``exp(t - m_t) * (t - s)`` (rescaled with the teacher
   sum whenever the teacher max moves), and for cross-entropy the running log-sum-exp of the
   untempered student logits and the target logit. Splits are merged on the host (O(N) floats):
   ``KL = acc / l_t - lse_t + lse_s`` after rescaling to common maxima.
2. The gradient, over vocabulary chunks of at most ``grad_chunk`` columns: ``_grad_kernel``
   recomputes the logit tiles and writes the logit gradient
   ``G = row_scale * (kl_weight * T * (p_s - p_t) + ce_weight * (softmax(z_s) - onehot))`` of the
   chunk ([N, chunk], input precision on GPU); then ``G @ W_chunk`` is added to the fp32 hidden
   gradient and ``G^T @ h_s`` is the fp32 weight gradient of the chunk, both by cuBLAS with fp32
   output. Atomics are avoided entirely, and the extra memory is one [N, chunk] buffer.

All logits and softmax arithmetic are fp32 whatever the input dtype (bf16 tiles are never rounded
after the dot). Under the Triton interpreter (``TRITON_INTERPRET=1``, the CPU tests) half-precision
tiles are upcast to fp32 right after loading, since the interpreter's bf16 arithmetic is unreliable.
"""

from __future__ import annotations

import torch

from .compile_check import LaunchConfig
from .runtime import mm_fp32, require_triton_device, tl, triton


def linear_kl_recompute(
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
    vocab_splits: int | None = None,
    grad_chunk: int | None = None,
    memory_budget: int | None = None,
):
    """Row losses and gradients of ``sum(row_scale * row_loss)`` (see the module docstring).

    Shapes: ``student_hidden`` [N, H], ``teacher_hidden`` [N, Ht], ``weight`` [V, H],
    ``teacher_weight`` [V, Ht], biases [V], ``target`` [N] (int) or None, ``row_scale`` [N].
    Inputs are assumed validated by the caller (``mtbi_fast.loss``). Tuning knobs: tile sizes,
    ``vocab_splits`` (programs per row block in the statistics pass) and ``grad_chunk``
    (vocabulary columns per gradient chunk, bounding the extra memory to N x grad_chunk), or
    ``memory_budget`` bytes for that chunk (256 MiB by default; at least one tile of columns).

    Returns ``(row_kl [N] fp32, row_ce [N] fp32, grad_hidden [N, H] fp32 | None, grad_weight
    [V, H] fp32 | None, grad_bias [V] fp32 | None)``: the unweighted KL and CE of each row (0 on
    ignored rows; CE 0 when ``ce_weight`` is 0), ``row_loss = kl_weight T^2 row_kl + ce_weight
    row_ce``.
    """
    require_triton_device(student_hidden, "the triton_recompute loss backend", "backend='chunked'")
    device = student_hidden.device
    interpret = device.type != "cuda"

    h_s, h_t = student_hidden.contiguous(), teacher_hidden.contiguous()
    w, w_t = weight.contiguous(), teacher_weight.contiguous()
    n, hidden = h_s.shape
    vocab, hidden_t = w.shape[0], h_t.shape[1]
    f32 = dict(device=device, dtype=torch.float32)
    dummy = torch.empty(1, **f32)
    b = bias.contiguous() if bias is not None else dummy
    b_t = teacher_bias.contiguous() if teacher_bias is not None else dummy
    has_target = target is not None
    tgt = target.contiguous().to(torch.int64) if has_target else torch.empty(1, device=device, dtype=torch.int64)

    # fp32 inputs: exact fp32 dots (no TF32). Half inputs on GPU: tensor-core dots, fp32 accumulate.
    fp32_dots = interpret or h_s.dtype == torch.float32
    tiles = tile_config(h_s.dtype, interpret)
    block_m, block_v, block_k = block_m or tiles[0], block_v or tiles[1], block_k or tiles[2]
    num_warps = tiles[3]
    row_blocks = triton.cdiv(max(n, 1), block_m)
    if vocab_splits is None:  # enough programs to fill the GPU when there are few rows
        vocab_splits = 1 if interpret else max(1, min(triton.cdiv(vocab, 8 * block_v),
                                                      triton.cdiv(2 * _sm_count(device), row_blocks)))
    tiles_per_split = triton.cdiv(triton.cdiv(vocab, block_v), vocab_splits)
    vocab_splits = triton.cdiv(triton.cdiv(vocab, block_v), tiles_per_split)

    inv_t = 1.0 / float(temperature)
    do_ce = ce_weight != 0.0
    separate_ce = do_ce and inv_t != 1.0
    flags = dict(HAS_BIAS=bias is not None, HAS_T_BIAS=teacher_bias is not None,
                 HAS_TARGET=has_target, FP32_DOTS=fp32_dots,
                 BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k)

    # 1. per-row statistics, one partial set per vocabulary split: m_s l_s m_t l_t acc m_c l_c z_tgt
    part = torch.empty(8, vocab_splits, n, **f32)
    if n > 0:
        _stats_kernel[(row_blocks, vocab_splits)](
            h_s, h_t, w, w_t, b, b_t, tgt, part,
            n, vocab, hidden, hidden_t, tiles_per_split,
            h_s.stride(0), h_t.stride(0), w.stride(0), w_t.stride(0), inv_t,
            DO_CE=do_ce, SEPARATE_CE=separate_ce, num_warps=num_warps, **flags)
    m_s, l_s, m_t, l_t, acc, m_c, l_c, z_tgt = part.unbind(0)
    lse_s = _merge_lse(m_s, l_s)[0]
    lse_t, l_t_all, scale_t = _merge_lse(m_t, l_t)
    kl = (acc * scale_t).sum(0) / l_t_all - lse_t + lse_s  # acc holds unshifted t - s
    valid = (tgt != ignore_index) if has_target else torch.ones(n, device=device, dtype=torch.bool)
    row_kl = torch.where(valid, kl, 0.0)
    if do_ce:
        lse_c = _merge_lse(m_c, l_c)[0] if separate_ce else lse_s  # T == 1: same softmax
        row_ce = torch.where(valid, lse_c - z_tgt.sum(0), 0.0)
    else:
        lse_c, row_ce = lse_s, torch.zeros_like(row_kl)

    # 2. gradients, one vocabulary chunk at a time
    grad_hidden = torch.zeros(n, hidden, **f32) if need_grad_hidden else None
    grad_weight = torch.zeros(vocab, hidden, **f32) if need_grad_weight else None
    grad_bias = torch.zeros(vocab, **f32) if need_grad_bias else None
    if n == 0 or not (need_grad_hidden or need_grad_weight or need_grad_bias):
        return row_kl, row_ce, grad_hidden, grad_weight, grad_bias
    scale = torch.where(valid, row_scale.to(torch.float32), 0.0).contiguous()
    g_dtype = torch.float32 if fp32_dots else h_s.dtype
    if grad_chunk is None:  # the gradient chunk within the budget (256 MiB by default)
        budget = 256 * 2**20 if memory_budget is None else int(memory_budget)
        columns = budget // (n * torch.finfo(g_dtype).bits // 8)
        grad_chunk = max(block_v, columns // block_v * block_v)
    grad_chunk = min(grad_chunk, triton.cdiv(vocab, block_v) * block_v)
    g_buf = torch.empty(n, grad_chunk, device=device, dtype=g_dtype)
    for v0 in range(0, vocab, grad_chunk):
        v1 = min(v0 + grad_chunk, vocab)
        g = g_buf[:, : v1 - v0]
        _grad_kernel[(row_blocks, triton.cdiv(v1 - v0, block_v))](
            h_s, h_t, w, w_t, b, b_t, tgt, scale, lse_s, lse_t, lse_c, g,
            n, v0, v1, hidden, hidden_t, g.stride(0),
            h_s.stride(0), h_t.stride(0), w.stride(0), w_t.stride(0),
            inv_t, kl_weight * float(temperature), ce_weight,
            DO_CE=do_ce, num_warps=num_warps, **flags)
        if need_grad_hidden:
            grad_hidden += mm_fp32(g, w[v0:v1])
        if need_grad_weight:
            grad_weight[v0:v1] = mm_fp32(g.t(), h_s)
        if need_grad_bias:
            grad_bias[v0:v1] = g.sum(0, dtype=torch.float32)
    return row_kl, row_ce, grad_hidden, grad_weight, grad_bias


def tile_config(dtype: torch.dtype, interpret: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps). On a GPU these are the largest tiles that compile
    without register spills for sm_80 and sm_90a (``tests/test_compile.py``): half inputs use
    tensor cores (64 x 128 x 32, 8 warps); fp32 inputs use exact fp32 FMA dots, whose fp32 operand
    tiles live in registers (32 x 64 x 16, 8 warps). The interpreter gets larger tiles (fewer
    programs)."""
    if interpret:
        return 32, 64, 32, 4
    if dtype in (torch.float16, torch.bfloat16):
        return 64, 128, 32, 8
    return 32, 64, 16, 8


def launch_configs() -> list[LaunchConfig]:
    """Every compilation the launcher can ask for on a GPU (``compile_check``): both kernels at
    the tiles of each input dtype, with every code-changing switch on (the most registers)."""
    configs = []
    for dtype, ty in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
        bm, bv, bk, warps = tile_config(dtype)
        common = dict(HAS_BIAS=True, HAS_T_BIAS=True, HAS_TARGET=True, FP32_DOTS=ty == "fp32",
                      BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk)
        inputs = dict(HS=f"*{ty}", HT=f"*{ty}", W=f"*{ty}", WT=f"*{ty}", B=f"*{ty}", BT=f"*{ty}",
                      TGT="*i64")
        stats = dict(inputs, PART="*fp32", n_rows="i32", n_vocab="i32", n_hidden="i32",
                     n_hidden_t="i32", tiles_per_split="i32", stride_hs="i32", stride_ht="i32",
                     stride_w="i32", stride_wt="i32", inv_t="fp32")
        grad = dict(inputs, SCALE="*fp32", LSE_S="*fp32", LSE_T="*fp32", LSE_C="*fp32",
                    G=f"*{ty}", n_rows="i32", v_begin="i32", v_end="i32", n_hidden="i32",
                    n_hidden_t="i32", stride_g="i32", stride_hs="i32", stride_ht="i32",
                    stride_w="i32", stride_wt="i32", inv_t="fp32", kl_grad_scale="fp32",
                    ce_weight="fp32")
        for name, sig, extra in (("_stats_kernel", stats, dict(DO_CE=True, SEPARATE_CE=True)),
                                 ("_grad_kernel", grad, dict(DO_CE=True))):
            configs.append(LaunchConfig(
                name=f"{name} {ty} {bm}x{bv}x{bk}", kernel=f"mtbi_kernels.linear_kl_recompute:{name}",
                signature=sig, constexprs={**extra, **common}, num_warps=warps))
    return configs


def _merge_lse(m, l):
    """Merge per-split (max, sum of exp) pairs [S, N]: (log-sum-exp, sum at the common max, the
    per-split rescaling factors)."""
    m_all = m.amax(0)
    scale = torch.exp(m - m_all)
    l_all = (l * scale).sum(0)
    return m_all + torch.log(l_all), l_all, scale


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


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
    def _student_teacher_logits(HS, HT, W, WT, B, BT, offs_m, offs_v, mask_m, mask_v,
                                n_hidden, n_hidden_t, stride_hs, stride_ht, stride_w, stride_wt,
                                HAS_BIAS: tl.constexpr, HAS_T_BIAS: tl.constexpr,
                                FP32_DOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """Student and teacher logit tiles (with biases), fp32, not yet divided by the
        temperature (the callers scale them by ``inv_t`` where they need it)."""
        zs = _logits_tile(HS, W, offs_m, offs_v, mask_m, mask_v, n_hidden, stride_hs, stride_w,
                          FP32_DOTS, BLOCK_M, BLOCK_V, BLOCK_K)
        zt = _logits_tile(HT, WT, offs_m, offs_v, mask_m, mask_v, n_hidden_t, stride_ht, stride_wt,
                          FP32_DOTS, BLOCK_M, BLOCK_V, BLOCK_K)
        if HAS_BIAS:
            zs += tl.load(B + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
        if HAS_T_BIAS:
            zt += tl.load(BT + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
        return zs, zt

    @triton.jit
    def _stats_kernel(
        HS, HT, W, WT, B, BT, TGT, PART,
        n_rows, n_vocab, n_hidden, n_hidden_t, tiles_per_split,
        stride_hs, stride_ht, stride_w, stride_wt, inv_t,
        DO_CE: tl.constexpr, SEPARATE_CE: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_T_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr,
        FP32_DOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
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
            tgt = tl.load(TGT + offs_m, mask=mask_m, other=-1)
        else:
            tgt = tl.full((BLOCK_M,), -1, tl.int64)

        v_start = split * tiles_per_split * BLOCK_V
        v_stop = tl.minimum(v_start + tiles_per_split * BLOCK_V, n_vocab)
        for v0 in range(v_start, v_stop, BLOCK_V):
            offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            mask_v = offs_v < v_stop
            zs, zt = _student_teacher_logits(HS, HT, W, WT, B, BT, offs_m, offs_v, mask_m,
                                             mask_v, n_hidden, n_hidden_t, stride_hs, stride_ht,
                                             stride_w, stride_wt, HAS_BIAS, HAS_T_BIAS,
                                             FP32_DOTS, BLOCK_M, BLOCK_V, BLOCK_K)
            s = tl.where(mask_v[None, :], zs * inv_t, neg_inf)
            t = tl.where(mask_v[None, :], zt * inv_t, neg_inf)

            m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
            l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s - m_s_new[:, None]), axis=1)
            m_s = m_s_new

            m_t_new = tl.maximum(m_t, tl.max(t, axis=1))
            alpha_t = tl.exp(m_t - m_t_new)
            e_t = tl.exp(t - m_t_new[:, None])  # 0 on padded columns
            l_t = l_t * alpha_t + tl.sum(e_t, axis=1)
            acc = acc * alpha_t + tl.sum(e_t * ((zt - zs) * inv_t), axis=1)
            m_t = m_t_new

            if DO_CE:
                if SEPARATE_CE:
                    c = tl.where(mask_v[None, :], zs, neg_inf)
                    m_c_new = tl.maximum(m_c, tl.max(c, axis=1))
                    l_c = l_c * tl.exp(m_c - m_c_new) + tl.sum(tl.exp(c - m_c_new[:, None]), axis=1)
                    m_c = m_c_new
                hit = offs_v[None, :] == tgt[:, None]
                z_tgt += tl.sum(tl.where(hit, zs, 0.0), axis=1)

        stride_part = tl.num_programs(1) * n_rows
        out = PART + split * n_rows + offs_m
        tl.store(out, m_s, mask=mask_m)
        tl.store(out + stride_part, l_s, mask=mask_m)
        tl.store(out + 2 * stride_part, m_t, mask=mask_m)
        tl.store(out + 3 * stride_part, l_t, mask=mask_m)
        tl.store(out + 4 * stride_part, acc, mask=mask_m)
        tl.store(out + 5 * stride_part, m_c, mask=mask_m)
        tl.store(out + 6 * stride_part, l_c, mask=mask_m)
        tl.store(out + 7 * stride_part, z_tgt, mask=mask_m)

    @triton.jit
    def _grad_kernel(
        HS, HT, W, WT, B, BT, TGT, SCALE, LSE_S, LSE_T, LSE_C, G,
        n_rows, v_begin, v_end, n_hidden, n_hidden_t, stride_g,
        stride_hs, stride_ht, stride_w, stride_wt,
        inv_t, kl_grad_scale, ce_weight,
        DO_CE: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_T_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr,
        FP32_DOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_v = tl.program_id(1)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_v = (v_begin + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_m = offs_m < n_rows
        mask_v = offs_v < v_end
        mask = mask_m[:, None] & mask_v[None, :]
        out = G + offs_m[:, None] * stride_g + (offs_v - v_begin)[None, :]
        scale = tl.load(SCALE + offs_m, mask=mask_m, other=0.0)
        if tl.max(tl.abs(scale), axis=0) == 0.0:
            # every row of the tile is ignored or padding: no logits needed
            tl.store(out, tl.zeros((BLOCK_M, BLOCK_V), tl.float32).to(G.dtype.element_ty), mask=mask)
        else:
            zs, zt = _student_teacher_logits(HS, HT, W, WT, B, BT, offs_m, offs_v, mask_m,
                                             mask_v, n_hidden, n_hidden_t, stride_hs, stride_ht,
                                             stride_w, stride_wt, HAS_BIAS, HAS_T_BIAS,
                                             FP32_DOTS, BLOCK_M, BLOCK_V, BLOCK_K)
            lse_s = tl.load(LSE_S + offs_m, mask=mask_m, other=0.0)
            lse_t = tl.load(LSE_T + offs_m, mask=mask_m, other=0.0)
            g = kl_grad_scale * (tl.exp(zs * inv_t - lse_s[:, None]) - tl.exp(zt * inv_t - lse_t[:, None]))
            if DO_CE:
                tgt = tl.load(TGT + offs_m, mask=mask_m, other=-1)
                lse_c = tl.load(LSE_C + offs_m, mask=mask_m, other=0.0)
                onehot = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
                g += ce_weight * (tl.exp(zs - lse_c[:, None]) - onehot)
            g = tl.where(mask, g * scale[:, None], 0.0)
            tl.store(out, g.to(G.dtype.element_ty), mask=mask)
