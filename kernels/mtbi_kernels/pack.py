"""Triton kernels that build packed ``inputs_embeds`` from text embeddings and speech frames.

``source`` [N] int64 says, for each packed position, which row to copy: a text token id
(``>= 0``, a row of the embedding table [V, H]) or a speech frame ``-(index + 1)`` (a row of the
frame buffer [F, H], the adapter output of the batch). One launch copies every position
(``_pack_kernel``, grid: position blocks x hidden blocks). The backward (``_unpack_grad_kernel``)
adds each position's gradient into its speech frame, and into its embedding row when the table
needs a gradient, with fp32 atomic adds (a frame or token may appear more than once).
"""

from __future__ import annotations

import torch

from .compile_check import LaunchConfig
from .runtime import require_triton_device, tl, triton


# Tile of positions x hidden columns per program, and warps: 8 warps keep the int64 row offsets
# of a 32 x 128 tile out of spill territory on sm_80 (4 warps spilled; tests/test_compile.py).
BLOCK_N, BLOCK_H, NUM_WARPS = 32, 128, 8


def triton_pack_embeddings(source: torch.Tensor, embed_weight: torch.Tensor,
                           frames: torch.Tensor, block_n: int = BLOCK_N,
                           block_h: int = BLOCK_H) -> torch.Tensor:
    """[N, H] rows gathered from ``embed_weight`` (source >= 0) or ``frames`` (source < 0)."""
    _check_device(source)
    n, h = source.numel(), embed_weight.shape[1]
    out = torch.empty(n, h, device=embed_weight.device, dtype=embed_weight.dtype)
    if n == 0:
        return out
    emb, fr = embed_weight.contiguous(), frames.contiguous()
    if fr.numel() == 0:  # no speech in the batch: any valid pointer will do, nothing is read
        fr = emb
    grid = (triton.cdiv(n, block_n), triton.cdiv(h, block_h))
    _pack_kernel[grid](source.contiguous(), emb, fr, out, n, h, BLOCK_N=block_n, BLOCK_H=block_h,
                       num_warps=NUM_WARPS)
    return out


def triton_unpack_grad(source: torch.Tensor, grad_out: torch.Tensor, n_frames: int,
                       vocab: int | None, block_n: int = BLOCK_N, block_h: int = BLOCK_H):
    """Gradients of ``triton_pack_embeddings``: (grad_frames [F, H] fp32, grad_embed [V, H] fp32
    or None when ``vocab`` is None)."""
    _check_device(source)
    n, h = grad_out.shape
    dev = grad_out.device
    g_fr = torch.zeros(max(n_frames, 1), h, device=dev, dtype=torch.float32)
    g_emb = torch.zeros(vocab, h, device=dev, dtype=torch.float32) if vocab is not None else g_fr
    if n > 0:
        grid = (triton.cdiv(n, block_n), triton.cdiv(h, block_h))
        _unpack_grad_kernel[grid](source.contiguous(), grad_out.contiguous(), g_fr, g_emb, n, h,
                                  GRAD_EMBED=vocab is not None, BLOCK_N=block_n, BLOCK_H=block_h,
                                  num_warps=NUM_WARPS)
    return g_fr[:n_frames], (g_emb if vocab is not None else None)


def launch_configs() -> list[LaunchConfig]:
    """Every compilation the launchers above can ask for on a GPU (``compile_check``)."""
    configs = []
    for ty in ("bf16", "fp16", "fp32"):
        configs.append(LaunchConfig(
            name=f"_pack_kernel {ty}", kernel="mtbi_kernels.pack:_pack_kernel",
            signature=dict(SRC="*i64", EMB=f"*{ty}", FR=f"*{ty}", OUT=f"*{ty}", n="i32", h="i32"),
            constexprs=dict(BLOCK_N=BLOCK_N, BLOCK_H=BLOCK_H), num_warps=NUM_WARPS))
        for grad_embed in (False, True):
            configs.append(LaunchConfig(
                name=f"_unpack_grad_kernel {ty} grad_embed={grad_embed}",
                kernel="mtbi_kernels.pack:_unpack_grad_kernel",
                signature=dict(SRC="*i64", GOUT=f"*{ty}", GFR="*fp32", GEMB="*fp32", n="i32",
                               h="i32"),
                constexprs=dict(GRAD_EMBED=grad_embed, BLOCK_N=BLOCK_N, BLOCK_H=BLOCK_H),
                num_warps=NUM_WARPS))
    return configs


def _check_device(t: torch.Tensor):
    require_triton_device(t, "the triton packing kernel", "backend='torch'")


if triton is not None:

    @triton.jit
    def _tile_sources(SRC, n, h, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
        """This program's positions x hidden columns: offsets, masks, sources, speech flags."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (offs_n < n)[:, None] & (offs_h < h)[None, :]
        src = tl.load(SRC + offs_n, mask=offs_n < n, other=0)
        return offs_n, offs_h, mask, src, src < 0

    @triton.jit
    def _pack_kernel(SRC, EMB, FR, OUT, n, h, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
        offs_n, offs_h, mask, src, speech = _tile_sources(SRC, n, h, BLOCK_N, BLOCK_H)
        tok = tl.where(speech, 0, src)
        frame = tl.where(speech, -src - 1, 0)
        e = tl.load(EMB + tok[:, None] * h + offs_h[None, :], mask=mask & ~speech[:, None], other=0.0)
        f = tl.load(FR + frame[:, None] * h + offs_h[None, :], mask=mask & speech[:, None], other=0.0)
        tl.store(OUT + offs_n[:, None].to(tl.int64) * h + offs_h[None, :],
                 tl.where(speech[:, None], f, e), mask=mask)

    @triton.jit
    def _unpack_grad_kernel(SRC, GOUT, GFR, GEMB, n, h, GRAD_EMBED: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
        offs_n, offs_h, mask, src, speech = _tile_sources(SRC, n, h, BLOCK_N, BLOCK_H)
        g = tl.load(GOUT + offs_n[:, None].to(tl.int64) * h + offs_h[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        frame = tl.where(speech, -src - 1, 0)
        tl.atomic_add(GFR + frame[:, None] * h + offs_h[None, :], g, mask=mask & speech[:, None])
        if GRAD_EMBED:
            tok = tl.where(speech, 0, src)
            tl.atomic_add(GEMB + tok[:, None] * h + offs_h[None, :], g, mask=mask & ~speech[:, None])
