"""Imitation loss, forward + backward: each backend against eager (and Liger-Kernel) in one run.

    python -m pytest benchmarks/bench_loss.py            # CPU cases (and CUDA cases on a GPU)
    python -m pytest benchmarks/bench_loss.py -k cuda    # the CUDA cases only (gpu_suite.sh)

Time comes from pytest-benchmark (median of the rounds). Peak extra memory: on a GPU, the
caching allocator's peak over what was allocated before the step (in process); on the CPU, from a
fresh process per case (benchmarks/loss_cases.py). At the end of the module the rows go to
benchmarks/results/loss_<device>.json and .md, with the ratios to eager; on a GPU also the
measured matmul roofline, the 3-GEMM floor it implies, and the issue's targets for the fused
backend at N=8192, H=4096, V=128256 (<= 50 ms, >= 1.3x the faster Liger loss, >= 3x eager,
<= 2 GiB extra).
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
from loss_cases import (CPU_BACKENDS, CPU_CASES, CUDA_BACKENDS, CUDA_CASES, CUDA_ONLY_AT_N8192,
                        cuda_peak_extra_bytes, make_case, matmul_tflops, step_fn)

HAS_CUDA = torch.cuda.is_available()
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
PROBE = Path(__file__).with_name("loss_cases.py")


def _params():
    # on the CPU the Triton kernels only run in the interpreter: a correctness tool, not a speed one
    for name, n, h, v, dtype, device in CPU_CASES + CUDA_CASES:
        for backend in CUDA_BACKENDS if device == "cuda" else CPU_BACKENDS:
            if backend in CUDA_ONLY_AT_N8192 and n != 8192:
                continue
            marks = [pytest.mark.cuda] if device == "cuda" else []
            if device == "cuda" and not HAS_CUDA:
                marks.append(pytest.mark.skip(reason="needs a CUDA GPU"))
            if backend.startswith("liger") and not HAS_LIGER:
                marks.append(pytest.mark.skip(reason="liger-kernel is not installed"))
            yield pytest.param((name, n, h, v, dtype, device), backend, marks=marks,
                               id=f"{device}-{name}-{backend}")


def _peak_extra_bytes(backend, n, h, v, dtype, device) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, str(PROBE), backend, str(n), str(h), str(v), dtype,
                          device], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed for {backend} {n}x{h}x{v}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]


@pytest.fixture(scope="module")
def loss_results():
    """The rows so far; the tables are rewritten after every case, so a run cut short (a stage
    time limit on a GPU machine) still leaves the cases it finished."""
    rows: list[dict] = []
    yield rows
    if rows:
        print("\n" + write_tables(rows))


def write_tables(rows: list[dict]) -> str:
    tables = []
    for device in ("cpu", "cuda"):
        mine = [r for r in rows if r["device"] == device]
        if not mine:
            continue
        columns = [("case", "case", ""), ("variant", "backend", ""), ("seconds", "time (s)", ".4f"),
                   ("seconds_vs_eager", "time / eager", ".2f"),
                   ("peak_extra_mib", "peak extra (MiB)", ".0f"),
                   ("peak_extra_mib_vs_eager", "memory / eager", ".2f"),
                   ("tflops_3gemm", "TFLOP/s (3 GEMMs)", ".1f")]
        if device == "cuda":
            columns += [("matmul_roofline_tflops", "matmul roofline (TFLOP/s)", ".0f"),
                        ("floor_seconds", "3-GEMM floor (s)", ".4f"),
                        ("roofline_fraction", "of roofline", ".2f"),
                        ("floor_ratio", "time / floor (target <= 1.05)", ".3f"),
                        ("grad_err_vs_eager", "grad error vs eager", ".1e"), ("note", "note", "")]
        table = results_table.write(
            f"loss_{device}", "Imitation loss, forward + backward (`python -m pytest benchmarks/bench_loss.py`)",
            mine, columns, baseline="eager", ratios=("seconds", "peak_extra_mib"))
        if device == "cuda":
            table += "\n" + targets_markdown(mine)
            results_table.RESULTS.joinpath("loss_cuda.md").write_text(table)
        tables.append(table)
    return "\n".join(tables)


_EAGER_GRAD: dict = {}  # case -> eager's student gradient (fp32), to check the others against


@pytest.mark.parametrize("case, backend", list(_params()))
def test_loss_forward_backward(benchmark, loss_results, case, backend):
    name, n, h, v, dtype, device = case
    row = dict(case=name, variant=backend, n=n, h=h, v=v, dtype=dtype, device=device)
    if device == "cuda":
        row.update(device_name=torch.cuda.get_device_name(),
                   matmul_roofline_tflops=matmul_tflops(n, h, v, dtype))
        row["floor_seconds"] = 6 * n * h * v / (row["matmul_roofline_tflops"] * 1e12)
        if backend == "liger_chunked":
            row["note"] = "also computes the head's gradient"
    step = None
    try:
        step = step_fn(backend, *make_case(n, h, v, dtype, device))
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def run():
            step()
            sync()

        benchmark.group = name
        rounds = 3 if device == "cpu" else 10 if n <= 8192 else 5
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
        if device == "cuda":
            extra = cuda_peak_extra_bytes(step)
            grad = step().float()
    except torch.cuda.OutOfMemoryError as exc:  # eager at the largest N: record it, go on
        row["note"] = f"out of memory: {str(exc).splitlines()[0][:80]}"
        loss_results.append(row)
        del step
        torch.cuda.empty_cache()
        write_tables(loss_results)
        pytest.skip(row["note"])
    if device == "cpu":
        extra = _peak_extra_bytes(backend, n, h, v, dtype, device)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(peak_extra_mib=extra / 2**20, n=n, h=h, v=v, dtype=dtype)
    row.update(seconds=seconds, peak_extra_mib=extra / 2**20, tflops_3gemm=6 * n * h * v / seconds / 1e12)
    error = None
    if device == "cuda":
        row["roofline_fraction"] = row["floor_seconds"] / seconds
        row["floor_ratio"] = seconds / row["floor_seconds"]
        if backend == "eager":
            _EAGER_GRAD[name] = grad
        elif name in _EAGER_GRAD and not backend.startswith("liger"):  # Liger has no CE here
            ref = _EAGER_GRAD[name]
            error = float((grad - ref).norm() / ref.norm())
            row["grad_err_vs_eager"] = error
        del grad
    loss_results.append(row)
    write_tables(loss_results)
    if error is not None:  # a fast wrong kernel must not pass: bf16 gradients within 1e-2
        assert error < 1e-2, f"{backend} at {name}: gradient error {error:.2e} vs eager"


TARGET_CASE = "llama3-8b-N8192"


def targets_markdown(rows: list[dict]) -> str:
    """The issue's loss targets for the default fused backend ("triton") at N=8192, H=4096,
    V=128256, each with the measured value and met/missed (by how much)."""
    case = {r["variant"]: r for r in rows if r["case"] == TARGET_CASE and r.get("seconds")}
    ours = case.get("triton")
    if ours is None:
        return f"Targets: no triton row for {TARGET_CASE}.\n"
    lines = [f"Targets at {TARGET_CASE} (backend `triton`, bf16, frozen head):", ""]

    def line(what, value, goal, ok, unit=""):
        verdict = "met" if ok else "MISSED"
        lines.append(f"- {what}: {value}{unit} (target {goal}{unit}): {verdict}")

    ms = ours["seconds"] * 1e3
    line("forward + backward", f"{ms:.1f}", "<= 50", ms <= 50, " ms")
    liger = [case[k]["seconds"] for k in ("liger_jsd", "liger_chunked") if k in case]
    if liger:
        x = min(liger) / ours["seconds"]
        line("speed-up over the faster Liger-Kernel loss", f"{x:.2f}", ">= 1.3", x >= 1.3, "x")
    if "eager" in case:
        x = case["eager"]["seconds"] / ours["seconds"]
        line("speed-up over eager", f"{x:.2f}", ">= 3", x >= 3, "x")
    gib = ours["peak_extra_mib"] / 1024
    line("peak extra memory", f"{gib:.2f}", "<= 2", gib <= 2, " GiB")
    return "\n".join(lines) + "\n"


