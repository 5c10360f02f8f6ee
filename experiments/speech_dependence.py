"""Does a trained SLLM use what is said? Held-out imitation KL with each utterance's own clip and
with another utterance's clip, for each checkpoint of a run.

    python experiments/speech_dependence.py RUN_DIR --behaviors RUN_DIR/../behaviors-eval \
        --manifest data/demo/test.jsonl

RUN_DIR is a trainer output folder (its ``checkpoints/step-N/model`` exports and ``final``). The
teacher's states come from one teacher pass over the behaviors; the clips are swapped as in
``mtbi-fast eval`` (each utterance gets the next one's, in id order). Prints a markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mtbi_fast.behaviors_folder import read_behaviors
from mtbi_fast.data import read_manifest
from mtbi_fast.evaluate import imitation_kl, other_speech
from mtbi_fast.model import SpeechLLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--behaviors", type=Path, required=True, help="held-out behaviors folder")
    ap.add_argument("--manifest", type=Path, required=True, help="held-out utterances")
    args = ap.parse_args()
    records = read_behaviors(args.behaviors)
    audio = {u.id: u.audio for u in read_manifest(args.manifest)}
    missing = sorted({r["utt_id"] for r in records} - set(audio))
    if missing:
        raise SystemExit(f"{args.behaviors}: utterances not in {args.manifest}: {missing[:5]}")
    jobs = [{"id": r["id"], "utt_id": r["utt_id"], "audio": audio[r["utt_id"]]} for r in records]
    others = other_speech(jobs)
    if others is None:
        raise SystemExit(f"{args.behaviors}: needs behaviors of two utterances or more")
    models = sorted(args.run.glob("checkpoints/step-*/model"))
    if not models:
        raise SystemExit(f"no checkpoints/step-*/model in {args.run}")
    print("| step | KL, own clip | KL, another clip | gap |\n|---|---:|---:|---:|")
    for folder in models:
        model = SpeechLLM.from_pretrained(folder).eval()
        own = sum(imitation_kl(model, jobs, records)) / len(jobs)
        other = sum(imitation_kl(model, others, records)) / len(jobs)
        step = int(folder.parent.name.split("-")[1])
        print(f"| {step} | {own:.3f} | {other:.3f} | {other - own:.3f} |", flush=True)


if __name__ == "__main__":
    main()
