"""mtbi_kernels: Triton kernels and their launchers for mtbi-fast.

Installed under the import name ``mtbi_kernels`` (the source folder is ``kernels/``). This package
imports torch and triton only, never ``mtbi_fast``.
"""

from .fused_linear_kl import fused_linear_kl, interpreter_enabled, triton_available
from .pack import triton_pack_embeddings, triton_unpack_grad

__all__ = ["fused_linear_kl", "interpreter_enabled", "triton_available", "triton_pack_embeddings",
           "triton_unpack_grad"]
