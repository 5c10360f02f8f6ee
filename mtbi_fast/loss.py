"""The MTBI imitation loss: KL(teacher || student) through the LM head, optionally plus CE.

    loss = kl_weight * T^2 * mean_rows KL(softmax(z_t / T) || softmax(z_s / T))
         + ce_weight * mean_rows CE(z_s, target)

with ``z_s = h_s W^T (+ b)`` and ``z_t = h_t W_t^T (+ b_t)``; rows whose target is
``ignore_index`` do not count. Use it as a module::

    loss_fn = mtbi_fast.ImitationLoss(temperature=1.0, ce_weight=0.5)
    loss = loss_fn(student_hidden, teacher_hidden, llm.lm_head.weight, target_ids=labels)

Backends (one signature, see ``_chunked_linear_kl``):

- ``"triton"``: the 3-GEMM design, ``mtbi_kernels.fused_linear_kl`` (CUDA, or the CPU interpreter
  with ``TRITON_INTERPRET=1``): per chunk of rows one fp32-output GEMM of ``[h_s; h_t]`` against
  the head, one Triton pass per row for the statistics and the logit gradient, then ``G @ W``.
  The chunk's logits are the extra memory, bounded by ``memory_budget`` (1 GiB by default).
- ``"torch"``: plain PyTorch over chunks of rows (the same 3-GEMM structure as ``"triton"``,
  with three or four chunk x V buffers); the default on CPU. Its former name ``"chunked"`` is
  still accepted.
- ``"eager"``: ``mtbi_fast.reference.eager_row_losses``, everything materialized through autograd.

``backend="auto"`` picks by device (``AUTO_BACKEND``). ``LOSS_BACKENDS`` is the registry: name,
implementation and the devices each runs on (``mtbi-fast info``, the tests and the benchmarks read
it).

The fused backends compute the gradients in the forward pass (the loss is the last op of a step)
and only scale them in backward, so the head weight is not needed after the call. That is what
lets a DeepSpeed ZeRO-3 partitioned head be gathered just for the call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .reference import eager_row_losses

@dataclass(frozen=True)
class LossBackend:
    """One implementation of the imitation loss: its name, what runs it (``impl``: the fused
    ``(h_s, h_t, weight, teacher_weight, bias, teacher_bias, target, row_scale, **options)``
    function, or None for the eager reference), and where it runs."""

    name: str
    about: str
    devices: tuple[str, ...]              # device types it runs on natively
    impl: Callable[[], Callable] | None   # returns the fused function (imported lazily), or None: eager

    def available(self, device: str) -> bool:
        """Whether it runs on ``device`` ("cpu" or "cuda") here (Triton: also its CPU interpreter)."""
        if self.name == "triton":
            from mtbi_kernels import triton_available

            return triton_available(device)
        return device in self.devices


def _triton_impl():
    import mtbi_kernels  # slow to import: only when the backend runs

    return mtbi_kernels.fused_linear_kl


# The registry: a new backend is one entry here (and its tests pick it up from LOSS_BACKENDS).
LOSS_BACKENDS = {
    "torch": LossBackend("torch", "plain PyTorch over chunks of rows (the same 3-GEMM structure)",
                         ("cpu", "cuda"), lambda: _chunked_linear_kl),
    "eager": LossBackend("eager", "the reference: every logit materialized through autograd",
                         ("cpu", "cuda"), None),
    "triton": LossBackend("triton", "3-GEMM floor, Triton row pass (CUDA; CPU interpreter in tests)",
                          ("cuda",), lambda: _triton_impl()),
}
BACKENDS = ("auto", *LOSS_BACKENDS)
# Other names accepted for a backend: "chunked" is "torch" (docs/loss.md).
BACKEND_ALIASES = {"chunked": "torch"}
# Backends that were removed, and what to use instead (named in the error when one is asked for).
RETIRED_BACKENDS = {
    "triton_recompute": "the two-pass kernel was removed (docs/gpu.md says why); use backend='triton' "
                        "with a smaller memory_budget instead",
}
REDUCTIONS = ("mean", "sum", "none")
# Temperatures a distillation can use: below 1e-3 the tempered logits (z / T) overflow float32 to
# inf and the loss is NaN; above 1e3 both distributions are uniform to float32 precision.
TEMPERATURE_RANGE = (1e-3, 1e3)
# What backend="auto" runs, by device (the measurements behind it: docs/loss.md).
AUTO_BACKEND = {"cpu": "torch", "cuda": "triton"}


def available_backends(device: str) -> list[str]:
    """The registered backends that run on ``device`` here."""
    return [name for name, b in LOSS_BACKENDS.items() if b.available(device)]


def imitation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    target_ids: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_weight: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    check_finite: bool = True,
    return_parts: bool = False,
):
    """Imitation loss of student hidden states against teacher hidden states (module docstring).

    ``student_hidden`` [N, H] or [B, T, H]; ``teacher_hidden`` with the same leading shape and
    hidden size H_t; ``lm_head_weight`` [V, H]; ``target_ids`` with the leading shape (int);
    ``lm_head_bias`` [V] (shared by both sides unless ``teacher_lm_head_weight`` [V, H_t] is given).
    Returns a scalar (``reduction`` "mean" or "sum") or per-row losses with the leading shape
    ("none"). The loss is float64 for float64 inputs and float32 for any other input dtype, on
    every backend; "triton" computes in float32 whatever the inputs (its kernels have no float64
    path), so use "torch" or "eager" for float64 accuracy (gradcheck). The fused backends form
    the gradients in the forward pass: a second derivative (``create_graph=True``) is a
    NotImplementedError there ("eager" has one). ``memory_budget``: bytes of extra
    memory a fused backend may use for its chunk buffers (default 1 GiB; the chunks are rows for
    "triton" and "torch"); ``chunk_size`` sets the rows per chunk directly. Ignored rows (``target_ids ==
    ignore_index``) are zeroed before any GEMM, so whatever they hold (NaN padding) changes
    nothing; ``check_finite`` (default on) raises a ``ValueError`` naming the tensor and row when a
    counted row of either hidden state holds NaN or inf (one fused reduction over the N x H
    inputs, less than 0.1% of the loss's own work at real vocabulary sizes, and one host sync).
    With ``return_parts=True`` it returns
    ``(loss, {"kl": ..., "ce": ...})``: the unweighted KL (at temperature T) and CE, reduced the
    same way (detached; CE is 0 when ``ce_weight`` is 0).
    """
    _check_options(temperature, reduction, backend, chunk_size, memory_budget, kl_weight,
                   ce_weight)
    if target_ids is None and ce_weight != 0.0:
        raise ValueError(f"ce_weight={ce_weight} needs target_ids (the teacher's response tokens)")
    lead = _check_inputs(student_hidden, teacher_hidden, lm_head_weight, target_ids, lm_head_bias,
                         teacher_lm_head_weight, ignore_index, read_back=check_finite)
    hidden = student_hidden.shape[-1]
    h_s = student_hidden.reshape(-1, hidden)
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    target = target_ids.reshape(-1).to(torch.int64) if target_ids is not None else None
    h_s, h_t = _clean_rows(h_s, h_t, target, ignore_index, check_finite)
    options = dict(temperature=float(temperature), kl_weight=float(kl_weight),
                   ce_weight=float(ce_weight), ignore_index=int(ignore_index))

    with gathered(lm_head_weight, lm_head_bias, teacher_lm_head_weight) as was_gathered:
        weight, bias = lm_head_weight, lm_head_bias
        if teacher_lm_head_weight is None:
            teacher_weight, teacher_bias = weight.detach(), _detach(lm_head_bias)
        else:
            teacher_weight, teacher_bias = teacher_lm_head_weight.detach(), None
        name = _resolve_backend(backend, h_s)
        if name == "eager":
            if was_gathered:  # autograd would keep the gathered (soon freed) head for backward
                weight, bias = weight.detach().clone(), _detach(bias)
                bias = bias.clone() if bias is not None else None
            row_kl, row_ce = eager_row_losses(h_s, h_t, weight, teacher_weight, bias, teacher_bias,
                                              target, return_parts=True, **options)
            loss = _reduce(_combine(row_kl, row_ce, options), target, ignore_index, reduction)
        else:
            impl = _fused_impl(name)
            if chunk_size is not None:
                options["chunk_size"] = int(chunk_size)
            if memory_budget is not None:
                options["memory_budget"] = int(memory_budget)
            loss, row_kl, row_ce = _FusedImitation.apply(
                h_s, h_t, weight, teacher_weight, bias, teacher_bias, target, reduction, impl,
                options)
    if reduction == "none":
        loss = loss.reshape(lead)
    if not return_parts:
        return loss
    parts = {"kl": row_kl.detach(), "ce": row_ce.detach()}
    if reduction == "none":
        return loss, {k: v.reshape(lead) for k, v in parts.items()}
    if reduction == "sum":
        return loss, {k: v.sum() for k, v in parts.items()}
    div = _n_counted(h_s, target, ignore_index)
    return loss, {k: v.sum() / div for k, v in parts.items()}


class ImitationLoss(nn.Module):
    """Drop-in module for :func:`imitation_loss` (same arguments, fixed at construction)."""

    def __init__(self, temperature: float = 1.0, kl_weight: float = 1.0, ce_weight: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean", backend: str = "auto",
                 chunk_size: int | None = None, memory_budget: int | None = None,
                 check_finite: bool = True):
        super().__init__()
        _check_options(temperature, reduction, backend, chunk_size, memory_budget, kl_weight,
                       ce_weight)
        self.temperature = temperature
        self.kl_weight = kl_weight
        self.ce_weight = ce_weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self.check_finite = check_finite

    def forward(self, student_hidden, teacher_hidden, lm_head_weight, target_ids=None,
                lm_head_bias=None, teacher_lm_head_weight=None, return_parts=False):
        return imitation_loss(
            student_hidden, teacher_hidden, lm_head_weight, target_ids, lm_head_bias,
            teacher_lm_head_weight, temperature=self.temperature, kl_weight=self.kl_weight,
            ce_weight=self.ce_weight, ignore_index=self.ignore_index, reduction=self.reduction,
            backend=self.backend, chunk_size=self.chunk_size, memory_budget=self.memory_budget,
            check_finite=self.check_finite, return_parts=return_parts)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, kl_weight={self.kl_weight}, "
                f"ce_weight={self.ce_weight}, reduction={self.reduction!r}, backend={self.backend!r}")


class _FusedImitation(torch.autograd.Function):
    """Runs a fused backend once: row losses plus the gradients for the requested inputs."""

    @staticmethod
    def forward(ctx, h_s, h_t, weight, teacher_weight, bias, teacher_bias, target, reduction,
                impl, options):
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[2]
        need_b = bias is not None and ctx.needs_input_grad[4]
        acc_dtype = torch.float64 if h_s.dtype == torch.float64 else torch.float32
        # the mean's divisor stays on the device: no host sync (the trainer's step has none)
        scale = (1.0 / _n_counted(h_s, target, options["ignore_index"]).to(acc_dtype)
                 if reduction == "mean" else torch.ones((), device=h_s.device, dtype=acc_dtype))
        row_scale = scale.expand(h_s.shape[0]).contiguous()
        # Per-row weights are unknown until backward for reduction="none", so the weight and bias
        # gradients are formed there (recomputing); the hidden gradient is per row either way.
        defer = reduction == "none" and (need_w or need_b)
        row_kl, row_ce, grad_h, grad_w, grad_b = impl(
            h_s, h_t, weight, teacher_weight, bias, teacher_bias, target, row_scale,
            need_grad_hidden=need_h, need_grad_weight=need_w and not defer,
            need_grad_bias=need_b and not defer, **options)
        rows = _combine(row_kl, row_ce, options)
        ctx.mark_non_differentiable(row_kl, row_ce)
        ctx.reduction = reduction
        ctx.dtypes = (h_s.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.impl, ctx.options, ctx.defer = impl, options, defer
        ctx.need = (need_h, need_w, need_b)
        if defer:
            if _is_partitioned(weight) or weight.numel() == 0:
                raise NotImplementedError("reduction='none' with a trainable ZeRO-3 partitioned head")
            ctx.save_for_backward(grad_h, h_s, h_t, weight, teacher_weight, bias, teacher_bias,
                                  target)
        else:
            ctx.save_for_backward(grad_h, grad_w, grad_b)
        if reduction == "none":
            return rows, row_kl, row_ce
        return rows.sum() * scale, row_kl, row_ce

    @staticmethod
    def backward(ctx, grad_out, _grad_kl=None, _grad_ce=None):
        if torch.is_grad_enabled():  # backward(create_graph=True): a second derivative was asked for
            raise NotImplementedError(
                "the fused imitation-loss backends ('torch', 'triton') have no second derivative "
                "(their gradients are formed in the forward pass); use backend='eager' for "
                "create_graph=True / double backward")
        need_h, need_w, need_b = ctx.need
        dtype_h, dtype_w, dtype_b = ctx.dtypes
        grad_out = grad_out.to(torch.float64 if dtype_h == torch.float64 else torch.float32)
        per_row = grad_out[:, None] if ctx.reduction == "none" else grad_out
        d_h = d_w = d_b = None
        if ctx.defer:
            grad_h, h_s, h_t, weight, teacher_weight, bias, teacher_bias, target = ctx.saved_tensors
            _, _, _, grad_w, grad_b = ctx.impl(
                h_s, h_t, weight, teacher_weight, bias, teacher_bias, target, grad_out,
                need_grad_hidden=False, need_grad_weight=need_w, need_grad_bias=need_b,
                **ctx.options)
            if need_w:
                d_w = grad_w.to(dtype_w)
            if need_b:
                d_b = grad_b.to(dtype_b)
        else:
            grad_h, grad_w, grad_b = ctx.saved_tensors
            if need_w:
                d_w = (grad_w * grad_out).to(dtype_w)
            if need_b:
                d_b = (grad_b * grad_out).to(dtype_b)
        if need_h:
            d_h = (grad_h * per_row).to(dtype_h)
        return d_h, None, d_w, None, d_b, None, None, None, None, None


def _chunked_linear_kl(h_s, h_t, weight, teacher_weight, bias, teacher_bias, target, row_scale, *,
                       temperature=1.0, kl_weight=1.0, ce_weight=0.0, ignore_index=-100,
                       need_grad_hidden=True, need_grad_weight=False, need_grad_bias=False,
                       chunk_size=None, memory_budget=None):
    """Plain-PyTorch fused backend with the signature of ``mtbi_kernels.fused_linear_kl``
    (returns the rows' KL and CE, and the gradients).

    Works on ``chunk_size`` rows at a time (default: about 16M logits per chunk, fewer when
    ``memory_budget`` bytes cannot hold the chunk's buffers) and computes the
    row losses and the gradients of ``sum(row_scale * row_loss)`` in one pass: three GEMMs per chunk
    (student logits, teacher logits, gradient), the GEMMs the eager path needs too. It holds three
    chunk x V buffers at most (four with CE at T != 1). The softmax math is arranged to touch each
    buffer as few times as possible (elementwise passes, not the GEMMs, decide the time left over
    on a CPU): with ``s' = s - max s`` and ``t' = t - max t`` (tempered logits),
    ``KL = sum(e^t' (t' - s')) / sum(e^t') - log sum(e^t') + log sum(e^s')`` and the logit gradient
    is ``e^s' * a_s - e^t' * a_t`` with per-row coefficients. fp32 for half inputs; float64 inputs
    compute in float64 (for gradcheck).
    """
    n, hidden = h_s.shape
    vocab = weight.shape[0]
    dtype = torch.float64 if h_s.dtype == torch.float64 else torch.float32
    do_ce = ce_weight != 0.0
    n_bufs = 4 if (do_ce and temperature != 1.0) else 3
    if chunk_size is None:
        chunk_size = max(16, min(4096, (1 << 24) // max(vocab, 1)))
        if memory_budget is not None:
            row_bytes = n_bufs * max(vocab, 1) * torch.finfo(dtype).bits // 8
            chunk_size = max(1, min(chunk_size, int(memory_budget) // row_bytes))
    inv_t = 1.0 / temperature
    w = weight.detach().to(dtype)
    w_t = teacher_weight.detach().to(dtype)
    # Temper inside the GEMM by scaling the small operands: s = (x / T) W^T + b / T.
    b = bias.detach().to(dtype) * inv_t if bias is not None else None
    b_t = teacher_bias.detach().to(dtype) * inv_t if teacher_bias is not None else None
    kl_g = kl_weight * temperature  # d(kl_weight T^2 KL)/dz_s = kl_weight T (p_s - p_t)
    need_grad = need_grad_hidden or need_grad_weight or need_grad_bias

    zeros = lambda *shape: torch.zeros(shape, device=h_s.device, dtype=dtype)  # noqa: E731
    row_kl, row_ce = zeros(n), zeros(n)
    grad_h = zeros(n, hidden) if need_grad_hidden else None
    grad_w = zeros(vocab, hidden) if need_grad_weight else None
    grad_b = zeros(vocab) if need_grad_bias else None
    if n == 0:
        return row_kl, row_ce, grad_h, grad_w, grad_b

    # Equal chunks, and chunk buffers allocated once: a fresh large buffer per chunk costs page
    # faults on every first touch (about 3x the time of the exp that fills it, measured).
    n_chunks = -(-n // chunk_size)
    chunk_size = -(-n // n_chunks)
    bufs = torch.empty(n_bufs, chunk_size, vocab, device=h_s.device, dtype=dtype)

    for r0 in range(0, n, chunk_size):
        sl = slice(r0, min(r0 + chunk_size, n))
        n_rows = sl.stop - sl.start
        if target is not None:
            valid = target[sl] != ignore_index
            if h_s.device.type == "cpu" and not bool(valid.any()):  # (a host sync elsewhere)
                continue
            row_w = row_scale[sl].to(dtype) * valid
        else:
            valid = None
            row_w = row_scale[sl].to(dtype)
        s, t, e_t = (buf[:n_rows] for buf in bufs[:3])
        x = h_s[sl].detach().to(dtype)
        x_t = h_t[sl].to(dtype)
        _linear(x * inv_t if inv_t != 1.0 else x, w, b, out=s)
        _linear(x_t * inv_t if inv_t != 1.0 else x_t, w_t, b_t, out=t)
        m_s = s.amax(dim=1, keepdim=True)
        m_t = t.amax(dim=1, keepdim=True)
        s -= m_s
        t -= m_t
        torch.exp(t, out=e_t)
        l_t = e_t.sum(dim=1)
        kl = _rowdot(e_t, t.sub_(s)) / l_t - torch.log(l_t)
        if do_ce:
            tgt = torch.where(valid, target[sl], 0)[:, None]
            z_tgt = temperature * (s.gather(1, tgt).squeeze(1) + m_s.squeeze(1))
            if inv_t != 1.0:  # CE uses the untempered logits z = T s: softmax(T s')
                e_c = torch.mul(s, temperature, out=bufs[3, :n_rows]).exp_()
                l_c = e_c.sum(dim=1)
                lse_c = temperature * m_s.squeeze(1) + torch.log(l_c)
        e_s = s.exp_()
        l_s = e_s.sum(dim=1)
        kl += torch.log(l_s)
        row_kl[sl] = kl if valid is None else torch.where(valid, kl, 0.0)
        if do_ce:
            if inv_t == 1.0:
                lse_c = m_s.squeeze(1) + torch.log(l_s)
            row_ce[sl] = torch.where(valid, lse_c - z_tgt, 0.0)
        if not need_grad:
            continue

        # logit gradient: row_w * (kl_g (p_s - p_t) + ce_weight (p_c - onehot)), p = e / l
        a_s = kl_g * row_w / l_s
        if do_ce and inv_t == 1.0:  # T == 1: the CE softmax is p_s itself
            a_s += ce_weight * row_w / l_s
        g = e_s.mul_(a_s[:, None]).addcmul_(e_t, (-kl_g * row_w / l_t)[:, None])
        if do_ce:
            if inv_t != 1.0:
                g.addcmul_(e_c, (ce_weight * row_w / l_c)[:, None])
            g.scatter_add_(1, tgt, (-ce_weight * row_w)[:, None])
        if need_grad_hidden:
            torch.mm(g, w, out=grad_h[sl])
        if need_grad_weight:
            grad_w.addmm_(g.t(), x)
        if need_grad_bias:
            grad_b += g.sum(dim=0)
    return row_kl, row_ce, grad_h, grad_w, grad_b


def _clean_rows(h_s, h_t, target, ignore_index, check_finite):
    """Zero the ignored rows of both hidden states (differentiably: their gradient is 0) so that
    NaN padding never reaches a GEMM, where 0 * NaN would poison the head's gradient; then, with
    ``check_finite``, refuse non-finite counted rows, naming the tensor and the first row."""
    if target is not None:
        valid = (target != ignore_index)[:, None]
        h_s = torch.where(valid, h_s, 0)
        h_t = torch.where(valid, h_t, 0)
    if check_finite and not bool(torch.isfinite(h_s).all() & torch.isfinite(h_t).all()):  # a sync
        for name, h in (("student_hidden", h_s), ("teacher_hidden", h_t)):
            bad = (~torch.isfinite(h)).any(dim=1).nonzero().flatten()
            if bad.numel():
                raise ValueError(
                    f"{name} has NaN or inf in {bad.numel()} counted row(s), the first at row "
                    f"{int(bad[0])} (of the flattened [N, H] rows); rows whose target is "
                    f"ignore_index ({ignore_index}) may hold anything")
    return h_s, h_t


def _combine(row_kl, row_ce, options):
    """Row losses from the rows' KL and CE: kl_weight T^2 KL + ce_weight CE."""
    rows = (options["kl_weight"] * options["temperature"] ** 2) * row_kl
    return rows + options["ce_weight"] * row_ce if options["ce_weight"] != 0.0 else rows


def _linear(x, w, b, out):
    return torch.addmm(b, x, w.t(), out=out) if b is not None else torch.mm(x, w.t(), out=out)


def _rowdot(a, b):
    """Row-wise dot product of two [R, V] matrices (a batched GEMV: no [R, V] temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


def _fused_impl(name: str):
    """The function behind a fused backend (``LOSS_BACKENDS[name].impl``)."""
    return LOSS_BACKENDS[name].impl()


def _resolve_backend(backend: str, h_s: torch.Tensor) -> str:
    backend = BACKEND_ALIASES.get(backend, backend)
    if backend == "auto":
        return AUTO_BACKEND["cuda" if h_s.is_cuda else "cpu"]
    if backend.startswith("triton"):
        from mtbi_kernels import interpreter_enabled

        if not h_s.is_cuda and not interpreter_enabled():
            raise ValueError(
                f"backend={backend!r} needs CUDA tensors, but student_hidden is on {h_s.device}; "
                "set TRITON_INTERPRET=1 before importing triton to run the kernels in the CPU "
                "interpreter (slow, for tests), or use backend='torch' or 'auto'")
    return backend


def _reduce(rows, target, ignore_index, reduction):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / _n_counted(rows, target, ignore_index).to(rows.dtype)


def _n_counted(rows, target, ignore_index) -> torch.Tensor:
    """The rows a mean divides by, at least 1, as a tensor on the rows' device (no host sync)."""
    if target is None:
        return torch.tensor(max(rows.shape[0], 1), device=rows.device)
    return (target != ignore_index).sum().clamp(min=1)


def _detach(t):
    return t.detach() if t is not None else None


def _is_partitioned(param) -> bool:
    """A DeepSpeed ZeRO-3 parameter whose data lives on other ranks right now."""
    return hasattr(param, "ds_id") and param.data.numel() == 0


@contextlib.contextmanager
def gathered(*params):
    """Gather ZeRO-3 partitioned head parameters for the duration of the call (no-op otherwise).

    Inside a DeepSpeed engine's forward a parent module's weight is already gathered (full shape),
    and gathering it again would fail at exit, so only parameters whose data is empty are gathered.
    Nothing of them is kept for backward by the fused backends (the eager backend copies them).
    Yields whether anything was gathered.
    """
    partitioned = [p for p in params if p is not None and _is_partitioned(p)]
    if not partitioned:
        yield False
        return
    if any(p.requires_grad for p in partitioned):
        raise NotImplementedError(
            "lm_head_weight is a trainable ZeRO-3 partitioned parameter outside the engine's "
            "forward; call the loss inside the DeepSpeed engine's forward (where the weight is "
            "gathered automatically) or freeze the head")
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield True


def _check_options(temperature, reduction, backend, chunk_size=None, memory_budget=None,
                   kl_weight=1.0, ce_weight=0.0):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend in RETIRED_BACKENDS:
        raise ValueError(f"backend={backend!r} is no longer available: {RETIRED_BACKENDS[backend]}")
    if backend not in BACKENDS and backend not in BACKEND_ALIASES:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    low, high = TEMPERATURE_RANGE
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and low <= temperature <= high):
        raise ValueError(f"temperature must be a number in [{low:g}, {high:g}], got {temperature!r}")
    for name, value in (("kl_weight", kl_weight), ("ce_weight", ce_weight)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                and 0 <= value < float("inf")):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    for name, value in (("chunk_size", chunk_size), ("memory_budget", memory_budget)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1 (or None for the default), got {value!r}")


def _check_inputs(h_s, h_t, weight, target, bias, teacher_weight, ignore_index, read_back=True):
    """Validate shapes, dtypes and devices; return the leading (row) shape. The range check of
    ``target_ids`` reads them: on the CPU always, on a GPU only with ``read_back`` (a host sync)."""
    tensors = dict(student_hidden=h_s, teacher_hidden=h_t, lm_head_weight=weight,
                   target_ids=target, lm_head_bias=bias, teacher_lm_head_weight=teacher_weight)
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if h_s.dim() < 2:
        raise ValueError(f"student_hidden must be [N, H] or [B, T, H], got shape {tuple(h_s.shape)}")
    lead = tuple(h_s.shape[:-1])
    hidden = h_s.shape[-1]
    if tuple(h_t.shape[:-1]) != lead:
        dim = _first_mismatch(h_t.shape[:-1], lead)
        raise ValueError(
            f"teacher_hidden has shape {tuple(h_t.shape)} but student_hidden has {tuple(h_s.shape)}: "
            f"they must agree in every dimension but the last (mismatch at dim {dim})")
    weight_full = _full_shape(weight)
    if len(weight_full) != 2:
        raise ValueError(f"lm_head_weight must be [V, H], got shape {weight_full}")
    vocab = weight_full[0]
    if weight_full[1] != hidden:
        raise ValueError(f"lm_head_weight has shape {weight_full}: dim 1 ({weight_full[1]}) must "
                         f"equal student_hidden's last dim ({hidden})")
    if teacher_weight is not None:
        tw = _full_shape(teacher_weight)
        if len(tw) != 2 or tw[0] != vocab:
            raise ValueError(f"teacher_lm_head_weight has shape {tw}: dim 0 must equal the vocabulary "
                             f"size of lm_head_weight ({vocab})")
        if tw[1] != h_t.shape[-1]:
            raise ValueError(f"teacher_lm_head_weight has shape {tw}: dim 1 ({tw[1]}) must equal "
                             f"teacher_hidden's last dim ({h_t.shape[-1]})")
    elif h_t.shape[-1] != hidden:
        raise ValueError(
            f"teacher_hidden's last dim ({h_t.shape[-1]}) differs from student_hidden's ({hidden}); "
            "pass teacher_lm_head_weight for a teacher with another hidden size")
    if bias is not None and _full_shape(bias) != (vocab,):
        raise ValueError(f"lm_head_bias has shape {_full_shape(bias)}, expected ({vocab},)")
    for name, t in (("student_hidden", h_s), ("teacher_hidden", h_t)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if h_s.dtype != weight.dtype:
        raise ValueError(f"student_hidden dtype {h_s.dtype} differs from lm_head_weight dtype "
                         f"{weight.dtype}; cast one of them")
    t_weight = teacher_weight if teacher_weight is not None else weight
    t_name = "teacher_lm_head_weight" if teacher_weight is not None else "lm_head_weight"
    if h_t.dtype != t_weight.dtype:
        raise ValueError(f"teacher_hidden dtype {h_t.dtype} differs from {t_name} dtype "
                         f"{t_weight.dtype}; cast one of them")
    if bias is not None and bias.dtype != weight.dtype:
        raise ValueError(f"lm_head_bias dtype {bias.dtype} differs from lm_head_weight dtype "
                         f"{weight.dtype}")
    for name, t in tensors.items():
        if t is not None and t.device != h_s.device:
            raise ValueError(f"{name} is on {t.device} but student_hidden is on {h_s.device}")
    if target is not None:
        if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
            raise ValueError(f"target_ids must be an integer tensor, got {target.dtype}")
        if tuple(target.shape) != lead:
            raise ValueError(f"target_ids has shape {tuple(target.shape)} but student_hidden has "
                             f"leading shape {lead} (mismatch at dim "
                             f"{_first_mismatch(target.shape, lead)})")
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
        if (read_back or target.device.type == "cpu") and bool(bad.any()):
            pos = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"target_ids{list(pos)} = {int(target[pos])} is outside the "
                             f"vocabulary [0, {vocab}) and is not ignore_index ({ignore_index})")
    return lead


def _full_shape(t) -> tuple:
    """Shape of a tensor, or the full shape of a ZeRO-3 partitioned parameter."""
    if _is_partitioned(t) and hasattr(t, "ds_shape"):
        return tuple(t.ds_shape)
    return tuple(t.shape)


def _first_mismatch(a, b) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))
