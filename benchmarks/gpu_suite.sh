#!/usr/bin/env bash
# The CUDA checks of mtbi-fast in one go, sized for about 8 minutes on one H100 (warm-up included):
#
#   bash benchmarks/gpu_suite.sh OUTDIR
#
# Stages (each under `timeout`, the suite going on past a failing one; every stage's limit is
# also capped by what is left of SUITE_BUDGET_S, default 540 s). Limits sized from real runs on
# 2026-11-26 (seconds taken in brackets: NVIDIA H200 over two calls / NVIDIA H100 in one call of
# 422 s; python's first imports on a fresh machine took over 15 s there, hence env's 45 s):
#   env           nvidia-smi, the card, python / torch / CUDA / triton / transformers -> env.txt  45 s [13 / >15]
#   setup         benchmarks/gpu_setup.sh: wheels from .gpu/wheels when deepspeed is missing,
#                 the mtbi_kernels link; PYTHONPATH=/tmp/site:$PWD for the stages after it      30 s [21 / 27]
#   bench_loss    benchmarks/bench_loss.py -k cuda: 4 shapes x 4 backends + Liger's chunked loss
#                 at N=8192 (torch.compile'd once per shape), 10 rounds (5 above N=8192); the
#                 tables are rewritten after every case, so a time-out keeps what finished     120 s [79 / 66]
#   tests         python -m pytest tests -m cuda (the tests marked @pytest.mark.cuda), real
#                 Triton kernels (TRITON_INTERPRET=0)                                            60 s [38 / 33]
#   train_steps   benchmarks/bench_train.py -k "cuda and step_case": issue 24's cases A and B
#                 (7 processes: Qwen2.5-1.5B and -7B shapes built on the GPU, replicated against
#                 ZeRO-3, fused ops, activation checkpointing, eager; MFU, GPU-busy share;
#                 the limit is an estimate: no GPU has run them yet)                            270 s [-]
#   overhead      benchmarks/bench_train.py -k "overhead and tiny": the trainer's step before
#                 (BEFORE_REF) and after, host scalar reads and operator calls per step          40 s [-]
#   optional, when the budget has room (measured twice already; not run is not a failure):
#   train_zero3   benchmarks/bench_train.py -k "cuda and zero3": 4 cases in fresh processes,
#                 27-46 s each, most of it DeepSpeed's start and building the random models    210 s [163 / 184]
#   bench_packing benchmarks/bench_packing.py (it runs on the GPU when there is one)             60 s [42 / 38]
#   train_data_wait  benchmarks/bench_train.py -k "cuda and data_wait": the trainer, 30 steps    75 s [50 / 52]
#   summary       OUTDIR/summary.md                                                              10 s
# Each pytest stage writes OUTDIR/<stage>.xml (JUnit) and, for benchmarks, OUTDIR/<stage>.json
# (pytest-benchmark); the result tables the benchmarks write (benchmarks/results/*_cuda.{md,json})
# are copied to OUTDIR/results/. OUTDIR/stages.tsv: each stage's exit status, seconds and status;
# OUTDIR/<stage>.log: its output. Exit status: non-zero when a stage failed or timed out ("no
# tests selected", pytest's 5, counts as passed: a selection with no CUDA cases yet).
#
# Needs beyond torch, triton, transformers, pytest and pytest-benchmark: deepspeed and its
# dependencies hjson, pydantic, pydantic-core, annotated-types, typing-inspection (ZeRO-3 cases);
# liger-kernel (the loss benchmark's peer); soundfile + cffi + pycparser (reading the demo corpus);
# jiwer + rapidfuzz (evaluation tests). On a bare CUDA machine (Python 3.12, nothing to download):
#   here:   bash benchmarks/gpu_setup.sh --stage /work/shared/gpu-wheels   # -> .gpu/wheels
#           then run this script on the GPU machine with .gpu carried along;
#   there:  the setup stage runs
#           python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl
#           export PYTHONPATH=/tmp/site:$PWD
#           (never over the machine's torch) and links /tmp/site/mtbi_kernels -> kernels/mtbi_kernels/.
# Without CUDA (a CPU machine) every stage still runs: the CUDA selections skip or select
# nothing in seconds, so the script's own logic can be checked anywhere.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
out=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}
mkdir -p "$out/results" || exit 2
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
site=${GPU_SITE:-/tmp/site}
budget=${SUITE_BUDGET_S:-540}
t_start=$(date +%s)
marker="$out/.suite-start"
touch "$marker"
printf 'stage\trc\tseconds\tstatus\n' > "$out/stages.tsv"
failed=0
# HF_HUB_OFFLINE: nothing is downloaded there; a stray hub call must fail at once, not hang
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# stage NAME LIMIT_S COMMAND...: run COMMAND under a time limit; output to OUTDIR/NAME.log.
# optional NAME LIMIT_S COMMAND...: the same, only when the whole limit still fits the budget.
optional() {
    local left=$((t_start + budget - $(date +%s)))
    if (($2 > left)); then
        printf '%s\t-\t0\tnot run (optional): %s s left, needs %s\n' "$1" "$left" "$2" >> "$out/stages.tsv"
        echo "== $1: not run (optional; $left s left)"
        return
    fi
    stage "$@"
}

stage() {
    local name=$1 limit=$2 left rc status t0 ms secs
    shift 2
    left=$((t_start + budget - $(date +%s)))
    [[ $name == summary ]] && left=$limit  # always written, whatever the time
    if ((left < 5)); then
        printf '%s\t-\t0\tnot run: suite out of time\n' "$name" >> "$out/stages.tsv"
        echo "== $name: not run (suite out of time)"
        failed=1
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit} s): $(printf "%q " "$@")"
    t0=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    ms=$((($(date +%s%N) - t0) / 1000000))
    secs=$(printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)))
    case $rc in
        0) status=passed ;;
        5) status="passed (no tests selected)" ;;
        124 | 137) status="TIMEOUT after ${limit} s"; failed=1 ;;
        *) status=FAILED; failed=1 ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$status" >> "$out/stages.tsv"
    echo "   $status (rc $rc, $secs s); last lines of $name.log:"
    tail -n 4 "$out/$name.log" | cut -c1-200 | sed 's/^/   | /'
    copy_results
}

# the result tables the benchmarks wrote during this suite -> OUTDIR/results
copy_results() {
    find benchmarks/results -maxdepth 1 -name '*_cuda.*' -newer "$marker" -exec cp {} "$out/results/" \;
}

# shellcheck disable=SC2317  # run through bash -c (export -f)
env_report() {
    {
        echo "date: $(date -u +%FT%TZ)  host: $(hostname)"
        if command -v nvidia-smi > /dev/null; then
            nvidia-smi
            nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
        else
            echo "nvidia-smi: not found"
        fi
        df -h /dev/shm  # DataLoader workers pass batches through it
        "$py" - << 'EOF'
import platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"card: {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.1f} GiB, "
          f"sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, bf16 {torch.cuda.is_bf16_supported()}")
else:
    print("card: none (torch.cuda.is_available() is False)")
for name in ("triton", "transformers", "torchaudio", "peft", "pytest", "pytest_benchmark"):
    try:
        m = __import__(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "not importable:", exc)
EOF
    } > "$out/env.txt" 2>&1
    cat "$out/env.txt"
}

# OUTDIR/summary.md: the card, the stages, the test outcomes (JUnit), the result tables
# shellcheck disable=SC2317  # run through bash -c (export -f)
summarize() {
    "$py" - "$out" << 'EOF'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
lines = ["# mtbi-fast GPU suite", ""]
env = (out / "env.txt").read_text().splitlines() if (out / "env.txt").exists() else []
lines += [f"- {x}" for x in env
          if x.startswith(("card:", "torch ", "triton ", "transformers ", "torchaudio ", "import "))]
lines += ["", "## Stages", "", "| stage | rc | seconds | status |", "|---|---:|---:|---|"]
rows = [r.split("\t") for r in (out / "stages.tsv").read_text().splitlines()[1:] if r.strip()]
lines += [f"| {' | '.join(r)} |" for r in rows]
lines += ["", "## Tests and benchmark cases (JUnit)", ""]
for xml in sorted(out.glob("*.xml")):
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as exc:
        lines.append(f"- {xml.stem}: unreadable JUnit file ({exc})")
        continue
    cases = list(root.iter("testcase"))
    outcome = {"failed": [], "skipped": []}
    for c in cases:
        for tag, key in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
            e = c.find(tag)
            if e is not None:
                msg = (e.get("message") or "").splitlines()[0][:160] if e.get("message") else ""
                outcome[key].append(f"{c.get('name')}: {msg}")
    n_pass = len(cases) - len(outcome["failed"]) - len(outcome["skipped"])
    lines.append(f"- **{xml.stem}**: {n_pass} passed, {len(outcome['failed'])} failed, "
                 f"{len(outcome['skipped'])} skipped")
    lines += [f"  - FAILED {x}" for x in outcome["failed"][:20]]
    for reason in sorted({x.split(": ", 1)[-1] for x in outcome["skipped"]})[:8]:
        lines.append(f"  - skipped: {reason}")
for md in sorted((out / "results").glob("*.md")):
    lines += ["", f"## {md.stem}", "", md.read_text().strip()]
(out / "summary.md").write_text("\n".join(lines) + "\n")
EOF
}

has_cuda=$("$py" -c 'import torch; print(int(torch.cuda.is_available()))' 2> /dev/null || echo 0)
export -f env_report summarize
export out py
stage env 45 bash -c env_report
stage setup 30 bash benchmarks/gpu_setup.sh "$site"
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
grep '^import ' "$out/setup.log" >> "$out/env.txt" 2> /dev/null

pytest_args=(-q -rs -p no:cacheprovider)
# the loss benchmark first: it is the headline, and a stage that hangs later cannot eat its time
stage bench_loss 120 "$py" -m pytest benchmarks/bench_loss.py -k cuda -v --durations=0 "${pytest_args[@]}" \
    --junitxml="$out/bench_loss.xml" --benchmark-json="$out/bench_loss.json"
# --continue-on-collection-errors: a test file importing a CPU-side package the GPU machine lacks
# (torchaudio, pocketsphinx) must not stop the CUDA tests of the other files
stage tests 60 env TRITON_INTERPRET=0 "$py" -m pytest tests -m cuda "${pytest_args[@]}" \
    --continue-on-collection-errors --junitxml="$out/tests.xml"
stage train_steps 270 "$py" -m pytest benchmarks/bench_train.py -k "cuda and step_case" "${pytest_args[@]}" \
    --junitxml="$out/train_steps.xml" --benchmark-json="$out/train_steps.json"
stage overhead 40 "$py" -m pytest benchmarks/bench_train.py -k "overhead and tiny" "${pytest_args[@]}" \
    --junitxml="$out/overhead.xml" --benchmark-json="$out/overhead.json"
optional train_zero3 210 "$py" -m pytest benchmarks/bench_train.py -k "cuda and zero3" "${pytest_args[@]}" \
    --junitxml="$out/train_zero3.xml" --benchmark-json="$out/train_zero3.json"
# bench_packing runs on the GPU whenever there is one (its cases are not named by device)
if [[ $has_cuda == 1 ]]; then packing_k=(); else packing_k=(-k cuda); fi
optional bench_packing 60 "$py" -m pytest benchmarks/bench_packing.py "${packing_k[@]}" "${pytest_args[@]}" \
    --junitxml="$out/bench_packing.xml" --benchmark-json="$out/bench_packing.json"
optional train_data_wait 75 "$py" -m pytest benchmarks/bench_train.py -k "cuda and data_wait" \
    "${pytest_args[@]}" --junitxml="$out/train_data_wait.xml" --benchmark-json="$out/train_data_wait.json"
stage summary 10 bash -c summarize

echo
cat "$out/summary.md" 2> /dev/null || cat "$out/stages.tsv"
echo "suite: $(($(date +%s) - t_start)) s, $( ((failed)) && echo 'SOME STAGES FAILED' || echo 'all stages passed'); files in $out"
exit $failed
