"""Where the imitation loss's time goes: a kernel-level profile of one case, per backend.

    python benchmarks/profile_loss.py [--case llama3-8b-N8192] [--backends eager triton] \
        [--steps 3] [--out benchmarks/results]

Runs each backend's forward + backward (the same inputs and closures as `bench_loss.py`) a few
times to warm up, then under `torch.profiler` for --steps steps, and sorts every GPU kernel (CPU
operator on a CPU machine) into GEMMs and the rest. It writes `loss_profile_<device>.md` and
`.json` into --out: per backend the step time, the GEMM time, the non-GEMM time and the heaviest
kernels, and the case's 3-GEMM time at the measured matmul rate. That answers whether a speed-up
target over eager is reachable at all: every backend computes the same three products, so a target
below the time they take (eager's own GEMM time, or the 3-GEMM time at the measured rate, whichever
is less) is out of reach whatever the other kernels do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_cases import CPU_CASES, CUDA_CASES, make_case, matmul_tflops, step_fn  # noqa: E402

# kernel / operator names of matrix products: cuBLAS / cuBLASLt / CUTLASS kernels on CUDA
# (sm90 "nvjet" and "xmma" kernels, "gemm", "cutlass"), the aten operators on the CPU
GEMM_MARKERS = ("gemm", "nvjet", "xmma", "cutlass", "matmul", "aten::mm", "aten::addmm",
                "aten::bmm")


def is_gemm(name: str) -> bool:
    low = name.lower()
    return any(m in low for m in GEMM_MARKERS)


def profile_backend(backend: str, case: tuple, steps: int) -> dict:
    name, n, h, v, dtype, device = case
    step = step_fn(backend, *make_case(n, h, v, dtype, device))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall = (time.perf_counter() - t0) / steps
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync()
    rows = []
    for evt in prof.key_averages():
        if device == "cuda":
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = evt.self_device_time_total
        else:
            if not evt.key.startswith("aten::"):
                continue
            us = evt.self_cpu_time_total
        if us > 0:
            rows.append((evt.key, us / 1e3 / steps, evt.count // steps))
    rows.sort(key=lambda r: -r[1])
    gemm = sum(ms for k, ms, _ in rows if is_gemm(k))
    total = sum(ms for _, ms, _ in rows)
    return dict(backend=backend, step_ms=wall * 1e3, kernel_ms=total, gemm_ms=gemm,
                other_ms=total - gemm,
                top=[dict(name=k[:90], ms=round(ms, 3), calls=c, gemm=is_gemm(k))
                     for k, ms, c in rows[:8]])


def markdown(case: tuple, rate: float, results: list[dict], device_name: str) -> str:
    name, n, h, v, dtype, device = case
    floor_ms = 3 * 2 * n * h * v / (rate * 1e12) * 1e3
    eager = next((r for r in results if r["backend"] == "eager"), None)
    lines = [f"Kernel-level profile of the imitation loss, forward + backward, case {name} "
             f"(N={n}, H={h}, V={v}, {dtype}, frozen head) (`python benchmarks/profile_loss.py`)",
             "", f"{device_name}, torch {torch.__version__}. Measured matmul rate "
             f"{rate:.3g} TFLOP/s, so the 3-GEMM floor (student and teacher logits, G @ W) is "
             f"{floor_ms:.1f} ms.", "",
             "| backend | step (ms) | kernels (ms) | GEMMs (ms) | other kernels (ms) "
             "| GEMMs / floor |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['backend']} | {r['step_ms']:.1f} | {r['kernel_ms']:.1f} | "
                     f"{r['gemm_ms']:.1f} | {r['other_ms']:.1f} | {r['gemm_ms'] / floor_ms:.2f} |")
    if eager:
        need = eager["step_ms"] / 3
        bound = min(floor_ms, eager["gemm_ms"])
        lines += ["", f"3x faster than eager means {need:.1f} ms per step; eager's own GEMMs take "
                  f"{eager['gemm_ms']:.1f} ms ({eager['gemm_ms'] / eager['step_ms']:.0%} of its "
                  f"step) and the 3-GEMM time at the measured rate is {floor_ms:.1f} ms, so that "
                  "target is " + ("reachable." if need >= bound else
                                  f"out of reach on this device by {bound / need:.2f}x.")]
    for r in results:
        lines += ["", f"Heaviest kernels, `{r['backend']}` (ms per step, calls per step):", ""]
        lines += [f"- {t['ms']:.2f} ms x{t['calls']} {'[GEMM] ' if t['gemm'] else ''}`{t['name']}`"
                  for t in r["top"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cases = {c[0]: c for c in CPU_CASES + CUDA_CASES}
    p.add_argument("--case", default=None, choices=sorted(cases),
                   help="default: llama3-8b-N8192 on CUDA, smollm2-N1024 on the CPU")
    p.add_argument("--backends", nargs="+", default=None,
                   help="default: eager triton liger_jsd on CUDA, eager torch on the CPU")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    case = cases[args.case or ("llama3-8b-N8192" if cuda else "smollm2-N1024")]
    if case[5] == "cuda" and not cuda:
        p.error(f"case {case[0]} needs a CUDA GPU")
    backends = args.backends or (["eager", "triton", "liger_jsd"] if cuda else ["eager", "torch"])
    results = []
    for b in backends:
        print(f"profiling {b} on {case[0]} ...", flush=True)
        results.append(profile_backend(b, case, args.steps))
    _, n, h, v, dtype, device = case
    rate = matmul_tflops(n, h, v, dtype, device)
    dev_name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    md = markdown(case, rate, results, dev_name)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"loss_profile_{device}"
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(json.dumps(
        dict(case=case[0], device=dev_name, matmul_tflops=rate, results=results), indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
