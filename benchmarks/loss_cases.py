"""Shapes and inputs of the imitation-loss benchmark, shared by the benchmark and its memory probe.

Run as a script, it is the memory probe: it builds one case in a fresh process, runs forward and
backward once, and prints the peak memory the step added (JSON on stdout). On the CPU that is the
process's peak resident set (VmHWM, reset to the current RSS through /proc/self/clear_refs just
before the step) minus the resident set before it. A fresh process per measurement keeps the
allocator free of earlier cases' caches. (ru_maxrss is no use here: Linux carries the parent's
peak into a child across fork and exec.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mtbi_fast.loss import LOSS_BACKENDS

# (name, N, H, V, dtype, device)
CPU_CASES = [
    ("smollm2-N1024", 1024, 576, 49152, "float32", "cpu"),
    ("smollm2-N4096", 4096, 576, 49152, "float32", "cpu"),
]
CUDA_CASES = [  # Llama-3 8B's head at three row counts, and Qwen2.5-7B's head
    ("llama3-8b-N8192", 8192, 4096, 128256, "bfloat16", "cuda"),
    ("llama3-8b-N16384", 16384, 4096, 128256, "bfloat16", "cuda"),
    ("llama3-8b-N32768", 32768, 4096, 128256, "bfloat16", "cuda"),
    ("qwen2.5-7b-N8192", 8192, 3584, 151936, "bfloat16", "cuda"),
]
# What runs on each device. "triton@256MiB": the 3-GEMM backend under a 256 MiB budget (what a
# smaller budget costs in speed). "liger_jsd": Liger-Kernel's
# Triton LigerFusedLinearJSD at jsd_beta=0 (forward KL); "liger_chunked": its chunked
# LigerFusedLinearJSDLoss at beta=0 (forward KL, torch.compile'd chunks), which always computes
# the head's gradient too (frozen here), so it does 1.5x the GEMM work of the others.
# "torch" is the CPU path (fp32 GEMMs on a copy of the head): not timed on a GPU. Liger's chunked
# loss is torch.compile'd once per shape (20-40 s each), so it runs on the N=8192 cases only.
CPU_BACKENDS = tuple(n for n, b in LOSS_BACKENDS.items() if "cpu" in b.devices)  # the registry
CUDA_BACKENDS = ("eager", "triton", "triton@256MiB", "liger_jsd", "liger_chunked")
CUDA_ONLY_AT_N8192 = ("liger_chunked",)


def make_case(n, h, v, dtype, device, seed=0):
    """Student/teacher hidden states as MTBI sees them (teacher = student + noise), a frozen head,
    and response targets with 5% of positions ignored."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt = getattr(torch, dtype)
    hs = torch.randn(n, h, generator=g, device=device, dtype=dt)
    ht = (hs.float() + 0.5 * torch.randn(n, h, generator=g, device=device)).to(dt)
    w = (torch.randn(v, h, generator=g, device=device) * h**-0.5).to(dt)
    target = torch.randint(0, v, (n,), generator=g, device=device)
    target[torch.rand(n, generator=g, device=device) < 0.05] = -100
    return hs, ht, w, target


def step_fn(backend, hs, ht, w, target):
    """A closure running forward + backward of one backend on fresh leaf student states (frozen
    head, CE weight 0.5 on the teacher's tokens where the backend has it)."""
    if backend == "liger_jsd":
        from liger_kernel.transformers import LigerFusedLinearJSD

        liger = LigerFusedLinearJSD(jsd_beta=0.0)  # beta 0: forward KL(teacher || student)

        def step():
            x = hs.detach().requires_grad_()
            liger(x, w, ht, w, target).backward()
            return x.grad
        return step
    if backend == "liger_chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=1.0, beta=0.0)

        def step():
            x = hs.detach().requires_grad_()
            liger(x, w, ht, w, target).backward()
            return x.grad
        return step

    from mtbi_fast import imitation_loss

    name, _, budget = backend.partition("@")
    kw = dict(memory_budget=int(budget.removesuffix("MiB")) * 2**20) if budget else {}

    def step():
        x = hs.detach().requires_grad_()
        imitation_loss(x, ht, w, target, ce_weight=0.5, backend=name, **kw).backward()
        return x.grad
    return step


_ROOFLINE: dict = {}


def matmul_tflops(n: int, h: int, v: int, dtype: str, device: str = "cuda") -> float:
    """Measured throughput of one plain [N, H] x [H, V] matmul at this dtype (the roofline),
    memoized per shape: 3 warm-ups, then the mean of 10 (CUDA events on a GPU, wall time on CPU)."""
    key = (n, h, v, dtype, device)
    if key not in _ROOFLINE:
        a = torch.randn(n, h, device=device, dtype=getattr(torch, dtype))
        b = torch.randn(h, v, device=device, dtype=getattr(torch, dtype))
        for _ in range(3):
            a @ b
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                a @ b
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(10):
                a @ b
            seconds = time.perf_counter() - t0
        _ROOFLINE[key] = 2 * n * h * v / (seconds / 10) / 1e12
    return _ROOFLINE[key]


def cuda_peak_extra_bytes(step) -> int:
    """Peak GPU memory one step allocates beyond what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return max(torch.cuda.max_memory_allocated() - before, 0)


def rss_bytes(field: str = "VmRSS") -> int:
    """Current (VmRSS) or peak (VmHWM) resident set of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss():
    """Make VmHWM restart from the current resident set (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("backend")
    p.add_argument("n", type=int)
    p.add_argument("h", type=int)
    p.add_argument("v", type=int)
    p.add_argument("dtype")
    p.add_argument("device")
    a = p.parse_args(argv)
    inputs = make_case(a.n, a.h, a.v, a.dtype, a.device)
    step = step_fn(a.backend, *inputs)
    if a.device == "cuda":
        extra = cuda_peak_extra_bytes(step)
    else:
        reset_peak_rss()
        before = rss_bytes()
        step()
        extra = rss_bytes("VmHWM") - before
    json.dump({"extra_bytes": max(extra, 0)}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
