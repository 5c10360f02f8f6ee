"""mtbi_kernels: Triton kernels and their launchers for mtbi-fast.

Installed under the import name ``mtbi_kernels`` from ``kernels/mtbi_kernels/`` (``kernels/`` has no
``__init__.py``, so it never shadows the PyPI ``kernels`` package transformers imports). This package
imports torch and triton only (through ``runtime``, its one guarded Triton import), never
``mtbi_fast``.

- ``fused_linear_kl``: the imitation loss at the 3-GEMM floor (cuBLAS logits + a Triton row pass);
- ``triton_pack_embeddings`` / ``triton_unpack_grad``: packed ``inputs_embeds`` and its gradient;
- ``compile_check``: compile any of them for sm_80/sm_90a here and read ``ptxas -v``.
"""

from .fused_linear_kl import fused_linear_kl
from .pack import triton_pack_embeddings, triton_unpack_grad
from .runtime import interpreter_enabled, require_triton_device, triton_available

__all__ = ["fused_linear_kl", "interpreter_enabled", "require_triton_device", "triton_available",
           "triton_pack_embeddings", "triton_unpack_grad"]
