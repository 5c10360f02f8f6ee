"""Compile a Triton kernel for a GPU on a machine without one, and read ``ptxas -v``'s report.

Triton lowers a kernel to PTX for any CUDA target without a driver; the ``ptxas`` that ships with
Triton's NVIDIA backend then assembles the PTX for a real architecture and reports the registers
per thread, the spill stores/loads and the stack frame. A kernel that spills runs far below its
roofline, which is visible here, days before a GPU is at hand::

    from mtbi_kernels.compile_check import ptxas_report
    from mtbi_kernels.fused_linear_kl import launch_configs
    for cfg in launch_configs():
        print(cfg.name, ptxas_report(cfg, arch=90))

Each kernel module lists every configuration its launcher can pick (``launch_configs()``), so the
check covers exactly what runs. The interpreter must be off when compiling (``TRITON_INTERPRET``
set to 1 replaces the JIT), so :func:`ptxas_report` compiles in a fresh subprocess.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

# Shared memory a block may use (opt-in maximum), bytes: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class LaunchConfig:
    """One compilation of a kernel: its dotted import path, argument types, constexprs, warps."""

    name: str
    kernel: str  # "module:function", e.g. "mtbi_kernels.fused_linear_kl:_kl_rows_kernel"
    signature: dict  # argument name -> Triton type ("*fp32", "i32", "fp32", "constexpr")
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


def ptxas_path() -> str | None:
    """The ``ptxas`` bundled with Triton's NVIDIA backend (or on PATH), None when absent."""
    try:
        import triton
    except Exception:
        return None
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if os.path.exists(bundled):
        return bundled
    return shutil.which("ptxas")


def ptxas_report(cfg: LaunchConfig, arch: int) -> dict:
    """Registers, spills and shared memory of ``cfg`` compiled for ``sm_<arch>`` (``sm_90a`` for
    90): ``{"registers", "spill_stores", "spill_loads", "stack", "shared"}`` (bytes where sizes)."""
    return ptxas_reports([cfg], arch)[0]


def ptxas_reports(configs: list[LaunchConfig], arch: int) -> list[dict]:
    """:func:`ptxas_report` of several configurations, compiled in one subprocess."""
    payload = json.dumps(dict(arch=arch, configs=[
        dict(name=c.name, kernel=c.kernel, signature=c.signature, constexprs=c.constexprs,
             num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], input=payload,
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling for sm_{arch} failed:\n{proc.stderr[-4000:]}")
    reports = []
    for line in proc.stdout.strip().splitlines()[-len(configs):]:
        out = json.loads(line)
        report = parse_ptxas(out["ptxas"])
        report["shared"] = out["shared"]
        reports.append(report)
    return reports


def parse_ptxas(text: str) -> dict:
    """The numbers of one function in ``ptxas -v`` output."""
    def grab(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    if "Used" not in text:
        raise ValueError(f"no register report in ptxas output:\n{text}")
    return dict(registers=grab(r"Used (\d+) registers"),
                spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"),
                stack=grab(r"(\d+) bytes stack frame"))


_COMPILE_SCRIPT = r"""
import importlib, json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mtbi_kernels.compile_check import ptxas_path

job = json.loads(sys.stdin.read())
arch = job["arch"]
gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
for a in job["configs"]:
    module, name = a["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    sig = dict(a["signature"])
    for k in a["constexprs"]:
        sig[k] = "constexpr"
    k = triton.compile(ASTSource(fn, sig, a["constexprs"]), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=a["num_warps"], num_stages=a["num_stages"]))
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        r = subprocess.run([ptxas_path(), "-v", "--gpu-name", gpu, ptx, "-o",
                            os.path.join(d, "k.o")], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"ptxas failed on {a['name']}:\n{r.stderr}")
    print(json.dumps(dict(ptxas=r.stdout + r.stderr, shared=k.metadata.shared)), flush=True)
"""
