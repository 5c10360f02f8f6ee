"""Model FLOPs of one MTBI training step, for MFU (model FLOPs utilization) reporting.

    parts = step_flops(model, student, teacher, feature_lengths=[model.front.length(f) for f in features])
    peak, why = peak_tflops(device, override=cfg.train.peak_tflops)
    achieved, util = mfu(parts["total"], step_seconds, peak)

Model FLOPs count the work the model needs, as torchtitan's MFU does: not what a kernel happens to
spend on padding, masking, recomputation (gradient checkpointing, a flash kernel's backward) or
elementwise work. One multiply-add is 2 FLOPs; biases, norms, activations, softmax and embedding
lookups count nothing. What each part of ``step_flops`` counts is in its docstring.

Padding is never counted (the rows' tails, the encoder convolutions' padded batch), so MFU is
useful work over peak. ``torch.utils.flop_counter.FlopCounterMode`` differs where noted in
tests/test_flops.py: it counts every padded slot, a causal attention as its full n x n square,
its SDPA backward as 2.5x forward (the recomputed scores), and the loss's row-wise dot products.

``PEAK_TFLOPS``: dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets (their
"with sparsity" figures halved), keyed by a lowercase piece of ``torch.cuda.get_device_name()``
matched at word boundaries, the longest key first (so "gh200" is not "h200", nor "a100" "a10").
"""

from __future__ import annotations

import bisect
import math
import re

import torch

from .audio import SAMPLE_RATE


# TFLOP/s per card, dense bf16 with fp32 accumulation
PEAK_TFLOPS: dict[str, float] = {
    "b200": 2250.0,
    "gh200": 989.4,
    "h200 nvl": 835.5,
    "h200": 989.4,
    "h100 sxm": 989.4,
    "h100 sxm5": 989.4,
    "h100 80gb hbm3": 989.4,
    "h100 nvl": 835.5,
    "h100 pcie": 756.5,
    "a100": 312.0,
    "l40s": 362.05,
    "l4": 121.0,
    "a10": 125.0,
    "rtx 4090": 165.2,
}

# model_types whose MLP is gated (gate, up and down projections)
GATED_MLP = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo",
             "olmo2", "granite", "cohere", "cohere2", "smollm3", "stablelm", "internlm2", "glm")


def peak_tflops(device: torch.device | str | None = None,
                override: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it came from). ``override`` wins ("config"); on a CUDA device the
    card's name is looked up in ``PEAK_TFLOPS`` ("table: <card name>"); an unknown card or a CPU
    gives (None, "unknown: <name>; set train.peak_tflops"). ``device`` None: the current CUDA
    device if there is one, else the CPU."""
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, (int, float)) \
                or not math.isfinite(override) or override <= 0:
            raise ValueError(f"peak_tflops must be a positive number of TFLOP/s, got {override!r}")
        return float(override), "config"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak = _lookup_peak(name) if device.type == "cuda" else None
    if peak is None:
        return None, f"unknown: {name}; set train.peak_tflops"
    return peak, f"table: {name}"


def step_flops(model, student, teacher=None, feature_lengths: list[int] | None = None) -> dict[str, int]:
    """Model FLOPs of one forward + backward of SpeechLLM ``model`` (unwrapped) on the packed
    student batch ``student``, with the online teacher's packed batch ``teacher`` (None: a cached
    teacher, which costs nothing) and the features' length of each clip the encoder runs on
    (``feature_lengths``; None: derived from ``student.frame_offsets``, each example with speech
    frames F being a clip of F x adapter stride encoder frames, exact when the clip's length is a
    multiple of that).

    Returns integer FLOPs per part:

    - ``llm_forward``: the LLM decoder's linear layers over the student batch's real tokens
      (``n_tokens``, not the rows' padding tails): 2 x (matmul parameters of the decoder) per token.
      A layer has the q/k/v/o projections (hidden size, attention heads, key/value heads, head_dim =
      ``config.head_dim`` or hidden / heads) and the MLP: 3 x hidden x intermediate for a gated
      (SwiGLU) MLP (Llama, Qwen2, Mistral, ... or any LLM with a ``gate_proj``), else 2. The LM head
      is counted in ``loss``. LoRA adapters (``model.config.lora``) add 2 x their trained matmul
      parameters per token (read from the ``lora_A`` / ``lora_B`` weights of the decoder).
    - ``llm_backward``: the LLM is frozen, so its backward forms activation gradients only: 1x the
      forward linear FLOPs (the input-gradient matmul of each layer, no weight gradients). LoRA adds
      4 x its parameters per token (activation and weight gradients).
    - ``attention``: the student's attention score and value products (QK^T, PV), counted apart from
      the linear layers, per layer and per example (a packed sequence of true length n; the rows'
      padding tails are not examples): causal pairs n(n + 1) / 2, forward 4 x head_dim x heads per
      pair, backward 2x forward (dQ, dK, dV, dP). Forward + backward. Sliding windows are not modeled.
    - ``encoder``: the family's own count (``SpeechEncoder.flops``, per clip from its features'
      length): its convolutions, then each layer 2 x (4 d^2 + 2 d ffn) per frame plus non-causal
      attention 4 x d x n^2. Frozen parts run forward only; the top
      ``model.config.train_encoder_layers`` layers (trained) add a backward of 2x their forward
      (weight and activation gradients), and nothing below them runs backward.
    - ``adapter``: its weights are trained: 2 (forward) + 2 (weight gradients) + 2 (activation
      gradients) x its matmul parameters per speech frame (F = ``student.frame_offsets[-1]``; the conv
      adapter's Conv1d counts stride x d_enc^2 per frame), except that the first matmul forms no input
      gradient when the encoder is frozen (nothing below it needs one): 6PF - 2 P_first F then.
    - ``loss``: the imitation loss's three GEMMs through the LM head over the M counted rows
      (``student.target_ids``): student logits, teacher logits, and the hidden gradient G @ W:
      6 x M x H x V (V: the head's rows). A trained head adds its weight gradient, 2 x M x H x V.
    - ``teacher``: an online teacher (``teacher``, its packed text batch) is one LLM forward over its
      real tokens: its linear layers (2 x parameters per token, no LoRA: the teacher is the base LLM)
      and its causal attention forward. A cached teacher (``teacher=None``) costs 0.
    - ``total``: the sum."""
    llm = _base_llm(model.llm)
    cfg = _text_config(llm)
    linear = _decoder_params(llm, cfg)
    lora = _lora_params(llm)
    head = llm.get_output_embeddings().weight
    tokens, rows = int(student.n_tokens), int(student.target_ids.numel())
    parts = {
        "llm_forward": 2 * (linear + lora) * tokens,
        "llm_backward": (2 * linear + 4 * lora) * tokens,
        "attention": 3 * _attention_forward(cfg, student),
        "encoder": model.encoder.flops(_clip_lengths(model, student, feature_lengths),
                                       model.config.train_encoder_layers),
        "adapter": _adapter_flops(model, int(student.frame_offsets[-1])),
        "loss": (8 if head.requires_grad else 6) * rows * cfg.hidden_size * _shape(head)[0],
        "teacher": 0 if teacher is None else (2 * linear * int(teacher.n_tokens)
                                              + _attention_forward(cfg, teacher)),
    }
    parts["total"] = sum(parts.values())
    return parts


def mfu(flops: float, seconds: float, peak: float | None) -> tuple[float, float | None]:
    """(achieved TFLOP/s, MFU as a fraction of ``peak`` TFLOP/s, or None when peak is None)."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    if peak is not None and not peak > 0:
        raise ValueError(f"peak must be > 0 TFLOP/s or None, got {peak!r}")
    achieved = flops / seconds / 1e12
    return achieved, (None if peak is None else achieved / peak)


# ---------------------------------------------------------------------------------------------
# helpers


def _lookup_peak(name: str) -> float | None:
    name = name.lower()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", name):
            return PEAK_TFLOPS[key]
    return None


def _base_llm(llm):
    """The transformers model under a peft wrapper (the LLM itself without one)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def _text_config(llm):
    cfg = llm.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _decoder_params(llm, cfg) -> int:
    """Matmul parameters of all decoder layers (attention projections and MLP), from the config."""
    if getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "num_local_experts", None):
        raise NotImplementedError(f"step_flops does not count mixture-of-experts LLMs "
                                  f"({cfg.model_type})")
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    mlp = _mlp_matrices(llm, cfg) * hidden * cfg.intermediate_size
    return cfg.num_hidden_layers * (attention + mlp)


def _mlp_matrices(llm, cfg) -> int:
    if cfg.model_type in GATED_MLP:
        return 3
    gated = any(name.endswith(("gate_proj", "gate_up_proj")) for name, _ in llm.named_modules())
    return 3 if gated else 2


def _lora_params(llm) -> int:
    """Trained LoRA matmul parameters in the decoder (0 without LoRA)."""
    body = llm.get_decoder() if hasattr(llm, "get_decoder") else llm.model
    return sum(math.prod(_shape(p)) for name, p in body.named_parameters()
               if p.requires_grad and (".lora_A." in name or ".lora_B." in name))


def _attention_forward(cfg, batch) -> int:
    """Causal attention forward FLOPs of a packed batch (QK^T and PV, all layers)."""
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    pairs = sum(n * (n + 1) // 2 for n in _example_lengths(batch))
    return 4 * head_dim * heads * cfg.num_hidden_layers * pairs


def _example_lengths(batch) -> list[int]:
    """Each example's length: from its flat start to the next sequence bound (``cu_seqlens``)."""
    bounds = list(batch.bounds) if batch.bounds else batch.cu_seqlens.tolist()
    return [bounds[bisect.bisect_right(bounds, s)] - s for s in batch.example_starts]


def _clip_lengths(model, student, feature_lengths) -> list[int]:
    """Each clip's features' length: as given, or from its speech frames (F adapter frames are
    F x stride encoder frames, each ``SAMPLE_RATE / frame_rate`` samples)."""
    if feature_lengths is not None:
        return [int(t) for t in feature_lengths]
    front = model.front
    samples = SAMPLE_RATE / front.frame_rate * model.adapter.stride
    return [round(samples * f) // front.samples_per_step for f in torch.diff(student.frame_offsets).tolist() if f > 0]


def _adapter_flops(model, frames: int) -> int:
    adapter = model.adapter
    weights = [m.weight for m in adapter.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))]
    params = sum(math.prod(_shape(w)) for w in weights)
    first = adapter.conv if adapter.kind == "conv" else adapter.proj[0]
    no_input_grad = 0 if model.config.train_encoder_layers else math.prod(_shape(first.weight))
    return (6 * params - 2 * no_input_grad) * frames


def _shape(weight) -> tuple[int, ...]:
    """A weight's full shape (also when it is a ZeRO-3 partitioned parameter)."""
    return tuple(getattr(weight, "ds_shape", weight.shape))
