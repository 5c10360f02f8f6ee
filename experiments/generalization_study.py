"""MTBI against its baselines on the larger corpus (issue 17): does MTBI generalize to new prompt
wordings and to new tasks better than continuation-only behavior alignment and than training
without interleaving, by more than the noise?

    python experiments/generalization_study.py --output runs/study                 # the study
    python experiments/generalization_study.py --output runs/study-tiny --tiny    # tiny models, ~2 min

Arms, each trained once per seed (``--seeds``, default 0 1) on the same data, steps and settings:
``configs/demo_train.yaml`` (Whisper tiny.en + SmolLM2-135M-Instruct, the adapter trained) with the
study's paths, ``--steps`` and ``train.seed``:

- ``mtbi``: the method (every task; interleaving from ratio 0.8 to 0);
- ``continue-only``: one task, continuation (BLSP-style behavior alignment), interleaved as MTBI;
- ``no-interleave``: MTBI's tasks, speech only from the first step;
- ``mtbi-ce``: MTBI plus cross-entropy on the teacher's response (``model.loss.ce_weight=0.5``);
- ``mtbi-small``: MTBI on the first ``--small`` training utterances only, first seed only
  (memorization: its held-out KL curve is plotted with MTBI's, and the report gives MTBI minus
  MTBI-small prompt by prompt).

The corpus is ``mtbi-fast corpus build``'s (``--train``/``--test`` utterances; ``--tiny``: 40/8 of
the bundled demo corpus with the random tiny models). The teacher answers one prompt per training
utterance (``behaviors``, with its cached states) and continues every one (``behaviors-continue``):
both arms see the same number of examples. Every test utterance is evaluated once per split (seen
task and wording, new wording, new task) by every model: ROUGE-L, chrF, similarity, imitation KL,
the KL with another clip's speech, repeat WER; MTBI's paired differences from each baseline, seed
by seed, with 95% bootstrap intervals over prompts.

The goal, stated so that it can fail: MTBI beats both continue-only and no-interleave on new
wordings and on new tasks, by ROUGE-L or chrF, with the 95% interval of the paired difference
excluding 0, in every seed. ``report.md`` says whether it held (or that it was not tested, when
``--arms`` leaves out both continue-only and no-interleave).

Output in ``--output``: report.md, study.json, eval_kl.png (held-out KL against steps, every run),
differences.png (with a baseline arm); the runs (``run-<arm>-s<seed>``), the behaviors and
``eval/``. Every stage resumes from what the folder holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtbi_fast.behaviors import BehaviorConfig, generate_behaviors  # noqa: E402
from mtbi_fast.data import read_manifest, write_manifest  # noqa: E402
from mtbi_fast.demo import CONFIGS, demo_run_config, fetch_models  # noqa: E402
from mtbi_fast.evaluate import (SPLIT_NAMES, Embedder, evaluate, markdown, paired_deltas,  # noqa: E402
                                repeat_breakdown, repeat_markdown)
from mtbi_fast.hub import load_teacher  # noqa: E402
from mtbi_fast.model import ModelConfig, SpeechLLM  # noqa: E402
from mtbi_fast.tasks import TaskLibrary  # noqa: E402
from mtbi_fast.trainer import Trainer  # noqa: E402

ARMS = {
    "mtbi": dict(behaviors="behaviors", overrides=[]),
    "continue-only": dict(behaviors="behaviors-continue", overrides=[]),
    "no-interleave": dict(behaviors="behaviors", overrides=["interleave.schedule=constant",
                                                            "interleave.start=0.0"]),
    "mtbi-ce": dict(behaviors="behaviors", overrides=["model.loss.ce_weight=0.5"]),
    "mtbi-small": dict(behaviors="behaviors-small", overrides=[], manifest="train-small.jsonl"),
}
BASELINES = ("continue-only", "no-interleave", "mtbi-ce")
GOAL_BASELINES = ("continue-only", "no-interleave")
GOAL_SPLITS = ("heldout_wording", "heldout_task")
GOAL_METRICS = ("rouge_l", "chrf")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--train", type=int, default=2000, help="training utterances of the corpus")
    ap.add_argument("--test", type=int, default=200, help="test utterances of the corpus")
    ap.add_argument("--small", type=int, default=200, help="training utterances of mtbi-small")
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--tiny", action="store_true", help="random tiny models on the demo corpus")
    args = ap.parse_args(argv)
    run_study(args)
    return 0


def run_study(args) -> dict:
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    t0, times = time.time(), {}
    kind = "tiny" if args.tiny else "full"
    config = ROOT / CONFIGS[kind]
    train, test = corpus(args, out)
    print(f"[1/4] corpus: {len(train)} training, {len(test)} test utterances")
    embedder = fetch_models(args.tiny)

    t = time.time()
    print("[2/4] behaviors")
    behaviors(demo_run_config(config, out)["model"], train, test, out, args)
    times["behaviors"] = time.time() - t

    t = time.time()
    runs, trained = {}, False
    for seed in args.seeds:
        for arm in args.arms:
            if arm == "mtbi-small" and seed != args.seeds[0]:
                continue  # for the memorization curve: the first seed only
            name = f"{arm}-s{seed}"
            runs[name] = out / f"run-{name}"
            if complete(runs[name], args.steps):
                continue
            trained = True
            print(f"[3/4] training {name}: {args.steps} steps")
            Trainer(run_config(config, out, arm, seed, args.steps)).train()
    times["training"] = time.time() - t

    t = time.time()
    print(f"[4/4] evaluation: {len(runs) + 1} models on {len(test)} test utterances")
    result, evaluated = evaluation(runs, test, out, embedder, args.tiny, reuse=not trained)
    times["evaluation"] = time.time() - t
    times["total"] = time.time() - t0
    times = carried_times(out / "study.json", times, trained=trained, evaluated=evaluated)

    study = summarize(result, runs, args, times)
    (out / "study.json").write_text(json.dumps(study, indent=1))
    plot_curves(runs, out / "eval_kl.png", args, n_train=len(train))
    if study["differences"]:  # nothing to draw without a baseline
        plot_differences(study, out / "differences.png")
    (out / "report.md").write_text(report(study, result, args, {u.id: u.text for u in test}))
    print((out / "report.md").read_text())
    return study


def corpus(args, out: Path):
    """The study's manifests in ``out``: train.jsonl, test.jsonl and train-small.jsonl."""
    if args.tiny:
        folder = ROOT / "data" / "demo"
        train = read_manifest(folder / "train.jsonl", require_words=True)[:min(args.train, 40)]
        test = read_manifest(folder / "test.jsonl", require_words=True)[:min(args.test, 8)]
    else:
        from mtbi_fast.corpus import build_corpus

        folder = build_corpus(args.train, args.test)
        train = read_manifest(folder / "train.jsonl", require_words=True)
        test = read_manifest(folder / "test.jsonl", require_words=True)
    write_manifest(out / "train.jsonl", train)
    write_manifest(out / "test.jsonl", test)
    write_manifest(out / "train-small.jsonl", train[:args.small])
    return train, test


def behaviors(model: dict, train, test, out: Path, args) -> None:
    """One prompt per training utterance (cached states), its continuation, the same for the
    small set (a subset of the same plan: the records are the full set's), and the held-out ones."""
    model_cfg = ModelConfig.from_dict(model)
    llm, tok = load_teacher(model_cfg.llm, seed=model_cfg.init_seed, dtype=model_cfg.dtype)
    library = TaskLibrary.load(ROOT / "configs" / "tasks.yaml")
    split = library.split()
    bc = BehaviorConfig(per_utterance=1, max_new_tokens=12 if args.tiny else 32, batch_size=16,
                        cache_hidden=True)
    teacher = dict(model_config=model_cfg.to_dict(), split=split)
    generate_behaviors(train, library, llm, tok, out / "behaviors", bc, **teacher)
    generate_behaviors(train[:args.small], library, llm, tok, out / "behaviors-small", bc, **teacher)
    generate_behaviors(train, library, llm, tok, out / "behaviors-continue",
                       dataclasses.replace(bc, tasks=("continue",)), **teacher)
    generate_behaviors(test, library, llm, tok, out / "behaviors-eval",
                       dataclasses.replace(bc, cache_hidden=False), **teacher)


def run_config(config: Path, out: Path, arm: str, seed: int, steps: int) -> dict:
    """``configs/demo_train.yaml`` with the arm's data and overrides, ``steps`` steps (the
    interleaving schedule over them, 10 held-out evaluations of 48 examples, 3 checkpoints) and
    ``seed`` (data order, interleaving, adapter initialization)."""
    a = ARMS[arm]
    extra = [*a["overrides"], f"train.seed={seed}", f"train.steps={steps}", f"interleave.steps={steps}",
             f"train.eval_every={max(1, math.ceil(steps / 10))}", "train.eval_examples=48",
             f"train.save_every={max(1, math.ceil(steps / 3))}"]
    if "manifest" in a:
        extra.append(f"data.train_manifest={out / a['manifest']}")
    return demo_run_config(config, out, None, behaviors=a["behaviors"], run=f"run-{arm}-s{seed}", extra=extra)


def complete(run: Path, steps: int) -> bool:
    """Whether ``run`` trained all ``steps`` steps and exported its model (then it is not rerun)."""
    if not (run / "final").is_dir() or not (run / "metrics.jsonl").is_file():
        return False
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return any(r.get("step") == steps and "loss" in r for r in rows)


def evaluation(runs: dict, test, out: Path, embedder: Path, tiny: bool, reuse: bool = True):
    """Every trained model and the untrained one on every test utterance (``out/eval``; reused
    when it has every model and ``reuse``: not after this run trained a model again). Returns the
    result and whether it was computed now."""
    saved = out / "eval" / "eval.json"
    names = [*runs, "untrained"]
    if saved.is_file():
        result = json.loads(saved.read_text())
        if reuse and set(names) <= set(result["summary"]):
            return result, False
    models = {name: SpeechLLM.from_pretrained(folder / "final") for name, folder in runs.items()}
    models["untrained"] = SpeechLLM.from_config(next(iter(models.values())).config)
    library = TaskLibrary.load(ROOT / "configs" / "tasks.yaml")
    split = library.split()
    return evaluate(models, test, library, split, out / "eval", per_split=1,
                    max_new_tokens=12 if tiny else 32, embedder=Embedder(embedder), batch_size=16), True


def carried_times(saved: Path, times: dict, *, trained: bool, evaluated: bool) -> dict:
    """``times`` with the training and evaluation seconds of the earlier ``saved`` study.json
    where this rerun did no training (every run complete) or no evaluation (reused), so a rerun
    that only rewrites the report keeps what the work took; the total is recomputed."""
    if not saved.is_file():
        return times
    before = json.loads(saved.read_text()).get("seconds", {})
    times = dict(times)
    for stage, did in (("training", trained), ("evaluation", evaluated)):
        if not did and stage in before:
            times[stage] = before[stage]
    times["total"] = max(times["total"], sum(v for k, v in times.items() if k != "total"))
    return times


def summarize(result: dict, runs: dict, args, times: dict) -> dict:
    """MTBI's paired differences from each baseline per seed, the goal's verdict, MTBI minus
    MTBI-small (first seed) and the held-out KL curves."""
    diffs = {}
    for seed in args.seeds:
        mtbi = f"mtbi-s{seed}"
        for base in BASELINES:
            if f"{base}-s{seed}" in runs and mtbi in runs:
                d = paired_deltas(result["rows"], f"{base}-s{seed}", seed=seed)
                diffs.setdefault(str(seed), {})[base] = d.get(mtbi, {})
    goal = {}
    for seed, by_base in diffs.items():
        for base in GOAL_BASELINES:
            for sp in GOAL_SPLITS:
                cell = by_base.get(base, {}).get(sp, {})
                goal[f"s{seed} vs {base}, {SPLIT_NAMES[sp]}"] = any(
                    cell.get(m, {}).get("lo", -1) > 0 for m in GOAL_METRICS)
    curves = {}
    for name, folder in runs.items():
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [(r["step"], r["eval_kl"]) for r in rows if "eval_kl" in r]
    memorization = {}  # MTBI on every training utterance minus MTBI on --small of them (first seed)
    first = args.seeds[0]
    if f"mtbi-s{first}" in runs and f"mtbi-small-s{first}" in runs:
        d = paired_deltas(result["rows"], f"mtbi-small-s{first}", seed=first)
        memorization = d.get(f"mtbi-s{first}", {})
    return {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "seconds": {k: round(v, 1) for k, v in times.items()}, "differences": diffs,
            "goal": goal, "goal_tested": bool(goal), "goal_met": bool(goal) and all(goal.values()),
            "memorization": memorization,
            "eval_kl": curves}


def verdict(study: dict) -> str:
    """The goal's verdict: "met", "not met", or "not tested" (no continue-only or no-interleave
    run to compare with)."""
    if not study["goal"]:
        return "not tested (no continue-only or no-interleave run in this study)"
    return "met" if study["goal_met"] else "not met"


def delta_cells(cells: dict) -> str:
    """ROUGE-L, chrF, similarity and imitation KL differences as table cells, then n."""
    fmt = [(f"{c['mean']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]" if (c := cells.get(m)) else "-")
           for m in ("rouge_l", "chrf", "similarity", "kl")]
    n = next(iter(cells.values()))["n"] if cells else 0
    return " | ".join(fmt) + f" | {n} |"


def report(study: dict, result: dict, args, transcripts: dict[str, str]) -> str:
    """report.md; ``transcripts`` (test utterance id -> transcript) for the repeat WER's parts."""
    lines = [f"# MTBI against its baselines ({'tiny random models, demo corpus' if args.tiny else 'Whisper tiny.en + SmolLM2-135M-Instruct'})",
             "", f"`python experiments/generalization_study.py {' '.join(sys.argv[1:])}`", "",
             f"{args.steps} steps, seeds {args.seeds}; seconds: " +
             ", ".join(f"{k} {v:.0f}" for k, v in study["seconds"].items()), "",
             "## The goal", "",
             "MTBI beats continue-only and no-interleave on new wordings and on new tasks, by ROUGE-L or "
             "chrF, the 95% interval of the paired difference excluding 0, in every seed: "
             f"**{verdict(study)}**.", ""]
    if study["goal"]:
        lines += ["| comparison | held |", "|---|---|"]
        lines += [f"| {k} | {'yes' if v else 'no'} |" for k, v in study["goal"].items()]
        lines += [""]
    if study["differences"]:
        lines += ["## MTBI minus each baseline, prompt by prompt (mean [95% bootstrap CI])", "",
                  "| seed | baseline | split | ROUGE-L | chrF | similarity | imitation KL | n |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for seed, by_base in study["differences"].items():
            for base, by_split in by_base.items():
                for sp, cells in by_split.items():
                    lines.append(f"| {seed} | {base} | {SPLIT_NAMES[sp]} | " + delta_cells(cells))
        lines += ["", "(imitation KL: lower is better, so a negative difference favours MTBI.)", ""]
    if study["memorization"]:
        lines += [f"## MTBI minus MTBI-small (on {args.small} of the training utterances), seed "
                  f"{args.seeds[0]}, same steps: the memorization check", "",
                  "| split | ROUGE-L | chrF | similarity | imitation KL | n |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {SPLIT_NAMES[sp]} | " + delta_cells(cells) for sp, cells in study["memorization"].items()]
        lines += [""]
    lines += ["## Every model against the teacher", "",
              markdown(result["summary"], result["deltas"], result["baseline"], per_task=False),
              repeat_markdown(repeat_breakdown(result["rows"], transcripts)),
              "![held-out KL](eval_kl.png)", ""]
    if study["differences"]:
        lines += ["![differences](differences.png)", ""]
    return "\n".join(lines)


def plot_curves(runs: dict, path: Path, args, n_train: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, folder in runs.items():
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        pts = [(r["step"], r["eval_kl"]) for r in rows if "eval_kl" in r]
        arm = name.rsplit("-s", 1)[0]
        n = min(args.small, n_train) if arm == "mtbi-small" else n_train
        label = f"{name} ({n:,} training utterances)"
        ax.plot(*zip(*pts), "o-" if arm in ("mtbi", "mtbi-small") else ".--", label=label, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out imitation KL (nats, speech only)")
    ax.legend(fontsize=8)
    ax.set_title("Held-out KL during training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_differences(study: dict, path: Path) -> None:
    """MTBI minus each baseline, ROUGE-L and chrF with their 95% intervals, per split and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, metric in zip(axes, GOAL_METRICS):
        labels, means, los, his = [], [], [], []
        for seed, by_base in study["differences"].items():
            for base, by_split in by_base.items():
                for sp, cells in by_split.items():
                    if metric in cells:
                        c = cells[metric]
                        labels.append(f"s{seed} {base}\n{SPLIT_NAMES[sp].replace('seen task, ', '')}")
                        means.append(c["mean"])
                        los.append(c["mean"] - c["lo"])
                        his.append(c["hi"] - c["mean"])
        ax.errorbar(range(len(means)), means, yerr=[los, his], fmt="o", capsize=3)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_title(f"MTBI minus baseline: {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
