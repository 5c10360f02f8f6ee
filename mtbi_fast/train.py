"""The MTBI trainer's command line.

    deepspeed mtbi_fast/train.py --config configs/demo_train.yaml [section.key=value ...]   # any GPU count
    deepspeed --hostfile hosts mtbi_fast/train.py --config ...                               # several nodes
    python mtbi_fast/train.py --config configs/tiny_train.yaml                                # one process
    mtbi-fast train configs/demo_train.yaml                                                  # the same

The run config and its checks: ``mtbi_fast.config``; the data and its batches:
``mtbi_fast.dataset``; the loop: ``mtbi_fast.trainer``; the run folder, checkpoints and resume
(docs/resume.md): ``mtbi_fast.runfolder``. A run restarted into the same ``output_dir`` resumes;
``--no-resume`` starts clean and refuses a folder that already holds a run unless ``--overwrite``,
which moves that run aside to ``<output_dir>.replaced-<time>``. User errors are one line (exit
code 2); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (deepspeed mtbi_fast/train.py): import the package,
    _here, _root = Path(__file__).resolve().parent, str(Path(__file__).resolve().parents[1])
    if sys.path and Path(sys.path[0] or ".").resolve() == _here:  # not its modules as top-level ones
        sys.path[0] = _root
    else:
        sys.path.insert(0, _root)

from mtbi_fast.config import load_config  # noqa: E402
from mtbi_fast.errors import guard  # noqa: E402
from mtbi_fast.trainer import Trainer  # noqa: E402

__all__ = ["Trainer", "load_config", "main"]


def main(argv: list[str] | None = None) -> int:
    """``mtbi-fast train``: parse the arguments, train; 2 after a one-line user error."""
    parser = argparse.ArgumentParser(prog="mtbi-fast train",
                                     description="MTBI trainer (see the module docstring)")
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--no-resume", action="store_true",
                        help="start clean; refused when output_dir already holds a run, unless "
                             "--overwrite (docs/resume.md)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start clean even when output_dir holds a run: that run is moved "
                             "aside to <output_dir>.replaced-<time>, never deleted")
    parser.add_argument("--print-config", action="store_true",
                        help="print the config as the run would use it (defaults: files merged, "
                             "overrides applied, defaults filled in, checked) and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error instead of one line")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args(argv)
    return guard(lambda: _run(args), prog="mtbi-fast train", debug=args.debug)


def _run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    trainer = Trainer(cfg)
    t0 = time.time()
    last = trainer.train(resume=not args.no_resume, overwrite=args.overwrite)
    if trainer.rank == 0:
        skipped = f", {trainer.skipped_audio} examples skipped for bad audio" if trainer.skipped_audio else ""
        if not last:  # resumed at its last step: a finished run
            print(f"done: the run was already at step {trainer.step} of {cfg['train']['steps']}, nothing "
                  f"left to train (train.steps=N trains on) -> {trainer.out}")
            return 0
        print(f"done: {trainer.step} steps in {time.time() - t0:.0f} s, final loss "
              f"{last.get('loss', float('nan')):.4f}, {trainer.n_trainable / 1e6:.2f} M trainable "
              f"parameters, {trainer.data_wait_s:.1f} s waiting for data{skipped} -> {trainer.out}")
        print(throughput_line(trainer.summary()))
    return 0


def throughput_line(summary: dict) -> str:
    """The run summary's throughput line: tokens/s, model TFLOP/s and MFU per process."""
    if not summary["steps"]:
        return "throughput: no step run in this process"
    util = (f"{summary['mfu']:.1%} MFU of {summary['peak_tflops']:.0f} TFLOP/s ({summary['peak_source']})"
            if summary["mfu"] is not None else f"MFU not known ({summary['peak_source']})")
    return (f"throughput: {summary['steps']} steps, {summary['tokens_per_s']:.0f} tokens/s, "
            f"{summary['tflops']:.2f} model TFLOP/s per process, {util}")


if __name__ == "__main__":
    sys.exit(main())
