"""Prompts for the LLM: chat-template halves around the utterance, and left-padded batches.

A prompt has one place where the utterance goes: ``{transcript}`` in a task wording (the teacher
gets the transcript there, ``tasks.PLACEHOLDER``), ``{speech}`` in a prompt for the trained model
(it gets the speech frames there, ``SPEECH``). ``template_halves`` formats the prompt with the
tokenizer's chat template and returns the token ids before and after that place, so that text or
speech can be put between them. ``left_pad`` batches prompts of different lengths for generation:
every row ends where decoding starts.
"""

from __future__ import annotations

import torch

from .hf_code.modeling_mtbi_speech import SPEECH, chat_halves
from .tasks import PLACEHOLDER

__all__ = ["SPEECH", "left_pad", "prompt_halves", "template_halves"]


def template_halves(tokenizer, prompt: str, marker: str = PLACEHOLDER) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted ``prompt`` before and after ``marker`` (exactly once);
    the exported model formats its prompts with the same function."""
    return chat_halves(tokenizer, prompt, marker)


def prompt_halves(tokenizer, prompt: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the speech for ``prompt`` (``{speech}`` marks the spot; at the
    end when absent), inside the tokenizer's chat template when it has one."""
    if SPEECH not in prompt:
        prompt = prompt + "\n" + SPEECH
    return template_halves(tokenizer, prompt, SPEECH)


def left_pad(rows: list[torch.Tensor], value=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [L_i, ...] of one dtype and device -> (a batch [B, max L_i, ...] with each row at its
    right end, ``value`` before it; the attention mask [B, max L_i], int64, 1 on the rows)."""
    width = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), value)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, width - r.shape[0]:] = r
        mask[i, width - r.shape[0]:] = 1
    return out, mask
