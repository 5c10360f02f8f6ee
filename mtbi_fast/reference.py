"""Eager reference implementations: obvious, fully materialized, used by tests and benchmarks.

Nothing here is clever on purpose. Each function has the same meaning as its fast counterpart and
is what the fast paths are measured against (in float64 by the tests, at the input precision by
the benchmarks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def eager_row_losses(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    target: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    return_parts: bool = False,
):
    """Per-row imitation losses [N], differentiable through autograd (with ``return_parts``: the
    rows' KL and CE instead, unweighted, each [N]).

    ``student_hidden`` [N, H], ``teacher_hidden`` [N, Ht], ``weight`` [V, H], ``teacher_weight``
    [V, Ht]. The logits are formed at the input precision (what plain PyTorch does), then the
    softmax math runs in float32 (or float64 for float64 inputs). Ignored rows give 0.
    """
    compute = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    z_s = F.linear(student_hidden, weight, bias).to(compute)
    with torch.no_grad():
        z_t = F.linear(teacher_hidden, teacher_weight, teacher_bias).to(compute)
    log_p_s = torch.log_softmax(z_s / temperature, dim=-1)
    log_p_t = torch.log_softmax(z_t / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    ce = torch.zeros_like(kl)
    if target is not None:
        valid = target != ignore_index
        kl = torch.where(valid, kl, torch.zeros_like(kl))
        if ce_weight != 0.0:
            ce = F.cross_entropy(z_s, target, ignore_index=ignore_index, reduction="none")
            ce = torch.where(valid, ce, torch.zeros_like(ce))
    if return_parts:
        return kl, ce
    return kl_weight * temperature**2 * kl + ce_weight * ce


def eager_pack_embeddings(source: torch.Tensor, embed_weight: torch.Tensor,
                          frames: torch.Tensor) -> torch.Tensor:
    """Packed inputs_embeds by gathering both tables for every position and selecting."""
    speech = source < 0
    text_rows = F.embedding(source.clamp(min=0), embed_weight)
    if frames.shape[0] == 0:
        return text_rows
    frame_rows = frames[(-source - 1).clamp(min=0)]
    return torch.where(speech[:, None], frame_rows, text_rows)


def padded_encoder_states(encoder, mels: list[torch.Tensor], lengths: list[int]) -> list[torch.Tensor]:
    """Whisper encoder states of clips of any length, the padded way: one batch padded to its
    longest clip, conv2 fed zeros past each clip's end, and a dense [B, 1, n, n] additive mask
    keeping padded frames out of attention (what ``SpeechEncoder`` did before it packed its clips;
    the benchmarks' "before" and a reference for the packed path). ``encoder``: a transformers
    ``WhisperEncoder``; ``lengths``: encoder output frames of each clip."""
    enc = encoder
    dtype = enc.conv1.weight.dtype
    x = torch.nn.utils.rnn.pad_sequence([m.T for m in mels], batch_first=True).transpose(1, 2)
    x = F.gelu(enc.conv1(x.to(dtype)))
    keep = torch.arange(x.shape[-1], device=x.device)[None, :] < torch.tensor(
        [m.shape[-1] for m in mels], device=x.device)[:, None]
    x = F.gelu(enc.conv2(x * keep[:, None, :].to(x.dtype))).transpose(1, 2)
    n = x.shape[1]
    x = x + enc.embed_positions(torch.arange(n, device=x.device))
    mask = None
    if len(mels) > 1 and min(lengths) < n:
        valid = torch.arange(n, device=x.device)[None, :] < torch.tensor(lengths, device=x.device)[:, None]
        mask = torch.zeros(len(mels), 1, n, n, device=x.device, dtype=x.dtype)
        mask.masked_fill_(~valid[:, None, None, :], torch.finfo(x.dtype).min)
    for layer in enc.layers:
        dt = layer.fc1.weight.dtype
        m = None if mask is None else torch.zeros_like(mask, dtype=dt).masked_fill_(mask < 0, torch.finfo(dt).min)
        x = layer(x.to(dt), m)
    x = enc.layer_norm(x.to(enc.layer_norm.weight.dtype))
    return [x[i, :lengths[i]] for i in range(len(mels))]
