"""``mtbi-fast demo [--tiny] [--baselines] [--output DIR]``: the whole method end to end on the
bundled corpus.

1. fetch the offline real models (SmolLM2-135M-Instruct, Whisper tiny.en, MiniLM), unless --tiny;
2. the teacher's behaviors for the demo training utterances (cached in the output folder);
3. training with the MTBI trainer (demo config; --tiny: the random tiny models);
4. evaluation of the trained and the untrained model on held-out utterances (three splits);
5. a report folder: report.md (tables), loss_curve.png, eval.png, eval.json, the trained model.

With ``--baselines`` the same run also trains and evaluates two baselines in the same table: a
single task (continuation only, BLSP-style behavior alignment) and no interleaving (ratio 0).

Every stage resumes from what the output folder already holds.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "data" / "demo"

SETTINGS = {
    "full": dict(config="demo.yaml", per_utterance=1, max_new_tokens=32, steps=300,
                 examples_per_step=4, eval_utts=40, eval_tokens=32,
                 train_utts=200),
    "tiny": dict(config="tiny_train.yaml", per_utterance=1, max_new_tokens=12, steps=30,
                 examples_per_step=4, eval_utts=4, eval_tokens=8,
                 train_utts=40),
}


BASELINES = {
    # BLSP-style behavior alignment: one task (continuation), interleaving as in MTBI
    "continue-only": dict(behaviors="behaviors-continue", overrides=[]),
    # MTBI's tasks without interleaving: pure speech from the first step
    "no-interleave": dict(behaviors="behaviors",
                          overrides=["interleave.schedule=constant", "interleave.start=0.0"]),
}


def run_demo(output: str | Path, tiny: bool = False, baselines: bool = False,
             steps: int | None = None, overwrite: bool = False) -> Path:
    from .behaviors import BehaviorConfig, generate_behaviors
    from .data import read_manifest, write_manifest
    from .evaluate import Embedder, evaluate
    from .fetch import fetch
    from .hub import load_llm, resolve_dtype
    from .model import ModelConfig, SpeechLLM
    from .tasks import TaskLibrary
    from .train import Trainer, load_config

    s = dict(SETTINGS["tiny" if tiny else "full"])
    if steps is not None:
        if steps < 4:
            raise ValueError(f"--steps must be >= 4, got {steps}")
        s["steps"] = steps
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    times = {}
    print(f"[1/5] models ({'random tiny' if tiny else 'SmolLM2-135M-Instruct + Whisper tiny.en'})")
    if not tiny:
        for name in ("smollm2-135m-instruct", "whisper-tiny.en"):
            fetch(name)
    embedder_dir = fetch("minilm")
    times["models"] = time.time() - t0

    run_cfg = yaml.safe_load((ROOT / "configs" / s["config"]).read_text())
    library = TaskLibrary.load(ROOT / "configs" / "tasks.yaml")
    split = library.split()
    train_utts = read_manifest(DEMO_DATA / "train.jsonl", require_words=True)[:s["train_utts"]]
    test_utts = read_manifest(DEMO_DATA / "test.jsonl", require_words=True)[:s["eval_utts"]]
    write_manifest(out / "train.jsonl", train_utts)
    write_manifest(out / "test.jsonl", test_utts)

    t = time.time()
    print(f"[2/5] behaviors: the teacher answers {len(train_utts)} utterances")
    model_cfg = ModelConfig.from_dict(run_cfg["model"])
    llm, tok = load_llm(model_cfg.llm, seed=model_cfg.init_seed)
    llm.to(resolve_dtype(model_cfg.dtype))
    # the teacher's hidden states at the response positions come free with its answers; training
    # reads them instead of running the teacher again (data.teacher_cache)
    bc = BehaviorConfig(per_utterance=s["per_utterance"], max_new_tokens=s["max_new_tokens"],
                        batch_size=16, cache_hidden=True)
    teacher = dict(model_config=model_cfg.to_dict())  # recorded: training checks its LLM against it
    generate_behaviors(train_utts, library, llm, tok, out / "behaviors", bc, split=split, **teacher)
    generate_behaviors(test_utts, library, llm, tok, out / "behaviors-eval",
                       dataclasses.replace(bc, cache_hidden=False), split=split, **teacher)
    if baselines:  # continuation prompts for every utterance
        cont = dataclasses.replace(bc, per_utterance=1, tasks=("continue",))
        generate_behaviors(train_utts, library, llm, tok, out / "behaviors-continue", cont,
                           split=split, **teacher)
    del llm
    times["behaviors"] = time.time() - t

    t = time.time()
    print(f"[3/5] training {s['steps']} steps")
    overrides = [f"data.train_manifest={out / 'train.jsonl'}", f"data.behaviors={out / 'behaviors'}",
                 f"data.eval_manifest={out / 'test.jsonl'}",
                 f"data.eval_behaviors={out / 'behaviors-eval'}", f"output_dir={out / 'run'}",
                 f"train.steps={s['steps']}", f"interleave.steps={s['steps']}",
                 f"packing.examples_per_step={s['examples_per_step']}",
                 f"train.eval_every={-(-s['steps'] // 4)}", f"train.save_every={s['steps'] // 2}",
                 "train.log_every=1", "data.teacher_cache=true",
                 f"deepspeed={ROOT / 'configs' / 'ds_zero2.json'}"]  # one process; DeepSpeed's bf16 only on GPU
    if not tiny:
        overrides += ["train.lr=0.003", "train.warmup_steps=5", "interleave.start=0.8"]
    cfg_path = out / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(run_cfg, sort_keys=False))
    # evaluates at step 0 too; overwrite: a run with other settings (e.g. --steps) moves aside
    Trainer(load_config(cfg_path, overrides)).train(overwrite=overwrite)
    if baselines:
        for name, b in BASELINES.items():
            print(f"      baseline {name}")
            extra = [o for o in overrides if not o.startswith(("data.behaviors=", "output_dir="))]
            extra += [f"data.behaviors={out / b['behaviors']}", f"output_dir={out / ('run-' + name)}",
                      *b["overrides"]]
            Trainer(load_config(cfg_path, extra)).train(overwrite=overwrite)
    times["training"] = time.time() - t

    t = time.time()
    print("[4/5] evaluation: trained vs untrained, three splits")
    trained = SpeechLLM.from_pretrained(out / "run" / "final")
    models = {"mtbi": trained}
    if baselines:
        for name in BASELINES:
            models[name] = SpeechLLM.from_pretrained(out / f"run-{name}" / "final")
    models["untrained"] = SpeechLLM.from_config(trained.config)
    result = evaluate(models, test_utts, library, split,
                      out / "eval", per_split=1, max_new_tokens=s["eval_tokens"],
                      embedder=Embedder(embedder_dir), batch_size=16)
    times["evaluation"] = time.time() - t

    print("[5/5] report")
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    plot_losses(metrics, out / "loss_curve.png")
    times["total"] = time.time() - t0
    report = _report(metrics, result, times, tiny)
    (out / "report.md").write_text(report)
    print(report)
    return out


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


def _report(metrics, result, times, tiny) -> str:
    from .evaluate import markdown

    evals = [m for m in metrics if "eval_kl" in m]
    train = [m for m in metrics if "loss" in m]
    lines = [f"# MTBI demo ({'tiny random models' if tiny else 'Whisper tiny.en + SmolLM2-135M-Instruct'})",
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
