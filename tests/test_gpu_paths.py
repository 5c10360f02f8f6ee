"""The GPU paths end to end on a real GPU (skipped without CUDA; benchmarks/gpu_suite.sh runs them).

The compiled Triton kernels at the tile sizes they take at real vocabulary sizes, the fp32-output
GEMMs the 3-GEMM loss relies on (a silent fallback would make it several times slower), the loss
module through autograd on CUDA (``backend="auto"``, the deferred ``reduction="none"`` path with
a trainable head), and the packing kernel, each against float64 or eager references.
"""

import math

import pytest
import torch
from helpers import CONFIG, make_inputs, overrides

from mtbi_fast import imitation_loss
from mtbi_fast.embeddings import pack_embeddings
from mtbi_fast.reference import eager_row_losses

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rel_err(a, ref):
    return float((a.double() - ref).norm() / ref.norm())


def test_fp32_output_gemms_are_native():
    from mtbi_kernels.runtime import native_fp32_out

    assert native_fp32_out("mm", "cuda"), "torch.mm(bf16, bf16, out_dtype=float32) is missing"
    assert native_fp32_out("addmm", "cuda"), "torch.addmm(..., out_dtype=float32) is missing"


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loss_module_on_gpu_at_a_real_vocabulary(backend, dtype):
    """V=50257 (GPT-2's, odd): 2048-column row tiles, several row chunks (a 64 MiB budget)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    x = make_inputs(n=700, h=256, v=50257, bias=True, ignore=(3, 699), dtype=torch.float64)
    x = {k: t.cuda() for k, t in x.items()}
    ref_x = {k: (t.clone().requires_grad_(k in ("student_hidden", "lm_head_weight"))
                 if t.is_floating_point() else t) for k, t in x.items()}
    rows = eager_row_losses(ref_x["student_hidden"], ref_x["teacher_hidden"],
                            ref_x["lm_head_weight"], ref_x["lm_head_weight"].detach(),
                            ref_x["lm_head_bias"], ref_x["lm_head_bias"], ref_x["target_ids"],
                            temperature=1.5, ce_weight=0.3)
    (rows.sum() / 698).backward()
    hs = x["student_hidden"].to(dtype).requires_grad_()
    loss = imitation_loss(hs, x["teacher_hidden"].to(dtype), x["lm_head_weight"].to(dtype),
                          x["target_ids"], x["lm_head_bias"].to(dtype), temperature=1.5,
                          ce_weight=0.3, backend=backend, memory_budget=64 * 2**20)
    loss.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(float(loss) - float(rows.sum() / 698)) / float(rows.sum() / 698) < tol
    assert rel_err(hs.grad, ref_x["student_hidden"].grad) < tol


@pytest.mark.parametrize("backend", ["triton"])
def test_reduction_none_with_a_trainable_head_on_gpu(backend):
    """The deferred path: per-row weights arrive in backward, which recomputes the head's
    gradient."""
    x = make_inputs(n=300, h=128, v=9000, ignore=(5,), dtype=torch.float64)
    x = {k: t.cuda() for k, t in x.items()}
    w64 = x["lm_head_weight"].clone().requires_grad_()
    rows = eager_row_losses(x["student_hidden"], x["teacher_hidden"], w64, w64.detach(), None, None,
                            x["target_ids"], temperature=1.0, ce_weight=0.5)
    weights = torch.linspace(0.2, 2.0, 300, device="cuda", dtype=torch.float64)
    rows.backward(weights)
    w = x["lm_head_weight"].float().requires_grad_()
    out = imitation_loss(x["student_hidden"].float(), x["teacher_hidden"].float(), w,
                         x["target_ids"], ce_weight=0.5, reduction="none", backend=backend)
    out.backward(weights.float())
    assert rel_err(out.detach(), rows.detach()) < 1e-5
    assert rel_err(w.grad, w64.grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pack_kernel_on_gpu(dtype):
    """Compiled packing kernel and its atomic-add backward against the eager gather."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, h, v, f = 5003, 576, 4000, 1200
    src = torch.randint(0, v, (n,), device="cuda", generator=g)
    pos = torch.randperm(n, device="cuda", generator=g)[:f]
    src[pos] = -(torch.arange(f, device="cuda") % (f - 7)) - 1  # some frames used twice
    emb = torch.randn(v, h, device="cuda", dtype=dtype, generator=g).requires_grad_()
    frames = torch.randn(f - 7, h, device="cuda", dtype=dtype, generator=g).requires_grad_()
    grad = torch.randn(n, h, device="cuda", dtype=dtype, generator=g)
    out = pack_embeddings(src, emb, frames, backend="triton")
    out.backward(grad)
    # reference: the eager gather in float64 on the same values (the kernel accumulates in fp32
    # and rounds once to the parameter's dtype)
    emb64, frames64 = (t.detach().double().requires_grad_() for t in (emb, frames))
    ref = pack_embeddings(src, emb64, frames64, backend="eager")
    ref.backward(grad.double())
    assert torch.equal(out.detach().double(), ref.detach())  # a copy: exact
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb.grad.double(), emb64.grad, **tol)
    torch.testing.assert_close(frames.grad.double(), frames64.grad, **tol)


def test_a_training_step_reads_nothing_back_from_the_gpu(data, tmp_path):
    """The trainer's step (forward, backward, clipping, AdamW, the metrics it keeps) under
    ``torch.cuda.set_sync_debug_mode("error")``: any device-to-host synchronization raises. The
    window's sums are read once, after the steps."""
    from mtbi_fast.config import load_config
    from mtbi_fast.trainer import Trainer, _Window

    cfg = load_config(CONFIG, overrides(data, tmp_path / "run", "data.num_workers=0", "train.eval_every=0",
                                        "train.save_every=0", "model.dtype=bfloat16"))
    trainer = Trainer(cfg)
    try:
        device = trainer._device()
        assert device.type == "cuda" and trainer.model.loss_fn.check_finite is False
        loader = iter(trainer.train_loader(device))
        feed = iter([next(loader) for _ in range(3)])
        window = _Window()
        trainer._micro_step(feed, device, window)  # warm-up: lazy initializations, autotuning
        trainer._optimizer_step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                trainer._micro_step(feed, device, window)
                trainer._optimizer_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        loss, kl, _ = window.device_sums()
        assert math.isfinite(loss) and kl > 0 and window.nonfinite_count() == 0
    finally:
        trainer.close()
