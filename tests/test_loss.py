"""mtbi_fast.loss: every backend against a float64 eager computation, values and gradients."""

import math

import pytest
import torch
from helpers import make_inputs

import mtbi_fast
from mtbi_fast import ImitationLoss, imitation_loss
from mtbi_fast.loss import LOSS_BACKENDS
from mtbi_fast.reference import eager_row_losses

BACKENDS = list(LOSS_BACKENDS)  # the registry: a new backend is tested here without an edit
GRAD_KEYS = ("student_hidden", "lm_head_weight", "lm_head_bias")


def reference(x, temperature=1.0, kl_weight=1.0, ce_weight=0.0, reduction="mean", use_target=True):
    """Float64 loss and gradients, computed independently of the backends' code paths."""
    x64 = {k: (t.detach().double().requires_grad_(k in GRAD_KEYS) if t.is_floating_point() else t)
           for k, t in x.items()}
    hs = x64["student_hidden"]
    ht = x64["teacher_hidden"]
    w = x64["lm_head_weight"]
    b = x64.get("lm_head_bias")
    w_t = x64.get("teacher_lm_head_weight")
    tgt = x64["target_ids"] if use_target else None
    lead = hs.shape[:-1]
    rows = eager_row_losses(
        hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1]), w,
        w.detach() if w_t is None else w_t, b, (b.detach() if b is not None else None) if w_t is None else None,
        tgt.reshape(-1) if tgt is not None else None,
        temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight)
    if reduction == "none":
        out = rows.reshape(lead)
        out.backward(torch.linspace(0.5, 1.5, rows.numel(), dtype=torch.float64).reshape(lead))
    else:
        n = rows.numel() if tgt is None else int((tgt != -100).sum())
        out = rows.sum() / (max(n, 1) if reduction == "mean" else 1)
        out.backward()
    grads = {k: x64[k].grad for k in GRAD_KEYS if k in x64}
    return out.detach(), grads


def run(x, backend, dtype=torch.float32, use_target=True, reduction="mean", **kw):
    xd = {k: (t.detach().to(dtype).requires_grad_(k in GRAD_KEYS) if t.is_floating_point() else t)
          for k, t in x.items()}
    if not use_target:
        xd.pop("target_ids")
    out = imitation_loss(**xd, backend=backend, reduction=reduction, **kw)
    if reduction == "none":
        out.backward(torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float32).reshape(out.shape))
    else:
        out.backward()
    grads = {k: xd[k].grad for k in GRAD_KEYS if k in xd}
    return out.detach(), grads


def assert_matches(out, grads, ref_out, ref_grads, rtol=2e-5, atol=2e-6):
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert grads[k] is not None, k
        torch.testing.assert_close(grads[k].double(), ref_grads[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    [
        dict(),  # KL only, T = 1
        dict(temperature=2.0),
        dict(temperature=0.7, ce_weight=0.5, kl_weight=0.8),
        dict(ce_weight=1.0),  # T = 1 with CE: the CE softmax is the KL student softmax
        dict(bias=True, temperature=1.3, ce_weight=0.2),
        dict(h_t=24, temperature=1.5, ce_weight=0.3),  # separate teacher head, H_t != H
        dict(h_t=24, bias=True),  # bias belongs to the student head only
    ],
    ids=["kl", "T2", "T0.7+ce", "T1+ce", "bias", "teacher-head", "teacher-head+bias"],
)
def test_backend_matches_float64(backend, case):
    case = dict(case)
    inputs = make_inputs(h_t=case.pop("h_t", None), bias=case.pop("bias", False), ignore=(3, 17))
    ref_out, ref_grads = reference(inputs, **case)
    out, grads = run(inputs, backend, chunk_size=8, **case)
    assert out.dtype == torch.float32
    assert_matches(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(backend, reduction):
    inputs = make_inputs(bias=True, ignore=(0, 9))
    ref_out, ref_grads = reference(inputs, temperature=1.2, ce_weight=0.3, reduction=reduction)
    out, grads = run(inputs, backend, temperature=1.2, ce_weight=0.3, reduction=reduction)
    assert out.shape == ref_out.shape
    assert_matches(out, grads, ref_out, ref_grads)
    if reduction == "none":
        assert out[0] == 0 and out[9] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_input_and_no_targets(backend):
    """[B, T, H] input, no target_ids: every row counts; 'none' keeps the [B, T] shape."""
    inputs = make_inputs(n=30, lead=(5, 6))
    for reduction in ("mean", "none"):
        ref_out, ref_grads = reference(inputs, temperature=2.0, reduction=reduction, use_target=False)
        out, grads = run(inputs, backend, use_target=False, temperature=2.0, reduction=reduction)
        assert out.shape == ((5, 6) if reduction == "none" else ())
        assert_matches(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_gives_zero_loss_and_zero_grads(backend):
    inputs = make_inputs(n=20, bias=True, ignore=range(20))
    out, grads = run(inputs, backend, ce_weight=0.5)
    assert out.item() == 0.0
    for k, g in grads.items():
        assert torch.isfinite(g).all(), k
        assert torch.count_nonzero(g) == 0, k


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_row_ignored_gets_no_gradient(backend):
    inputs = make_inputs(n=20, ignore=(4,))
    out, grads = run(inputs, backend, ce_weight=0.5)
    assert torch.count_nonzero(grads["student_hidden"][4]) == 0
    assert torch.count_nonzero(grads["student_hidden"][5]) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_ignored_rows_changes_nothing(backend):
    """Padding rows (target -100) may hold NaN or inf in either hidden state: the loss and every
    gradient, the head's included, equal those of the same batch without those rows."""
    x = make_inputs(n=20, bias=True, ignore=(4, 11))
    x["student_hidden"][4] = float("nan")
    x["teacher_hidden"][11] = float("inf")
    keep = torch.tensor([i not in (4, 11) for i in range(20)])
    clean = {k: (v[keep] if k in ("student_hidden", "teacher_hidden", "target_ids") else v)
             for k, v in x.items()}
    ref_out, ref_grads = reference(clean, ce_weight=0.5, reduction="sum")
    out, grads = run(x, backend, ce_weight=0.5, reduction="sum")
    torch.testing.assert_close(out.double(), ref_out, rtol=2e-5, atol=2e-6)
    assert torch.count_nonzero(grads["student_hidden"][~keep]) == 0
    torch.testing.assert_close(grads["student_hidden"][keep].double(), ref_grads["student_hidden"],
                               rtol=2e-5, atol=2e-6)
    for k in ("lm_head_weight", "lm_head_bias"):
        torch.testing.assert_close(grads[k].double(), ref_grads[k], rtol=2e-5, atol=2e-6, msg=k)


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_non_finite_counted_rows_are_refused(backend):
    x = {k: (v.float() if v.is_floating_point() else v) for k, v in make_inputs(n=9, ignore=(2,)).items()}
    x["teacher_hidden"][5, 3] = float("inf")
    with pytest.raises(ValueError, match=r"teacher_hidden has NaN or inf in 1 counted row\(s\), "
                                         r"the first at row 5 .*ignore_index \(-100\) may hold"):
        imitation_loss(**x, backend=backend)
    x["teacher_hidden"][5, 3] = 0.0
    x["student_hidden"][2, 0] = float("nan")  # an ignored row: fine
    assert torch.isfinite(imitation_loss(**x, backend=backend))
    x["student_hidden"][7, 1] = float("nan")
    with pytest.raises(ValueError, match=r"student_hidden has NaN or inf in 1 counted row\(s\), "
                                         r"the first at row 7"):
        imitation_loss(**x, backend=backend)
    assert torch.isnan(imitation_loss(**x, backend=backend, check_finite=False))  # unchecked: NaN


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits(backend):
    """Logits of magnitude ~1e4 (near one-hot distributions) stay finite and accurate."""
    inputs = make_inputs(n=19, h=16, v=150, scale=1.0)
    inputs["student_hidden"] = inputs["student_hidden"] * 2500 / math.sqrt(16)
    inputs["teacher_hidden"] = inputs["teacher_hidden"] * 2500 / math.sqrt(16)
    logits = inputs["student_hidden"] @ inputs["lm_head_weight"].T
    assert logits.abs().max() > 1e4
    ref_out, ref_grads = reference(inputs, temperature=1.0, ce_weight=0.1)
    out, grads = run(inputs, backend, ce_weight=0.1)
    assert torch.isfinite(out) and all(torch.isfinite(g).all() for g in grads.values())
    assert_matches(out, grads, ref_out, ref_grads, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_within_twice_eager(backend, dtype):
    """At bf16/fp16 the fused paths' error (vs float64 on the same rounded inputs) is at most twice
    plain PyTorch's (the eager backend at that precision)."""
    inputs = make_inputs(n=33, h=48, v=211, bias=True, ignore=(1,))
    inputs = {k: (t.to(dtype).double() if t.is_floating_point() else t) for k, t in inputs.items()}
    ref_out, ref_grads = reference(inputs, temperature=1.5, ce_weight=0.3)
    errors = {}
    for name in ("eager", backend):
        out, grads = run(inputs, name, dtype=dtype, temperature=1.5, ce_weight=0.3)
        assert grads["student_hidden"].dtype == dtype
        errors[name] = [abs(out.double() - ref_out).item()] + [
            ((grads[k].double() - ref_grads[k]).abs().max() / ref_grads[k].abs().max()).item()
            for k in GRAD_KEYS]
    for what, err, err_eager in zip(("loss",) + GRAD_KEYS, errors[backend], errors["eager"]):
        assert err <= 2 * err_eager + 1e-6, (what, err, err_eager)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_liger_kernel_chunked_jsd_at_forward_kl(backend, temperature):
    """A peer library: Liger-Kernel's chunked LigerFusedLinearJSDLoss at beta=0 is
    KL(teacher || student) (not scaled by T^2) plus its weighted CE on the same targets."""
    chunked_loss = pytest.importorskip("liger_kernel.chunked_loss")
    x = {k: (v.float() if v.is_floating_point() else v)
         for k, v in make_inputs(n=50, h=32, v=301, ignore=(0, 7)).items()}
    peer = chunked_loss.LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=1.0,
                                                beta=0.0, temperature=temperature, compiled=False)
    hs_peer = x["student_hidden"].clone().requires_grad_()
    want = peer(hs_peer, x["lm_head_weight"], x["teacher_hidden"], x["lm_head_weight"],
                x["target_ids"])
    want.backward()
    out, grads = run(x, backend, ce_weight=0.5, temperature=temperature,
                     kl_weight=1 / temperature**2)
    torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["student_hidden"], hs_peer.grad, rtol=1e-4, atol=1e-6)


def test_chunked_gradcheck_float64():
    x = make_inputs(n=7, h=5, v=11, bias=True, ignore=(2,))
    w_t = x["lm_head_weight"].clone()  # constant teacher head: gradcheck perturbs W on its own
    hs, w, b = (x[k].clone().requires_grad_() for k in GRAD_KEYS)
    for reduction in ("mean", "sum", "none"):
        def f(hs, w, b, reduction=reduction):
            return imitation_loss(hs, x["teacher_hidden"], w, x["target_ids"], b, w_t,
                                  temperature=1.7, ce_weight=0.3, reduction=reduction,
                                  backend="torch", chunk_size=3)
        assert torch.autograd.gradcheck(f, (hs, w, b))


def test_teacher_side_is_constant():
    x = make_inputs(h_t=24)
    ht = x["teacher_hidden"].float().requires_grad_()
    wt = x["teacher_lm_head_weight"].float().requires_grad_()
    loss = imitation_loss(x["student_hidden"].float().requires_grad_(), ht,
                          x["lm_head_weight"].float(), teacher_lm_head_weight=wt)
    loss.backward()
    assert ht.grad is None and wt.grad is None


def test_frozen_head_gets_no_grad_and_module_api():
    x = make_inputs(bias=True)
    hs = x["student_hidden"].float().requires_grad_()
    w = x["lm_head_weight"].float()
    module = ImitationLoss(temperature=2.0, ce_weight=0.5, backend="torch")
    assert "temperature=2.0" in repr(module)
    loss = module(hs, x["teacher_hidden"].float(), w, x["target_ids"], x["lm_head_bias"].float())
    loss.backward()
    expected = imitation_loss(hs.detach(), x["teacher_hidden"].float(), w, x["target_ids"],
                              x["lm_head_bias"].float(), temperature=2.0, ce_weight=0.5,
                              backend="eager")
    torch.testing.assert_close(loss, expected)
    assert hs.grad is not None and w.grad is None
    assert mtbi_fast.ImitationLoss is ImitationLoss and callable(mtbi_fast.imitation_loss)


def test_no_grad_forward_matches():
    x = make_inputs()
    with torch.no_grad():
        a = imitation_loss(x["student_hidden"], x["teacher_hidden"], x["lm_head_weight"],
                           backend="torch")
    b = imitation_loss(x["student_hidden"], x["teacher_hidden"], x["lm_head_weight"],
                       backend="eager")
    torch.testing.assert_close(a, b)


def test_auto_picks_torch_on_cpu_and_chunked_is_its_former_name(monkeypatch):
    import mtbi_fast.loss as loss_mod

    calls = []
    real = loss_mod._chunked_linear_kl
    monkeypatch.setattr(loss_mod, "_chunked_linear_kl", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = make_inputs(dtype=torch.float32)
    a = imitation_loss(x["student_hidden"], x["teacher_hidden"], x["lm_head_weight"])
    b = imitation_loss(x["student_hidden"], x["teacher_hidden"], x["lm_head_weight"], backend="chunked")
    assert calls == [1, 1] and torch.equal(a, b)
    assert loss_mod.available_backends("cpu")[:2] == ["torch", "eager"]


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = make_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors.*TRITON_INTERPRET=1"):
        imitation_loss(x["student_hidden"], x["teacher_hidden"], x["lm_head_weight"],
                       backend="triton")


def _base():
    x = make_inputs(n=6, h=8, v=20, dtype=torch.float32)
    return [x["student_hidden"], x["teacher_hidden"], x["lm_head_weight"], x["target_ids"]]


@pytest.mark.parametrize(
    "mutate, kwargs, message",
    [
        (lambda a: a.__setitem__(1, a[1][:5]), {},
         r"teacher_hidden has shape \(5, 8\) but student_hidden has \(6, 8\).*dim 0"),
        (lambda a: a.__setitem__(2, torch.randn(20, 9)), {},
         r"lm_head_weight has shape \(20, 9\): dim 1 \(9\) must equal student_hidden's last dim \(8\)"),
        (lambda a: a.__setitem__(1, torch.randn(6, 5)), {},
         r"teacher_hidden's last dim \(5\) differs from student_hidden's \(8\)"),
        (lambda a: a.__setitem__(3, a[3][:4]), {},
         r"target_ids has shape \(4,\) but student_hidden has leading shape \(6,\)"),
        (lambda a: a.__setitem__(3, a[3].float()), {}, r"target_ids must be an integer tensor"),
        (lambda a: a[3].__setitem__(2, 20), {},
         r"target_ids\[2\] = 20 is outside the vocabulary \[0, 20\)"),
        (lambda a: a.__setitem__(2, a[2].double()), {},
         r"student_hidden dtype torch.float32 differs from lm_head_weight dtype torch.float64"),
        (lambda a: a.__setitem__(0, a[0][0]), {}, r"student_hidden must be \[N, H\] or \[B, T, H\]"),
        (lambda a: None, {"teacher_lm_head_weight": torch.randn(19, 8)},
         r"teacher_lm_head_weight has shape \(19, 8\): dim 0 must equal the vocabulary size"),
        (lambda a: None, {"lm_head_bias": torch.randn(21)},
         r"lm_head_bias has shape \(21,\), expected \(20,\)"),
        (lambda a: a.__setitem__(3, None), {"ce_weight": 0.5}, r"ce_weight=0.5 needs target_ids"),
        (lambda a: None, {"reduction": "avg"}, r"reduction must be one of"),
        (lambda a: None, {"backend": "cuda"}, r"backend must be one of"),
        (lambda a: None, {"backend": "triton_recompute"},
         r"backend='triton_recompute' is no longer available: .*memory_budget"),
        (lambda a: None, {"temperature": 0.0}, r"temperature must be a number in \[0.001, 1000\], got 0.0"),
        (lambda a: None, {"temperature": 1e-300}, r"temperature must be a number in \[0.001, 1000\], got 1e-300"),
    ],
)
def test_bad_inputs_name_the_tensor_and_dim(mutate, kwargs, message):
    args = _base()
    mutate(args)
    with pytest.raises(ValueError, match=message):
        imitation_loss(*args, **kwargs)


def test_module_rejects_bad_options():
    with pytest.raises(ValueError, match="reduction must be one of"):
        ImitationLoss(reduction="avg")
    with pytest.raises(ValueError, match="backend must be one of"):
        ImitationLoss(backend="fast")
    with pytest.raises(ValueError, match=r"chunk_size must be an int >= 1 .*got 0"):
        ImitationLoss(chunk_size=0)
    with pytest.raises(ValueError, match=r"memory_budget must be an int >= 1 .*got -5"):
        ImitationLoss(memory_budget=-5)
    with pytest.raises(ValueError, match=r"temperature must be a number in \[0.001, 1000\], got inf"):
        ImitationLoss(temperature=float("inf"))
    with pytest.raises(ValueError, match=r"kl_weight must be a finite number >= 0, got -1.0"):
        ImitationLoss(kl_weight=-1.0)
    with pytest.raises(ValueError, match=r"ce_weight must be a finite number >= 0, got nan"):
        ImitationLoss(ce_weight=float("nan"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_memory_budget_changes_chunks_not_results(backend):
    """A budget too small for more than one row at a time gives the same loss and gradients as the
    default."""
    x = make_inputs(n=23, h=16, v=203, bias=True, ignore=(5,))
    ref_out, ref_grads = reference(x, temperature=1.3, ce_weight=0.2)
    out, grads = run(x, backend, temperature=1.3, ce_weight=0.2, memory_budget=1)
    assert_matches(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_parts(backend):
    """The parts are the unweighted mean KL (at temperature T) and mean CE over counted rows."""
    x = {k: (v.float() if v.is_floating_point() else v) for k, v in make_inputs(ignore=(1, 2)).items()}
    loss, parts = imitation_loss(**x, temperature=2.0, kl_weight=0.7, ce_weight=0.3,
                                 backend=backend, return_parts=True)
    kl_only = imitation_loss(**x, temperature=2.0, backend="eager")
    ce_only = torch.nn.functional.cross_entropy(
        x["student_hidden"] @ x["lm_head_weight"].T, x["target_ids"], ignore_index=-100)
    torch.testing.assert_close(parts["kl"], kl_only / 4.0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["ce"], ce_only, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, 0.7 * 4.0 * parts["kl"] + 0.3 * parts["ce"], rtol=1e-5, atol=1e-6)
    rows, row_parts = imitation_loss(**x, temperature=2.0, ce_weight=0.3, reduction="none",
                                     backend=backend, return_parts=True)
    assert row_parts["kl"].shape == rows.shape and row_parts["kl"][1] == 0


@pytest.mark.parametrize("backend", ["eager", "torch", "triton"])
def test_the_dtype_contract_and_double_backward(backend):
    """float64 in, float64 out; float32, bf16 and fp16 in, float32 out; gradients in the input's
    dtype (docs/loss.md). A second derivative works on eager (against float64 autograd of the
    same math) and is a clear NotImplementedError on the fused backends."""
    x = make_inputs(n=9, h=8, v=21, dtype=torch.float64)
    for dtype, want in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                        (torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        hs = x["student_hidden"].to(dtype).requires_grad_()
        loss = imitation_loss(hs, x["teacher_hidden"].to(dtype), x["lm_head_weight"].to(dtype), backend=backend)
        (grad,) = torch.autograd.grad(loss, hs)
        assert loss.dtype == want and grad.dtype == dtype, (dtype, loss.dtype, grad.dtype)
    hs = x["student_hidden"].clone().requires_grad_()
    loss = imitation_loss(hs, x["teacher_hidden"], x["lm_head_weight"], backend=backend)
    if backend == "eager":  # second derivatives against finite differences (float64)
        assert torch.autograd.gradgradcheck(
            lambda h: imitation_loss(h, x["teacher_hidden"], x["lm_head_weight"], backend="eager"), (hs,))
    else:
        with pytest.raises(NotImplementedError, match="no second derivative .*use backend='eager'"):
            torch.autograd.grad(loss, hs, create_graph=True)
