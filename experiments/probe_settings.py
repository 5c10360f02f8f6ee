"""Probe a training setting on the demo data: train a short run with config overrides, then score
the held-out imitation KL with each utterance's own clip and with another utterance's clip (as in
``mtbi-fast eval``). This is how the demo's stride and schedule were chosen (docs/results.md).

    for split in train heldout_task; do
      mtbi-fast behaviors --config configs/demo.yaml --manifest data/demo/test.jsonl \
          --output runs/heldout-$split --split $split --per-utterance 2 --max-new-tokens 32 --cache-hidden
    done
    H=runs/heldout-heldout_task,runs/heldout-train
    python experiments/probe_settings.py runs/demo $H --steps 300                        # the demo's settings
    python experiments/probe_settings.py runs/demo $H --steps 300 'data.spec_augment={}'
    python experiments/probe_settings.py runs/demo $H --steps 300 model.train_encoder_layers=2
    python experiments/probe_settings.py runs/demo $H --steps 100 --init-scale 10
    python experiments/probe_settings.py runs/demo $H --model runs/demo/run/final   # score, no training
    python experiments/probe_settings.py runs/demo $H --steps 300 --repeat-wer       # + repeat WER
    python experiments/probe_settings.py runs/demo $H --model runs/demo/run/final --repeat-wer --no-repeat-ngram 3

DEMO is a ``mtbi-fast demo`` output folder (its resolved ``run/config.yaml``, manifests and
behaviors); HELDOUT one or more (comma-separated) behaviors folders with cached teacher states
(``--cache-hidden``) for utterances of ``data/demo/test.jsonl``, each scored on its own. Trains in
plain PyTorch without intermediate evaluation or checkpoints, into ``--output`` (default
DEMO/probes/<overrides>), and appends a JSON line per HELDOUT folder to DEMO/probes/results.jsonl.
``--model DIR`` scores a trained model (a ``save_pretrained`` folder, e.g. a demo's ``run/final``)
instead of training one
(the 300-step probes of docs/results.md: ``experiments/results/demo_probes.jsonl``).
``--repeat-wer`` also has the model answer every repeat wording (seen and held-out) for every
utterance of ``--manifest`` from its speech and adds the mean WER against the transcript per
wording kind, as the demo's evaluation computes it, and the corpus-level WER with its
substitutions, deletions and insertions per transcript word (``wer_*_parts``), to the first row;
``--no-repeat-ngram`` / ``--repetition-penalty`` decode those answers out of loops.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mtbi_fast.behaviors import job
from mtbi_fast.behaviors_folder import BehaviorsFolder, read_behaviors
from mtbi_fast.config import load_config
from mtbi_fast.data import read_manifest
from mtbi_fast.evaluate import imitation_kl, model_answers, other_speech, repeat_wer, repeat_wer_parts
from mtbi_fast.model import SpeechLLM, decoding_kwargs
from mtbi_fast.tasks import TaskLibrary
from mtbi_fast.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo", type=Path, help="a mtbi-fast demo output folder")
    ap.add_argument("heldout", help="held-out behaviors with cached teacher states (several: "
                                    "comma-separated folders, each scored on its own)")
    ap.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--init-scale", type=float, default=1.0,
                    help="multiply the adapter's last layer at initialization (its output scale)")
    ap.add_argument("--manifest", type=Path, default=ROOT / "data" / "demo" / "test.jsonl")
    ap.add_argument("--output", type=Path)
    ap.add_argument("--model", type=Path, help="score this trained model instead of training one")
    ap.add_argument("--repeat-wer", action="store_true",
                    help="also the repeat WER on every repeat wording of every --manifest utterance")
    ap.add_argument("--no-repeat-ngram", type=int, metavar="N",
                    help="decode the repeat answers with no N-gram twice (default: plain greedy)")
    ap.add_argument("--repetition-penalty", type=float, metavar="X",
                    help="decode the repeat answers with this repetition penalty")
    args = ap.parse_intermixed_args()
    try:
        decoding = decoding_kwargs(args.no_repeat_ngram, args.repetition_penalty)
    except ValueError as exc:
        ap.error(str(exc))
    if decoding and not args.repeat_wer:
        ap.error("--no-repeat-ngram and --repetition-penalty shape the --repeat-wer answers: add --repeat-wer")
    config = args.demo / "run" / "config.yaml"
    if not config.is_file():
        raise SystemExit(f"{config} not found: run `mtbi-fast demo --output {args.demo}` first")
    name = "_".join([f"steps{args.steps}", f"scale{args.init_scale:g}", *args.overrides]).replace("/", "-")
    out = args.output or args.demo / "probes" / name
    cfg = load_config(config, [f"output_dir={out}", f"train.steps={args.steps}",
                               f"interleave.steps={args.steps}", "train.eval_every=0",
                               "train.save_every=0", "deepspeed=null", "train.log_every=10",
                               *args.overrides])
    utts = read_manifest(args.manifest)
    audio = {u.id: u.audio for u in utts}
    heldout = {}
    for folder in args.heldout.split(","):
        records = read_behaviors(folder)
        missing = sorted({r["utt_id"] for r in records} - set(audio))
        if missing:
            raise SystemExit(f"{folder}: utterances not in {args.manifest}: {missing[:5]}")
        heldout[folder] = (records, BehaviorsFolder(folder).hidden_states())
    if args.model is not None:
        model, seconds = SpeechLLM.from_pretrained(args.model).eval(), 0.0
        args.overrides, args.steps, args.init_scale = [f"model={args.model}"], None, None
    else:
        trainer = Trainer(cfg)
        if args.init_scale != 1.0:
            with torch.no_grad():
                trainer.model.adapter.proj[-1].weight.mul_(args.init_scale)
                trainer.model.adapter.proj[-1].bias.mul_(args.init_scale)
        t = time.time()
        trainer.train(resume=False, overwrite=True)  # a rerun moves the last probe aside
        seconds = time.time() - t
        model = trainer.model.eval()
    results = args.demo / "probes" / "results.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    wer = repeat_scores(model, utts, decoding) if args.repeat_wer else {}
    for folder, (records, hidden) in heldout.items():
        jobs = [{"id": r["id"], "utt_id": r["utt_id"], "audio": audio[r["utt_id"]]} for r in records]
        own = sum(imitation_kl(model, jobs, records, hidden)) / len(jobs)
        other = sum(imitation_kl(model, other_speech(jobs), records, hidden)) / len(jobs)
        row = {"overrides": args.overrides, "steps": args.steps, "init_scale": args.init_scale,
               "heldout": folder, "train_s": round(seconds), "kl_own": round(own, 4),
               "kl_other": round(other, 4), "gap": round(other - own, 4), "n": len(jobs), **wer}
        wer = {}  # once, with the first folder's row
        print(json.dumps(row))
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")


def repeat_scores(model, utts, decoding: dict | None = None) -> dict:
    """``model``'s repeat WER from the speech on every repeat wording of every utterance: the mean
    over prompts (the demo's figure) and over all words (edits / transcript words), for the split's
    seen wordings (``wer_seen``) and held-out ones (``wer_new``); the answers greedy, or decoded
    with ``decoding`` (``model.decoding_kwargs``, recorded as ``decoding``)."""
    library = TaskLibrary.load(ROOT / "configs" / "tasks.yaml")
    split = library.split()
    kinds = {"seen": ("train", split.train.get("repeat", [])),
             "new": ("heldout_wording", split.heldout_wordings.get("repeat", []))}
    out = {"decoding": dict(decoding)} if decoding else {}
    for kind, (part, wordings) in kinds.items():
        jobs = [{**job(u, "repeat", w, part), "audio": u.audio} for u in utts for w in wordings]
        if not jobs:
            continue
        answers = model_answers(model, jobs, library, max_new_tokens=32, batch_size=16,
                                desc=f"repeat ({kind})", decoding=decoding)
        per = [repeat_wer(j["text"], a) for j, a in zip(jobs, answers)]
        out[f"wer_{kind}"] = round(sum(per) / len(per), 4)
        parts = repeat_wer_parts([j["text"] for j in jobs], answers)  # corpus level: its edits add up
        out[f"wer_{kind}_corpus"] = round(parts["sub"] + parts["del"] + parts["ins"], 4)
        out[f"wer_{kind}_parts"] = {k: round(v, 4) for k, v in parts.items()}
        out[f"wer_{kind}_n"] = len(jobs)
    return out


if __name__ == "__main__":
    main()
