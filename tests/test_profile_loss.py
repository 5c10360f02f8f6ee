"""benchmarks/profile_loss.py, the tool behind docs/gpu.md's "why 3x over eager is out of reach":
on the CPU, its split of a step into GEMMs and the rest, and the floor arithmetic of its report."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_loss  # noqa: E402

CASE = ("tiny", 64, 32, 500, "float32", "cpu")


def test_is_gemm_names_cublas_and_aten_products():
    for name in ("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "sm90_xmma_gemm_bf16bf16",
                 "cutlass_80_tensorop_s1688gemm", "aten::mm", "aten::addmm"):
        assert profile_loss.is_gemm(name), name
    for name in ("_kl_rows_kernel", "aten::_log_softmax", "cunn_SoftMaxForward", "aten::mul"):
        assert not profile_loss.is_gemm(name), name


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_profile_splits_a_cpu_step(backend):
    r = profile_loss.profile_backend(backend, CASE, steps=1)
    assert r["gemm_ms"] > 0 and r["other_ms"] > 0
    assert r["kernel_ms"] == pytest.approx(r["gemm_ms"] + r["other_ms"])
    assert any(t["gemm"] and t["name"] in ("aten::mm", "aten::addmm") for t in r["top"])
    assert r["step_ms"] > 0


def test_report_states_the_floor_and_the_verdict():
    # 3 GEMMs of 64 x 32 x 500 at 1e-6 TFLOP/s: 3 * 2 * 64 * 32 * 500 / 1e6 s = 6144 ms
    rows = [dict(backend="eager", step_ms=30000.0, kernel_ms=29000.0, gemm_ms=9000.0,
                 other_ms=20000.0, top=[]),
            dict(backend="triton", step_ms=9000.0, kernel_ms=8000.0, gemm_ms=6500.0,
                 other_ms=1500.0, top=[])]
    md = profile_loss.markdown(CASE, 1e-6, rows, "CPU")
    assert "so the 3-GEMM floor (student and teacher logits, G @ W) is 6144.0 ms" in md
    assert "3x faster than eager means 10000.0 ms per step" in md and "reachable." in md
    # 5000 ms needed; eager's GEMMs (6000 ms, 40% of the step) are under the 6144 ms at the
    # measured rate, so they bound it: out of reach by 6000 / 5000 = 1.20x
    slow = [dict(rows[0], step_ms=15000.0, gemm_ms=6000.0)]
    md = profile_loss.markdown(CASE, 1e-6, slow, "CPU")
    assert "eager's own GEMMs take 6000.0 ms (40% of its step)" in md
    assert "out of reach on this device by 1.20x" in md
