"""Imitation loss, forward + backward: each backend against eager in the same run.

    pytest benchmarks/bench_loss.py

Time comes from pytest-benchmark (median of the rounds), peak extra memory from a fresh process per
case (benchmarks/loss_cases.py). At the end of the module the rows go to
benchmarks/results/loss_<device>.json and .md, with the ratios to eager.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import results_table
from loss_cases import CPU_CASES, CUDA_CASES, make_case, step_fn

HAS_CUDA = torch.cuda.is_available()
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
PROBE = Path(__file__).with_name("loss_cases.py")


def _params():
    for name, n, h, v, dtype, device in CPU_CASES + CUDA_CASES:
        for backend in ("eager", "chunked", "triton", "liger"):
            marks = []
            if device == "cuda" and not HAS_CUDA:
                marks.append(pytest.mark.skip(reason="needs a CUDA GPU"))
            if device == "cpu" and backend in ("triton", "liger"):
                continue  # the interpreter is a correctness tool, not a speed one
            if backend == "liger" and not HAS_LIGER:
                marks.append(pytest.mark.skip(reason="liger-kernel is not installed"))
            yield pytest.param((name, n, h, v, dtype, device), backend, marks=marks,
                               id=f"{name}-{backend}")


def _peak_extra_bytes(backend, n, h, v, dtype, device) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, str(PROBE), backend, str(n), str(h), str(v), dtype,
                          device], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed for {backend} {n}x{h}x{v}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]


@pytest.fixture(scope="module")
def loss_results():
    rows: list[dict] = []
    yield rows
    for device in ("cpu", "cuda"):
        mine = [r for r in rows if r["device"] == device]
        if not mine:
            continue
        for r in mine:
            if "matmul_roofline_tflops" in r:
                r["roofline_fraction"] = r["tflops_3gemm"] / r["matmul_roofline_tflops"]
        columns = [("case", "case", ""), ("variant", "backend", ""), ("seconds", "time (s)", ".3f"),
                   ("seconds_vs_eager", "time / eager", ".2f"),
                   ("peak_extra_mib", "peak extra (MiB)", ".0f"),
                   ("peak_extra_mib_vs_eager", "memory / eager", ".2f"),
                   ("tflops_3gemm", "TFLOP/s (3 GEMMs)", ".2f")]
        if device == "cuda":
            columns.append(("roofline_fraction", "of matmul roofline", ".2f"))
        table = results_table.write(
            f"loss_{device}", "Imitation loss, forward + backward (`python -m pytest benchmarks/bench_loss.py`)",
            mine, columns, baseline="eager", ratios=("seconds", "peak_extra_mib"))
        print("\n" + table)


@pytest.mark.parametrize("case, backend", list(_params()))
def test_loss_forward_backward(benchmark, loss_results, case, backend):
    name, n, h, v, dtype, device = case
    step = step_fn(backend, *make_case(n, h, v, dtype, device))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        step()
        sync()

    benchmark.group = name
    benchmark.pedantic(run, rounds=3 if device == "cpu" else 10, warmup_rounds=1, iterations=1)
    extra = _peak_extra_bytes(backend, n, h, v, dtype, device)
    benchmark.extra_info.update(peak_extra_mib=extra / 2**20, n=n, h=h, v=v, dtype=dtype)
    row = dict(case=name, variant=backend, n=n, h=h, v=v, dtype=dtype, device=device,
               seconds=benchmark.stats.stats.median, peak_extra_mib=extra / 2**20,
               tflops_3gemm=6 * n * h * v / benchmark.stats.stats.median / 1e12)
    if device == "cuda":
        row["device_name"] = torch.cuda.get_device_name()
        row["matmul_roofline_tflops"] = _matmul_tflops(n, h, v, dtype)
    loss_results.append(row)


_ROOFLINE: dict = {}


def _matmul_tflops(n, h, v, dtype) -> float:
    """Measured throughput of one plain [N, H] x [H, V] matmul at this dtype (the roofline)."""
    key = (n, h, v, dtype)
    if key not in _ROOFLINE:
        a = torch.randn(n, h, device="cuda", dtype=getattr(torch, dtype))
        b = torch.randn(h, v, device="cuda", dtype=getattr(torch, dtype))
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize()
        _ROOFLINE[key] = 2 * n * h * v / (start.elapsed_time(end) / 10 / 1e3) / 1e12
    return _ROOFLINE[key]
