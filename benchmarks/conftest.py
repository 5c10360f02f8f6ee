"""Collects benchmark rows and writes results/<bench>_<device>.json and .md (ratios to eager)."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).parent / "results"
_ROWS: list[dict] = []


@pytest.fixture
def loss_results():
    return _ROWS


def pytest_sessionfinish(session, exitstatus):
    if not _ROWS:
        return
    for device in sorted({r["device"] for r in _ROWS}):
        rows = [r for r in _ROWS if r["device"] == device]
        _add_ratios(rows)
        meta = dict(torch=torch.__version__, machine=platform.machine(), cpus=os.cpu_count(),
                    threads=torch.get_num_threads(), device=device,
                    device_name=rows[0].get("device_name") or _cpu_name())
        _atomic_write(RESULTS / f"loss_{device}.json", json.dumps(dict(meta=meta, rows=rows), indent=1))
        _atomic_write(RESULTS / f"loss_{device}.md", _table(meta, rows))
        print(f"\n{_table(meta, rows)}\nwritten to {RESULTS / f'loss_{device}.md'}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _add_ratios(rows):
    eager = {r["case"]: r for r in rows if r["backend"] == "eager"}
    for r in rows:
        base = eager.get(r["case"])
        if base:
            r["time_vs_eager"] = r["seconds"] / base["seconds"]
            r["memory_vs_eager"] = r["peak_extra_mib"] / base["peak_extra_mib"]
        if "matmul_roofline_tflops" in r:
            r["roofline_fraction"] = r["tflops_3gemm"] / r["matmul_roofline_tflops"]


def _table(meta, rows) -> str:
    lines = [
        f"Imitation loss forward+backward on {meta['device_name']} ({meta['device']}, torch "
        f"{meta['torch']}, {meta['threads']} threads). Ratios are to the eager backend in the same run.",
        "",
        "| case | backend | time (s) | time / eager | peak extra (MiB) | memory / eager | TFLOP/s (3 GEMMs) |"
        + (" roofline |" if meta["device"] == "cuda" else ""),
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if meta["device"] == "cuda" else ""),
    ]
    for r in rows:
        cells = [r["case"], r["backend"], f"{r['seconds']:.3f}", _fmt(r.get("time_vs_eager")),
                 f"{r['peak_extra_mib']:.0f}", _fmt(r.get("memory_vs_eager")),
                 f"{r['tflops_3gemm']:.2f}"]
        if meta["device"] == "cuda":
            cells.append(_fmt(r.get("roofline_fraction")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x):
    return "-" if x is None else f"{x:.2f}x"


def _atomic_write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
