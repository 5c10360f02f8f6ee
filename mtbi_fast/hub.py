"""Where models come from: random tiny models, checkpoint folders, converted offline models.

A model source is a one-key mapping (see ``ModelConfig``): ``{"tiny": {overrides}}``,
``{"path": folder}``, ``{"name": converted-model-name}`` (from ``mtbi-fast models fetch``, kept
under ``$MTBI_FAST_CACHE``, default ``~/.cache/mtbi_fast``) or ``{"hub": "org/model"}``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .attention import (REGISTERED, TORCH_VARLEN, VARLEN_SDPA, flash_attn_available,
                        torch_varlen_available)

ASSETS = Path(__file__).parent / "assets"


def cache_dir() -> Path:
    return Path(os.environ.get("MTBI_FAST_CACHE", Path.home() / ".cache" / "mtbi_fast"))


def model_dir(name: str) -> Path:
    """The folder of a converted model; a clear error when it has not been fetched."""
    path = cache_dir() / "models" / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {name!r} is not in {path.parent}; run `mtbi-fast models "
                                f"fetch {name}` first (or set MTBI_FAST_CACHE)")
    return path


def resolve_attn(attn_implementation: str) -> str:
    """"auto": the fastest attention here that keeps packed examples apart at no extra cost:
    flash-attention-2 (flash-attn installed, CUDA), else torch's own varlen kernel
    (``TORCH_VARLEN``: torch >= 2.10, an sm80+ GPU), else SDPA per packed sequence
    (``VARLEN_SDPA``); see ``mtbi_fast.attention``. Other names are returned as they are."""
    if attn_implementation != "auto":
        return attn_implementation
    if flash_attn_available():
        return "flash_attention_2"
    if torch_varlen_available():
        return TORCH_VARLEN
    return VARLEN_SDPA


def resolve_dtype(name: str) -> torch.dtype:
    """``model.dtype``: "auto" is bfloat16 where its matmuls are native (a CUDA GPU with bf16, an
    x86 CPU with AVX512-BF16 or AMX), else float32; other names are torch dtypes."""
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextlib.contextmanager
def padded_attention(llm):
    """Plain SDPA while running padded batches (generation with left padding): VARLEN_SDPA and
    TORCH_VARLEN keep packed sequences apart through cu_seqlens and build no padding mask."""
    current = llm.config._attn_implementation
    if current not in REGISTERED:
        yield llm
        return
    llm.set_attn_implementation("sdpa")
    try:
        yield llm
    finally:
        llm.set_attn_implementation(current)


def load_encoder(source: dict, seed: int = 0):
    """A transformers ``WhisperEncoder`` from a model source."""
    import transformers
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    kind, value = next(iter(source.items()))
    if kind == "tiny":
        from .model import TINY_ENCODER

        cfg = transformers.WhisperConfig(**{**TINY_ENCODER, **(value or {})})
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return WhisperEncoder(cfg).eval()
    path = _folder(kind, value)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(path)
    return model.get_encoder().eval()


def load_llm(source: dict, seed: int = 0, attn_implementation: str = "auto"):
    """(causal LM, tokenizer) from a model source."""
    import transformers

    attn = resolve_attn(attn_implementation)
    kind, value = next(iter(source.items()))
    if kind == "tiny":
        from .model import TINY_LLM

        spec = {**TINY_LLM, **(value or {})}
        model_type = spec.pop("model_type")
        cfg = transformers.AutoConfig.for_model(model_type, **spec)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            llm = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
        return llm.eval(), tiny_tokenizer()
    path = _folder(kind, value)
    llm = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return llm.eval(), tokenizer


def tiny_tokenizer():
    """The 512-token byte-level BPE bundled for the tiny LLM (mtbi_fast/assets)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(ASSETS / "tiny_tokenizer.json"),
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _folder(kind: str, value: str) -> str:
    if kind == "path":
        if not Path(value).is_dir():
            raise FileNotFoundError(f"model folder not found: {value}")
        return str(value)
    if kind == "name":
        return str(model_dir(value))
    return value  # hub id
