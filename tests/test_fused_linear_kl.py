"""kernels/fused_linear_kl.py (mtbi_kernels): the Triton kernels directly, in the CPU interpreter.

Row losses and the gradients of sum(row_scale * row_loss) against float64 autograd through the
eager reference, with non-uniform row weights and tile sizes that divide nothing.
"""

import pytest
import torch
from conftest import make_inputs

from mtbi_fast.reference import eager_row_losses
from mtbi_kernels import fused_linear_kl, triton_available


def float64_reference(x, row_scale, **opts):
    hs = x["student_hidden"].double().requires_grad_()
    w = x["lm_head_weight"].double().requires_grad_()
    b = x["lm_head_bias"].double().requires_grad_() if "lm_head_bias" in x else None
    w_t = x.get("teacher_lm_head_weight")
    w_t = w.detach() if w_t is None else w_t.double()
    b_t = b.detach() if (b is not None and "teacher_lm_head_weight" not in x) else None
    rows = eager_row_losses(hs, x["teacher_hidden"].double(), w, w_t, b, b_t, x.get("target_ids"),
                            **opts)
    (rows * row_scale.double()).sum().backward()
    return rows.detach(), hs.grad, w.grad, b.grad if b is not None else None


# (block_m, block_v, block_k, vocab_splits, grad_chunk): tiles that divide nothing, the vocabulary
# split across programs (statistics merged on the host), gradient chunks smaller than V
@pytest.mark.parametrize("blocks", [(16, 16, 16, 1, None), (32, 64, 32, 3, 64), (64, 128, 64, 2, 128),
                                    (16, 32, 16, 7, 32)])
@pytest.mark.parametrize("opts", [dict(), dict(temperature=1.7, ce_weight=0.4, kl_weight=0.6)])
@pytest.mark.parametrize("teacher_head", [False, True])
def test_kernel_matches_float64(blocks, opts, teacher_head):
    x = make_inputs(n=45, h=40, v=203, h_t=24 if teacher_head else None, bias=True, ignore=(0, 44),
                    dtype=torch.float32)
    row_scale = torch.linspace(0.1, 2.0, 45)
    ref_rows, ref_gh, ref_gw, ref_gb = float64_reference(x, row_scale, **opts)
    w_t = x.get("teacher_lm_head_weight", x["lm_head_weight"])
    b_t = None if teacher_head else x["lm_head_bias"]
    bm, bv, bk, splits, chunk = blocks
    row_kl, row_ce, gh, gw, gb = fused_linear_kl(
        x["student_hidden"], x["teacher_hidden"], x["lm_head_weight"], w_t, x["lm_head_bias"], b_t,
        x["target_ids"], row_scale, need_grad_hidden=True, need_grad_weight=True,
        need_grad_bias=True, block_m=bm, block_v=bv, block_k=bk, vocab_splits=splits,
        grad_chunk=chunk, **opts)
    T = opts.get("temperature", 1.0)
    rows = opts.get("kl_weight", 1.0) * T * T * row_kl + opts.get("ce_weight", 0.0) * row_ce
    tol = dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(rows.double(), ref_rows, **tol)
    torch.testing.assert_close(gh.double(), ref_gh, **tol)
    torch.testing.assert_close(gw.double(), ref_gw, **tol)
    torch.testing.assert_close(gb.double(), ref_gb, **tol)


def test_kernel_without_targets_and_without_grads():
    x = make_inputs(n=21, h=17, v=67, dtype=torch.float32)
    ref_rows, *_ = float64_reference({k: v for k, v in x.items() if k != "target_ids"},
                                     torch.ones(21), temperature=3.0)
    row_kl, row_ce, gh, gw, gb = fused_linear_kl(
        x["student_hidden"], x["teacher_hidden"], x["lm_head_weight"], x["lm_head_weight"], None,
        None, None, torch.ones(21), temperature=3.0, need_grad_hidden=False)
    assert gh is None and gw is None and gb is None
    assert torch.count_nonzero(row_ce) == 0
    torch.testing.assert_close(9.0 * row_kl.double(), ref_rows, rtol=2e-5, atol=2e-6)


def test_kernel_empty_input():
    x = make_inputs(n=1, h=8, v=20, dtype=torch.float32)
    rows, _, gh, _, _ = fused_linear_kl(x["student_hidden"][:0], x["teacher_hidden"][:0],
                                     x["lm_head_weight"], x["lm_head_weight"], None, None, None,
                                     torch.ones(0))
    assert rows.shape == (0,) and gh.shape == (0, 8)


def test_kernel_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_available("cpu")
    x = make_inputs(n=4, h=8, v=20, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        fused_linear_kl(x["student_hidden"], x["teacher_hidden"], x["lm_head_weight"],
                        x["lm_head_weight"], None, None, None, torch.ones(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_gpu(dtype):
    """Compiled (not interpreted) kernels on a real GPU, including the tensor-core bf16 path."""
    x = make_inputs(n=300, h=200, v=5000, bias=True, ignore=(7,), dtype=dtype)
    x = {k: t.cuda() for k, t in x.items()}
    row_scale = torch.full((300,), 1 / 299, device="cuda")
    ref_rows, ref_gh, ref_gw, _ = float64_reference(x, row_scale, ce_weight=0.2, temperature=1.3)
    row_kl, row_ce, gh, gw, _ = fused_linear_kl(
        x["student_hidden"], x["teacher_hidden"], x["lm_head_weight"], x["lm_head_weight"],
        x["lm_head_bias"], x["lm_head_bias"], x["target_ids"], row_scale, ce_weight=0.2,
        temperature=1.3, need_grad_weight=True)
    rows = 1.3**2 * row_kl + 0.2 * row_ce
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(rows.double(), ref_rows, **tol)
    torch.testing.assert_close(gh.double(), ref_gh, **tol)
    torch.testing.assert_close(gw.double(), ref_gw, **tol)
