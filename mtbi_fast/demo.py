"""``mtbi-fast demo [--tiny] [--baselines] [--output DIR]``: the whole method end to end on the
bundled corpus.

1. fetch the offline real models (SmolLM2-135M-Instruct, Whisper tiny.en, MiniLM), unless --tiny;
2. the teacher's behaviors for the demo training utterances (cached in the output folder);
3. training with the MTBI trainer on a complete run config, ``configs/demo_train.yaml``
   (--tiny: ``configs/demo_tiny_train.yaml``, the random tiny models), with only its paths set
   to the output folder (and, with --steps, the step counts);
4. evaluation of the trained and the untrained model on held-out utterances (three splits);
5. a report folder: report.md (tables), loss_curve.png, eval.png, eval.json, the trained model.

With ``--baselines`` the same run also trains and evaluates two baselines in the same table: a
single task (continuation only, BLSP-style behavior alignment) and no interleaving (ratio 0).

``--corpus large`` runs it on ``mtbi-fast corpus build``'s corpus (2,000 training and 200 test
utterances from two synthesizers, speakers split; built into the cache first, about 3 minutes)
instead of the bundled 200 + 40. The default stays the bundled corpus: with the larger one the
teacher answers ten times as many prompts and the evaluation covers five times as many
utterances, well over the 10 minutes the default demo takes on 2 cores.

Every stage resumes from what the output folder already holds.

The demo reads ``configs/`` and the corpus ``data/demo/`` of a source checkout (they are not part
of the installed package): ``$MTBI_FAST_ROOT`` when set, else the checkout this package runs from,
else the current folder; otherwise an error says what is missing and how to get it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

from mtbi_fast.behaviors import BehaviorConfig, generate_behaviors
from mtbi_fast.config import load_config
from mtbi_fast.data import read_manifest, write_manifest
from mtbi_fast.evaluate import Embedder, evaluate, markdown
from mtbi_fast.fetch import fetch
from mtbi_fast.hub import load_teacher
from mtbi_fast.model import ModelConfig, SpeechLLM
from mtbi_fast.tasks import TaskLibrary
from mtbi_fast.trainer import Trainer

ROOT_ENV = "MTBI_FAST_ROOT"
# what the demo needs from a source checkout, relative to it
CONFIGS = {"full": "configs/demo_train.yaml", "tiny": "configs/demo_tiny_train.yaml"}
NEEDED = ("configs/tasks.yaml", "configs/ds_zero2.json", *CONFIGS.values(),
          "configs/demo.yaml", "configs/tiny_train.yaml",  # the run configs' defaults: files
          "data/demo/train.jsonl", "data/demo/test.jsonl", "data/demo/audio")
# the demo's own settings (the training run's are in its config): behaviors per utterance and
# their length, utterances trained on and evaluated, answer length in the evaluation
SETTINGS = {
    "full": dict(per_utterance=1, max_new_tokens=32, train_utts=200, eval_utts=40, eval_tokens=32),
    "tiny": dict(per_utterance=1, max_new_tokens=12, train_utts=40, eval_utts=4, eval_tokens=8),
}
# --corpus large: `mtbi-fast corpus build`'s 2,000 training and 200 test utterances (the tiny models
# take 40 and 4 of them, as from the bundled corpus)
LARGE = {"full": dict(train_utts=2000, eval_utts=200), "tiny": {}}
CORPORA = ("demo", "large")
BASELINES = {
    # BLSP-style behavior alignment: one task (continuation), interleaving as in MTBI
    "continue-only": dict(behaviors="behaviors-continue", overrides=[]),
    # MTBI's tasks without interleaving: pure speech from the first step
    "no-interleave": dict(behaviors="behaviors",
                          overrides=["interleave.schedule=constant", "interleave.start=0.0"]),
}


def run_demo(output: str | Path, tiny: bool = False, baselines: bool = False,
             steps: int | None = None, overwrite: bool = False, corpus: str = "demo") -> Path:
    """Run the demo into ``output`` (see the module docstring); returns the output folder.
    ``corpus``: "demo" (the bundled one) or "large" (``mtbi-fast corpus build``'s, built first
    when it is not in the cache)."""
    if steps is not None and steps < 4:
        raise ValueError(f"--steps must be >= 4, got {steps}")
    if corpus not in CORPORA:
        raise ValueError(f"--corpus must be one of {CORPORA}, got {corpus!r}")
    root = find_checkout()
    kind = "tiny" if tiny else "full"
    s = dict(SETTINGS[kind], **(LARGE[kind] if corpus == "large" else {}))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    times = {}

    print(f"[1/5] models ({'random tiny' if tiny else 'SmolLM2-135M-Instruct + Whisper tiny.en'})")
    embedder_dir = fetch_models(tiny)
    times["models"] = time.time() - t0

    t = time.time()
    cfg = demo_run_config(root / CONFIGS[kind], out, steps)
    library = TaskLibrary.load(root / "configs" / "tasks.yaml")
    split = library.split()
    if corpus == "large":
        from mtbi_fast.corpus import build_corpus

        folder = build_corpus()
    else:
        folder = root / "data" / "demo"
    train_utts, test_utts = demo_corpus(folder, out, s["train_utts"], s["eval_utts"])
    print(f"[2/5] behaviors: the teacher answers {len(train_utts)} utterances")
    make_behaviors(cfg["model"], train_utts, test_utts, library, split, out, s, baselines)
    times["behaviors"] = time.time() - t

    t = time.time()
    print(f"[3/5] training {cfg['train']['steps']} steps")
    train_runs(root / CONFIGS[kind], out, steps, baselines, overwrite)
    times["training"] = time.time() - t

    t = time.time()
    print("[4/5] evaluation: trained vs untrained, three splits")
    result = evaluate_runs(out, test_utts, library, split, s["eval_tokens"], embedder_dir, baselines)
    times["evaluation"] = time.time() - t

    print("[5/5] report")
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    plot_losses(metrics, out / "loss_curve.png")
    times["total"] = time.time() - t0
    report = _report(metrics, result, times, tiny, corpus)
    (out / "report.md").write_text(report)
    print(report)
    return out


def find_checkout() -> Path:
    """The source checkout whose ``configs/`` and ``data/demo/`` the demo reads: ``$MTBI_FAST_ROOT``
    when set, else the one this package runs from (a clone, or an editable install of it), else
    the current folder. An error names what is missing and how to get it."""
    candidates = [Path(os.environ[ROOT_ENV]).expanduser()] if os.environ.get(ROOT_ENV) else []
    candidates += [Path(__file__).resolve().parents[1], Path.cwd()]
    missing = {}
    for root in candidates:
        lacks = [p for p in NEEDED if not (root / p).exists()]
        if not lacks:
            return root.resolve()
        missing.setdefault(str(root), lacks)
    looked = "; ".join(f"{root} lacks {', '.join(lacks[:3])}{', ...' if len(lacks) > 3 else ''}"
                       for root, lacks in missing.items())
    raise FileNotFoundError(
        f"mtbi-fast demo needs the run configs (configs/) and the bundled corpus (data/demo/) of an "
        f"mtbi-fast source checkout, which an installed package does not carry ({looked}). Run "
        f"the demo from a clone of the repository (or `pip install -e` one), or set {ROOT_ENV} to "
        "the clone's folder")


def fetch_models(tiny: bool) -> Path:
    """The offline real models (unless ``tiny``) and the sentence embedder; returns the
    embedder's folder."""
    if not tiny:
        for name in ("smollm2-135m-instruct", "whisper-tiny.en"):
            fetch(name)
    return fetch("minilm")


def demo_run_config(config: Path, out: Path, steps: int | None = None,
                    behaviors: str = "behaviors", run: str = "run", extra: list[str] = ()) -> dict:
    """The demo's training config: ``config`` as it is, with its paths in ``out`` (manifests,
    ``behaviors`` and the run folder ``run``) and, with ``steps``, the step counts; ``extra``:
    a baseline's own overrides."""
    return load_config(config, [*demo_paths(out, behaviors, run), *steps_overrides(steps), *extra])


def demo_paths(out: Path, behaviors: str = "behaviors", run: str = "run") -> list[str]:
    """Overrides of the run config's paths: the demo's files in ``out``."""
    return [f"data.train_manifest={out / 'train.jsonl'}", f"data.behaviors={out / behaviors}",
            f"data.eval_manifest={out / 'test.jsonl'}",
            f"data.eval_behaviors={out / 'behaviors-eval'}", f"output_dir={out / run}"]


def steps_overrides(steps: int | None) -> list[str]:
    """``--steps N``: N training steps with the interleaving schedule over them, four held-out
    evaluations and a checkpoint halfway (the demo configs' values for their own step count)."""
    if steps is None:
        return []
    return [f"train.steps={steps}", f"interleave.steps={steps}",
            f"train.eval_every={math.ceil(steps / 4)}", f"train.save_every={steps // 2}"]


def demo_corpus(corpus: Path, out: Path, n_train: int, n_test: int):
    """The first ``n_train`` training and ``n_test`` held-out utterances of the bundled corpus,
    written as the run's manifests in ``out``."""
    train_utts = read_manifest(corpus / "train.jsonl", require_words=True)[:n_train]
    test_utts = read_manifest(corpus / "test.jsonl", require_words=True)[:n_test]
    write_manifest(out / "train.jsonl", train_utts)
    write_manifest(out / "test.jsonl", test_utts)
    return train_utts, test_utts


def make_behaviors(model: dict, train_utts, test_utts, library, split, out: Path, s: dict,
                   baselines: bool) -> None:
    """The teacher's behaviors (with its hidden states, read by training instead of running the
    teacher again) for the training utterances, and for the held-out ones; with ``baselines``,
    continuation prompts for every training utterance."""
    model_cfg = ModelConfig.from_dict(model)
    llm, tok = load_teacher(model_cfg.llm, seed=model_cfg.init_seed, dtype=model_cfg.dtype)
    bc = BehaviorConfig(per_utterance=s["per_utterance"], max_new_tokens=s["max_new_tokens"],
                        batch_size=16, cache_hidden=True)
    teacher = dict(model_config=model_cfg.to_dict())  # recorded: training checks its LLM against it
    generate_behaviors(train_utts, library, llm, tok, out / "behaviors", bc, split=split, **teacher)
    generate_behaviors(test_utts, library, llm, tok, out / "behaviors-eval",
                       dataclasses.replace(bc, cache_hidden=False), split=split, **teacher)
    if baselines:
        cont = dataclasses.replace(bc, per_utterance=1, tasks=("continue",))
        generate_behaviors(train_utts, library, llm, tok, out / "behaviors-continue", cont,
                           split=split, **teacher)


def train_runs(config: Path, out: Path, steps: int | None, baselines: bool, overwrite: bool) -> None:
    """MTBI training into ``out/run`` (evaluated at step 0 too) and, with ``baselines``, each
    baseline into ``out/run-<name>``; ``overwrite``: a run with other settings (e.g. --steps) is
    moved aside instead of refused."""
    Trainer(demo_run_config(config, out, steps)).train(overwrite=overwrite)
    if baselines:
        for name, b in BASELINES.items():
            print(f"      baseline {name}")
            cfg = demo_run_config(config, out, steps, behaviors=b["behaviors"], run=f"run-{name}",
                                  extra=b["overrides"])
            Trainer(cfg).train(overwrite=overwrite)


def evaluate_runs(out: Path, test_utts, library, split, max_new_tokens: int, embedder_dir: Path,
                  baselines: bool) -> dict:
    """The trained model, the baselines and the untrained model against the teacher on the
    held-out utterances (``out/eval``)."""
    trained = SpeechLLM.from_pretrained(out / "run" / "final")
    models = {"mtbi": trained}
    if baselines:
        for name in BASELINES:
            models[name] = SpeechLLM.from_pretrained(out / f"run-{name}" / "final")
    models["untrained"] = SpeechLLM.from_config(trained.config)
    return evaluate(models, test_utts, library, split, out / "eval", per_split=1,
                    max_new_tokens=max_new_tokens, embedder=Embedder(embedder_dir), batch_size=16)


def plot_losses(metrics: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_kl" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["step"] for m in train], [m["kl"] for m in train], label="training imitation KL",
            alpha=0.7)
    ax.plot([m["step"] for m in evals], [m["eval_kl"] for m in evals], "o-",
            label="held-out imitation KL (speech only)")
    ax2 = ax.twinx()
    ax2.plot([m["step"] for m in train], [m["ratio"] for m in train], "--", color="gray",
             label="text ratio")
    ax2.set_ylabel("text ratio")
    ax2.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("KL (nats)")
    ax.legend(loc="upper right")
    ax.set_title("MTBI training on the demo corpus")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(metrics, result, times, tiny, corpus="demo") -> str:
    evals = [m for m in metrics if "eval_kl" in m]
    train = [m for m in metrics if "loss" in m]
    lines = [f"# MTBI demo ({'tiny random models' if tiny else 'Whisper tiny.en + SmolLM2-135M-Instruct'}"
             f"{', the larger corpus' if corpus == 'large' else ''})",
             "",
             f"Held-out imitation KL (speech only): {evals[0]['eval_kl']:.4f} before training -> "
             f"{evals[-1]['eval_kl']:.4f} after {train[-1]['step']} steps.",
             "",
             "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in times.items()]
    lines += ["", "## Agreement with the teacher on held-out utterances", "",
              markdown(result["summary"], result["deltas"], result["baseline"], per_task=False),
              "![loss curve](loss_curve.png)", "", "![generalization](eval/eval.png)", ""]
    return "\n".join(lines)
