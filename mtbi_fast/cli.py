"""The ``mtbi-fast`` console script."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtbi-fast", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="versions and which loss backends run on this machine")
    args = parser.parse_args(argv)
    if args.version:
        from .version import __version__

        print(__version__)
        return 0
    if args.command == "info":
        return _info()
    parser.print_help()
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
