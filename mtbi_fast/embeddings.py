"""Embedding assembly: the packed ``inputs_embeds`` of a ``PackedBatch`` (``packing``).

Each packed position takes a row of the LLM's embedding table (a text token) or of the batch's
frame buffer (a speech frame, the adapter output), as ``PackedBatch.source`` says. ``pack_embeddings``
does it differentiably: an autograd Function whose forward and backward run the Triton kernels of
``mtbi_kernels.pack`` (one launch each way; CUDA, or the CPU interpreter) or plain index copies.
"""

from __future__ import annotations

import torch
from mtbi_kernels import triton_pack_embeddings, triton_unpack_grad

from .reference import eager_pack_embeddings


def pack_embeddings(source: torch.Tensor, embed_weight: torch.Tensor, frames: torch.Tensor,
                    backend: str = "auto", check_ids: bool = True) -> torch.Tensor:
    """Packed ``inputs_embeds`` [N, H]: row ``embed_weight[source[i]]`` for a text position,
    ``frames[-source[i] - 1]`` for a speech position (``PackedBatch.source``).

    Differentiable: gradients reach ``frames``, and ``embed_weight`` only if it requires grad.
    Backends: "triton" (one kernel launch each way; CUDA, or the CPU interpreter: elsewhere the
    kernel's launcher raises ``require_triton_device``'s error), "torch" (index copies, the
    default on CPU), "eager" (``mtbi_fast.reference``); "auto" picks triton on CUDA. Ids outside
    the table or frames outside the buffer are a ValueError (``check_ids``; it reads ``source``
    back, a host sync on a GPU: ``SpeechLLM`` checks the batch's host copy with
    ``check_pack_source`` instead and passes False).
    """
    if backend not in ("auto", "triton", "torch", "eager"):
        raise ValueError(f"backend must be one of auto, triton, torch, eager; got {backend!r}")
    _check_pack_inputs(source, embed_weight, frames)
    if check_ids:
        check_pack_source(source, embed_weight.shape[0], frames.shape[0])
    if backend == "auto":
        backend = "triton" if embed_weight.is_cuda else "torch"
    if backend == "eager":
        return eager_pack_embeddings(source, embed_weight, frames)
    return _PackEmbeddings.apply(source, embed_weight, frames, backend)


class _PackEmbeddings(torch.autograd.Function):
    @staticmethod
    def forward(ctx, source, embed_weight, frames, backend):
        ctx.save_for_backward(source)
        ctx.backend = backend
        ctx.shapes = (embed_weight.shape[0], frames.shape[0])
        ctx.dtypes = (embed_weight.dtype, frames.dtype)
        if backend == "triton":
            return triton_pack_embeddings(source, embed_weight, frames)
        out = torch.empty(source.numel(), embed_weight.shape[1], device=embed_weight.device,
                          dtype=embed_weight.dtype)
        speech = source < 0
        out[~speech] = embed_weight[source[~speech]]
        out[speech] = frames[-source[speech] - 1]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (source,) = ctx.saved_tensors
        vocab, n_frames = ctx.shapes
        need_embed = ctx.needs_input_grad[1]
        if ctx.backend == "triton":
            g_frames, g_embed = triton_unpack_grad(source, grad_out, n_frames,
                                                   vocab if need_embed else None)
        else:
            speech = source < 0
            g = grad_out.float()
            g_frames = torch.zeros(n_frames, g.shape[1], device=g.device, dtype=torch.float32)
            g_frames.index_add_(0, -source[speech] - 1, g[speech])
            g_embed = None
            if need_embed:
                g_embed = torch.zeros(vocab, g.shape[1], device=g.device, dtype=torch.float32)
                g_embed.index_add_(0, source[~speech], g[~speech])
        g_frames = g_frames.to(ctx.dtypes[1]) if ctx.needs_input_grad[2] else None
        g_embed = g_embed.to(ctx.dtypes[0]) if g_embed is not None else None
        return None, g_embed, g_frames, None


def _check_pack_inputs(source, embed_weight, frames):
    if source.dtype != torch.int64 or source.dim() != 1:
        raise ValueError(f"source must be a 1-D int64 tensor, got {source.dtype} {tuple(source.shape)}")
    if embed_weight.dim() != 2 or frames.dim() != 2:
        raise ValueError(f"embed_weight and frames must be 2-D, got {tuple(embed_weight.shape)} "
                         f"and {tuple(frames.shape)}")
    if frames.shape[1] != embed_weight.shape[1] and frames.numel() > 0:
        raise ValueError(f"frames have hidden size {frames.shape[1]} but the embedding table has "
                         f"{embed_weight.shape[1]} (frames dim 1)")
    if frames.dtype != embed_weight.dtype and frames.numel() > 0:
        raise ValueError(f"frames dtype {frames.dtype} differs from embed_weight dtype "
                         f"{embed_weight.dtype}")


def check_pack_source(source: torch.Tensor, vocab: int, n_frames: int):
    """A ValueError unless every text id of ``source`` is a row of a ``vocab``-row table and every
    speech reference a frame of an ``n_frames``-frame buffer."""
    if source.numel():
        hi, lo = int(source.max()), int(source.min())
        if hi >= vocab:
            raise ValueError(f"source has token id {hi}, outside the embedding table "
                             f"({vocab} rows)")
        if lo < 0 and -lo - 1 >= n_frames:
            raise ValueError(f"source refers to speech frame {-lo - 1}, but the frame buffer has "
                             f"{n_frames} frames")
