"""Where models come from: random tiny models, checkpoint folders, converted offline models.

A model source is a mapping with one kind (see ``ModelConfig``): ``{"tiny": {overrides}}``,
``{"path": folder}``, ``{"name": converted-model-name}`` (from ``mtbi-fast models fetch``, kept
under ``$MTBI_FAST_CACHE``, default ``~/.cache/mtbi_fast``) or ``{"hub": "org/model"}`` with an
optional ``revision`` (a commit, branch or tag; default main). A hub source is loaded from its
snapshot in the Hugging Face cache (downloaded when missing, read offline when
``HF_HUB_OFFLINE=1``), and the commit it resolved to is what runs and behaviors record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .attention import resolve_attn

ASSETS = Path(__file__).parent / "assets"

# ``{"tiny": {overrides}}`` LLM sources: transformers config arguments of the random tiny LLM
# (the tiny encoders: mtbi_fast.encoders)
TINY_LLM = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, tie_word_embeddings=False)


SOURCE_KINDS = ("tiny", "path", "name", "hub")
# the files of a hub snapshot that loading reads (not the .bin / .gguf / .onnx copies some repos carry)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def parse_source(source, key: str = "llm") -> tuple[str, object, str | None]:
    """(kind, value, revision) of a model source ``model.<key>``, checked: exactly one kind of
    ``SOURCE_KINDS``, and a ``revision`` only beside ``hub``."""
    usage = (f"model.{key} must be one of {{tiny: {{...}}}}, {{path: ...}}, {{name: ...}}, "
             f"{{hub: ..., revision: ...}}; got {source!r}")
    if not isinstance(source, dict):
        raise ValueError(usage)
    kinds = [k for k in source if k in SOURCE_KINDS]
    extra = sorted(set(source) - set(SOURCE_KINDS) - {"revision"})
    if len(kinds) != 1 or extra:
        raise ValueError(usage)
    kind = kinds[0]
    revision = source.get("revision")
    if "revision" in source and kind != "hub":
        raise ValueError(f"model.{key}.revision pins a hub model; a {kind} source has none")
    if "revision" in source and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(f"model.{key}.revision must be a commit, branch or tag name, got {revision!r}")
    if kind == "hub" and (not isinstance(source["hub"], str) or source["hub"].count("/") != 1):
        raise ValueError(f"model.{key}.hub must be a repo id like org/name, got {source['hub']!r}")
    return kind, source[kind], revision


_SNAPSHOTS: dict[tuple[str, str | None], Path] = {}


def hub_snapshot(repo: str, revision: str | None = None) -> tuple[Path, str]:
    """(the local snapshot folder, its commit sha) of hub model ``repo`` at ``revision`` (default
    main), from the Hugging Face cache, downloaded when missing. Resolved once per process: a
    run loads and records the same commit even if the branch moves meanwhile."""
    if (repo, revision) not in _SNAPSHOTS:
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS))
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types (offline, 404, auth)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"hub model {repo} at {revision or 'main'}: cannot resolve it ({first}); "
                             f"log in, check the id and revision, or fill the cache and set HF_HUB_OFFLINE=1") from None
        _SNAPSHOTS[repo, revision] = path
    path = _SNAPSHOTS[repo, revision]
    return path, path.name


def hub_commit(source: dict, key: str = "llm") -> str | None:
    """``"hub:ID@<commit sha>"`` for a hub source (resolving it), None for any other kind."""
    kind, value, revision = parse_source(source, key)
    if kind != "hub":
        return None
    return f"hub:{value}@{hub_snapshot(value, revision)[1]}"


def cache_dir() -> Path:
    return Path(os.environ.get("MTBI_FAST_CACHE", Path.home() / ".cache" / "mtbi_fast"))


def model_dir(name: str) -> Path:
    """The folder of a converted model; a clear error when it has not been fetched."""
    path = cache_dir() / "models" / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {name!r} is not in {path.parent}; run `mtbi-fast models "
                                f"fetch {name}` first (or set MTBI_FAST_CACHE)")
    try:  # the sizes recorded at conversion (the sums: `mtbi-fast models verify`)
        recorded = json.loads((path / "mtbi_fast_source.json").read_text()).get("files") or {}
    except (OSError, ValueError):
        recorded = {}
    for rel, entry in recorded.items():
        f = path / rel
        size = f.stat().st_size if f.is_file() else None
        if size != entry["bytes"]:
            what = "missing" if size is None else f"{size} bytes, converted as {entry['bytes']}"
            raise ValueError(f"{f}: {what}: the cached model {name!r} changed; `mtbi-fast models fetch "
                             f"{name}` fetches it again")
    return path


AUTO_DTYPE_ENV = "MTBI_FAST_AUTO_DTYPE"  # bfloat16 | float32: what "auto" resolves to (tests)


def resolve_dtype(name: str) -> torch.dtype:
    """``model.dtype``: "auto" is bfloat16 where its matmuls are native (a CUDA GPU with bf16, an
    x86 CPU with AVX512-BF16 or AMX), else float32; other names are torch dtypes. The environment
    variable ``MTBI_FAST_AUTO_DTYPE`` (bfloat16 or float32) fixes what "auto" is, so that the test
    suite can run as on the other kind of CPU."""
    if name != "auto":
        return getattr(torch, name)
    forced = os.environ.get(AUTO_DTYPE_ENV)
    if forced:
        if forced not in ("bfloat16", "float32"):
            raise ValueError(f"{AUTO_DTYPE_ENV} must be bfloat16 or float32, got {forced!r}")
        return getattr(torch, forced)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def cast_weights(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(dtype)`` for its weights, with its non-persistent float buffers (the rotary
    embeddings' ``inv_freq``) kept as they were: transformers computes RoPE in float32, and
    frequencies rounded to bf16 would shift every position's rotation (the exported model, built
    without the cast, would then differ from the run)."""
    kept = [(m, name, buf) for m in module.modules() for name, buf in m.named_buffers(recurse=False)
            if name in m._non_persistent_buffers_set and buf.is_floating_point()]
    module.to(dtype)
    for m, name, buf in kept:
        setattr(m, name, buf)
    return module


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def tiny_llm_config(overrides: dict | None):
    """The transformers config of a ``{tiny: {...}}`` LLM source (``model_type`` picks the family)."""
    import transformers

    spec = {**TINY_LLM, **(overrides or {})}
    return transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)


def load_llm(source: dict, seed: int = 0, attn_implementation: str = "auto"):
    """(causal LM, tokenizer) from a model source."""
    import transformers

    attn = resolve_attn(attn_implementation)
    kind, value, revision = parse_source(source, "llm")
    if kind == "tiny":
        cfg = tiny_llm_config(value)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            llm = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
        return llm.eval(), tiny_tokenizer()
    path = source_folder(kind, value, revision)
    llm = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return llm.eval(), tokenizer


def load_teacher(llm: dict, seed: int = 0, dtype: str = "float32"):
    """(causal LM, tokenizer) of the teacher: the LLM source ``llm`` (a model config's
    ``model.llm``) in ``dtype`` (its ``model.dtype``), so that the teacher computes as the
    student's LLM will."""
    model, tokenizer = load_llm(llm, seed=seed)
    cast_weights(model, resolve_dtype(dtype))
    return model, tokenizer


def source_config(kind: str, value: str, key: str) -> tuple[Path, dict]:
    """The folder of a ``path`` or ``name`` model source (``model.<key>``) and its
    ``config.json``; errors name the missing file, or the kind when it has no local folder."""
    if kind == "name":
        folder = model_dir(value)
    elif kind == "path":
        folder = Path(value)
    else:
        raise ValueError(f"model.{key} must be tiny, path, name or hub, got {kind!r}")
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{key} config not found: {config}")
    return folder, json.loads(config.read_text())


def tiny_tokenizer():
    """The 512-token byte-level BPE bundled for the tiny LLM (mtbi_fast/assets)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(ASSETS / "tiny_tokenizer.json"),
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def source_folder(kind: str, value: str, revision: str | None = None) -> str:
    """The local folder of a ``path``, ``name`` or ``hub`` model source (a hub id: its snapshot)."""
    if kind == "path":
        if not Path(value).is_dir():
            raise FileNotFoundError(f"model folder not found: {value}")
        return str(value)
    if kind == "name":
        return str(model_dir(value))
    return str(hub_snapshot(value, revision)[0])
