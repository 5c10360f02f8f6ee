"""The one guarded Triton import of ``mtbi_kernels``, the device checks, and fp32-output GEMMs.

Every kernel module imports ``triton`` and ``tl`` from here, so a machine without Triton gets one
readable error instead of an ImportError at package import.
"""

from __future__ import annotations

import os
import warnings

import torch

try:  # triton is a dependency on Linux; keep a failed import readable elsewhere
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - only on machines without triton
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = exc


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if triton is None:
        return False
    if device is not None and torch.device(device).type == "cuda":
        return True
    return interpreter_enabled()


def require_triton_device(t: torch.Tensor, what: str, instead: str) -> None:
    """Raise a clear error unless the Triton kernel ``what`` can run on ``t``'s device."""
    if triton is None:
        raise RuntimeError(f"{what} needs triton, which could not be imported: "
                           f"{TRITON_IMPORT_ERROR!r}")
    if t.device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            f"{what} needs CUDA tensors (got tensors on {t.device.type!r}); set "
            f"TRITON_INTERPRET=1 before importing triton to run the kernels in the CPU "
            f"interpreter (slow, for tests), or use {instead}")


def mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` with fp32 output and fp32 accumulation. Half inputs stay half on CUDA (tensor
    cores, ``torch.mm(..., out_dtype=float32)``, torch >= 2.8: the product is never rounded to
    half); elsewhere, or where that is missing (a one-time warning), they are upcast first."""
    if _native_fp32_out(a, b, "mm"):
        if out is not None:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        return torch.mm(a, b, out_dtype=torch.float32)
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    return torch.mm(a32, b32, out=out) if out is not None else a32 @ b32


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` into the fp32 ``acc``, half inputs on tensor cores where torch allows."""
    if _native_fp32_out(a, b, "addmm"):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.addmm_(a.to(torch.float32), b.to(torch.float32))


_NATIVE: dict = {}  # (op, device type) -> whether torch has the fp32-output half GEMM there


def native_fp32_out(op: str, device: torch.device | str = "cuda") -> bool:
    """Whether ``torch.mm``/``torch.addmm`` (``op``) take bf16 inputs with ``out_dtype=float32``
    on ``device`` (probed once on tiny tensors; a missing op warns once: the loss then runs its
    GEMMs in fp32, several times slower)."""
    key = (op, torch.device(device).type)
    if key not in _NATIVE:
        x = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
        acc = torch.zeros(16, 16, device=device, dtype=torch.float32)
        try:
            if op == "mm":
                ok = torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
            else:
                ok = torch.addmm(acc, x, x, out_dtype=torch.float32, out=acc).dtype == torch.float32
        except (TypeError, NotImplementedError, RuntimeError) as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            ok = False
            if key[1] == "cuda":
                warnings.warn(f"torch {torch.__version__} has no {op}(bf16, bf16, "
                              f"out_dtype=float32) on CUDA ({exc}); the fused loss upcasts its "
                              "GEMM inputs to fp32 instead (slower)", stacklevel=3)
        _NATIVE[key] = ok
    return _NATIVE[key]


def _native_fp32_out(a: torch.Tensor, b: torch.Tensor, op: str) -> bool:
    return (a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16)
            and native_fp32_out(op, a.device))
