"""Writes a benchmark's rows to benchmarks/results/<name>.json and a markdown table <name>.md.

Each row belongs to a ``case`` and a ``variant``; for every key in ``ratios`` the row also gets
``<key>_vs_<baseline>``: its value over the baseline variant's value in the same case (same run).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from mtbi_fast.io import atomic_write_text

RESULTS = Path(__file__).parent / "results"


def write(name: str, title: str, rows: list[dict], columns: list[tuple[str, str, str]],
          baseline: str, ratios: tuple[str, ...]) -> str:
    """``columns``: (key, header, format spec) in table order. Returns the markdown table."""
    base = {r["case"]: r for r in rows if r["variant"] == baseline}
    for r in rows:
        b = base.get(r["case"])
        for key in ratios:
            if b is not None and b.get(key) and r.get(key) is not None:
                r[f"{key}_vs_{baseline}"] = r[key] / b[key]
    meta = environment(rows[0].get("device", "cpu"))
    header = (f"{title}\n\n{meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
              f"{meta['threads']} threads. Ratios are to `{baseline}` in the same run.\n\n")
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|"]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else format(v, fmt) if fmt else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    table = header + "\n".join(lines) + "\n"
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(dict(meta=meta, rows=rows), indent=1))
    atomic_write_text(RESULTS / f"{name}.md", table)
    return table


def environment(device: str) -> dict:
    name = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    return dict(torch=torch.__version__, machine=platform.machine(), cpus=os.cpu_count(),
                threads=torch.get_num_threads(), device=device, device_name=name)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


