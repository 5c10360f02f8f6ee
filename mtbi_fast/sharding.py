"""``deepspeed: auto``: replicate the frozen LLM when it fits on each GPU, partition it when not.

ZeRO-3 partitions every weight, so each frozen layer is all-gathered in forward and again in
backward on every micro-step, and on one GPU it saves no memory at all. The frozen encoder and LLM
need no gradients and no optimizer state, so when their weights fit on each GPU they are simply
replicated, and DeepSpeed's ZeRO-2 handles the trained parts (adapter, trained encoder layers,
LoRA) alone: their gradients are reduce-scattered and their updated weights all-gathered, a few
hundred MB a step. ZeRO-3 is kept for LLMs that do not fit (70B class). docs/sharding.md has the
rule, the reserve and the communication volumes of both choices on paper.

    ds_json, why = auto_deepspeed_config(cfg["model"], world)   # before the model is built
    print(why)

The sizes are counted exactly, without reading a weight: the configured encoder and LLM are built
on the meta device from their transformers configs (``frozen_model_bytes``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from pathlib import Path

import torch

from . import hub
from .encoders import meta_encoder, tiny_encoder_config

GIB = 1024 ** 3
# ``reserve_bytes`` default: what a rank keeps free beyond the model states for activations, the
# loss buffers, NCCL and allocator slack: a quarter of the free memory, on a GPU at least 4 GiB;
# on a CPU (tests, smoke runs) the quarter alone
RESERVE_SHARE = 0.25
RESERVE_MIN_BYTES = 4 * GIB
# bytes per trained parameter (ZeRO paper's mixed-precision Adam count): the float32 weight (kept
# whole on every rank), its gradient and Adam's two moments (partitioned across the ranks by ZeRO-2)
TRAINED_REPLICATED_BYTES = 4
TRAINED_PARTITIONED_BYTES = 12

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# the same dicts as configs/ds_zero2.json and configs/ds_zero3.json, for an installed package
# that ships no configs/ (tests/test_sharding.py keeps them equal to the files)
_COMMON = {
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 1000000,
    "wall_clock_breakdown": False,
}
ZERO2 = {"zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
         **_COMMON}
ZERO3 = {"zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                               "stage3_gather_16bit_weights_on_model_save": False},
         **_COMMON}
BUILTIN = {2: ZERO2, 3: ZERO3}

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# ---- sizes ------------------------------------------------------------------------------------

def frozen_model_bytes(model_cfg: dict, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of the frozen weights: LLM + encoder in ``dtype``, number of parameters of the LLM),
    counted exactly by building the configured LLM and encoder on the meta device (no weights
    read, no memory). ``model_cfg``: a run config's ``model`` section. The encoder's trained top
    layers (``train_encoder_layers``, with its final layer norm) are float32 trained weights, not
    frozen ones: they are left out here (``trainable_params`` counts them). LoRA leaves the LLM's
    own weights frozen. Tied embeddings count once, as ``model.parameters()`` does.
    A source whose config cannot be read (a hub id offline, a missing folder): ValueError naming
    ``model.llm`` or ``model.encoder``."""
    frozen, n_llm, _ = _counts(_as_dict(model_cfg))
    return frozen * _itemsize(dtype), n_llm


def trainable_params(model_cfg: dict) -> int:
    """The parameters a run trains: the adapter (exact, from the encoder's d_model, the LLM's
    hidden size and ``model.adapter``: kind, stride, hidden), the encoder's top
    ``train_encoder_layers`` layers and its final layer norm (exact), and LoRA's A and B matrices
    (r x (in + out) for each ``nn.Linear`` that ``lora.target_modules`` names, matched as peft
    matches: a list of name suffixes, one regular expression, or "all-linear"; by default q_proj
    and v_proj with r 8, like ``model._apply_lora``). An estimate only where peft adds more (e.g.
    ``modules_to_save``, biases): those are left out."""
    return _counts(_as_dict(model_cfg))[2]


def adapter_params(d_enc: int, d_llm: int, adapter: dict) -> int:
    """Parameters of the adapter ``model.adapter`` configures between an encoder of width
    ``d_enc`` and an LLM of width ``d_llm`` (built on the meta device and counted)."""
    from .hf_code.modeling_mtbi_speech import MtbiSpeechAdapter

    with torch.device("meta"):
        return _numel(MtbiSpeechAdapter.from_settings(d_enc, d_llm, adapter))


# ---- the decision -----------------------------------------------------------------------------

def choose_zero_stage(frozen_bytes: int, trainable_params: int, free_bytes: int, world: int,
                      reserve_bytes: int, *, dtype: torch.dtype | None = None,
                      device_type: str = "cuda") -> tuple[int, str]:
    """The ZeRO stage for a run and the reason, one line. 2 when one GPU holds the frozen weights
    (replicated), the trained parts' states and the reserve:

        frozen_bytes + trainable_params * (4 + 12 / world) + reserve_bytes <= free_bytes

    (per trained parameter a float32 weight on every rank; its gradient and Adam's two moments, 12
    bytes, divided across the ranks as ZeRO-2 does); else 3 (the frozen weights partitioned over
    the ranks and gathered layer by layer). ``dtype`` (the frozen weights' precision) and
    ``device_type`` ("cuda": GPUs, else ranks sharing a machine's RAM) only word the reason."""
    world = max(int(world), 1)
    trained = trainable_params * (TRAINED_REPLICATED_BYTES + TRAINED_PARTITIONED_BYTES / world)
    need = frozen_bytes + trained + reserve_bytes
    precision = f", {_DTYPE_NAMES.get(dtype, str(dtype).replace('torch.', ''))}" if dtype is not None else ""
    what = f"the frozen weights ({_size(frozen_bytes)}{precision})"
    room = (f"{_size(free_bytes)} free, {_size(reserve_bytes)} kept for activations, "
            f"{_size(trained)} for the states of {_count(trainable_params)} trained parameters")
    gpu = device_type == "cuda"
    place = ("on each GPU" if world > 1 else "on the GPU") if gpu else \
        ("in each rank's share of RAM" if world > 1 else "in RAM")
    ranks = f"{world} GPUs" if gpu else f"{world} ranks"
    if need <= free_bytes:
        return 2, f"ZeRO-2: {what} fit {place} ({room}): replicated, no per-layer gathers"
    why = f"ZeRO-3: {what} do not fit {place} ({room})"
    per_rank = frozen_bytes / world + trainable_params * 16 / world + reserve_bytes
    if world == 1:
        return 3, (f"{why}, and on one {'GPU' if gpu else 'rank'} ZeRO-3 partitions nothing: "
                   "expect out-of-memory (use more GPUs)")
    if per_rank > free_bytes:
        return 3, (f"{why}; even partitioned over {ranks} they need {_size(per_rank)} each: "
                   "expect out-of-memory (use more GPUs)")
    return 3, (f"{why}: partitioned over {ranks} ({_size(frozen_bytes / world)} each), "
               "gathered layer by layer")


def auto_deepspeed_config(model_cfg: dict, world: int, device: torch.device | None = None,
                          reserve_bytes: int | None = None, *,
                          free_bytes: int | None = None) -> tuple[dict, str]:
    """(a complete DeepSpeed JSON dict, a fresh copy of configs/ds_zero2.json or ds_zero3.json,
    the reason) for ``model_cfg`` (a run config's ``model`` section) on ``world`` ranks.

    Call it before the model is built. Free memory: ``torch.cuda.mem_get_info`` of ``device``
    (default: the current CUDA device) on a GPU; on a CPU the machine's available RAM (psutil,
    else ``os.sysconf``) shared by the ``LOCAL_WORLD_SIZE`` processes of the node. ``free_bytes``
    overrides it: every rank must take the same decision, so a trainer with several ranks passes
    the smallest free memory of all of them (or decides on rank 0 and broadcasts).
    ``reserve_bytes`` default: ``default_reserve``, max(4 GiB, 25% of the free memory) on a GPU,
    25% on a CPU. Weights' dtype: ``hub.resolve_dtype(model_cfg["dtype"])`` (default
    float32). Trained parameters: ``trainable_params``."""
    model_cfg = _as_dict(model_cfg)
    dtype = hub.resolve_dtype(model_cfg.get("dtype", "float32"))
    frozen, _, trained = _counts(model_cfg)
    frozen *= _itemsize(dtype)
    device = _default_device(device)
    if free_bytes is None:
        free_bytes = free_memory(device)
    if reserve_bytes is None:
        reserve_bytes = default_reserve(free_bytes, device.type)
    stage, why = choose_zero_stage(frozen, trained, free_bytes, world, reserve_bytes, dtype=dtype,
                                   device_type=device.type)
    return deepspeed_template(stage), why


def default_reserve(free_bytes: int, device_type: str = "cuda") -> int:
    """The memory kept for activations, the loss buffers and slack: max(RESERVE_MIN_BYTES,
    RESERVE_SHARE x free_bytes) on a GPU; RESERVE_SHARE x free_bytes elsewhere (no CUDA context,
    NCCL buffers or caching allocator to allow for)."""
    share = int(RESERVE_SHARE * free_bytes)
    return max(RESERVE_MIN_BYTES, share) if device_type == "cuda" else share


def free_memory(device: torch.device | None = None) -> int:
    """Bytes free for one rank: on CUDA ``torch.cuda.mem_get_info``; on a CPU the available RAM
    divided by ``LOCAL_WORLD_SIZE`` (the ranks of a node share it)."""
    device = _default_device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except ImportError:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def _default_device(device) -> torch.device:
    """``device``, or the current CUDA device, or the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def deepspeed_template(stage: int) -> dict:
    """A fresh copy of configs/ds_zero{stage}.json (the in-code copy when the file is absent)."""
    path = CONFIGS / f"ds_zero{stage}.json"
    if path.is_file():
        return json.loads(path.read_text())
    return copy.deepcopy(BUILTIN[stage])


# ---- meta-device models -------------------------------------------------------------------------

def _counts(model_cfg: dict) -> tuple[int, int, int]:
    """(frozen parameters: LLM + encoder less its trained layers, LLM parameters, trained
    parameters), from the configured models built once on the meta device."""
    llm = _meta_llm(model_cfg.get("llm") or {"tiny": {}})
    encoder = _meta_encoder(model_cfg.get("encoder") or {"tiny": {}})
    n_llm, trained_encoder = _numel(llm), _trained_encoder_params(encoder, model_cfg)
    trained = (adapter_params(encoder.d_model, _hidden_size(llm), model_cfg.get("adapter") or {})
               + trained_encoder + _lora_params(llm, model_cfg.get("lora")))
    return n_llm + _numel(encoder) - trained_encoder, n_llm, trained


def _as_dict(model_cfg) -> dict:
    """A ``model`` section, also given as a ``ModelConfig``."""
    return model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)


def _meta_llm(source: dict):
    """The configured causal LM on the meta device (hub.load_llm's config, no weights)."""
    import transformers

    cfg = _source_config(source, "llm")
    with torch.device("meta"):
        try:
            return transformers.AutoModelForCausalLM.from_config(cfg)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"model.llm: cannot build a causal LM from its config ({exc})") from None


def _meta_encoder(source: dict):
    """The configured speech encoder on the meta device (``encoders.meta_encoder``)."""
    return meta_encoder(_source_config(source, "encoder"))


def _source_config(source: dict, key: str):
    """The transformers config of a model source ``model.<key>``: for ``tiny`` built as hub.py
    builds it, else read with ``AutoConfig.from_pretrained`` (a ``hub`` id needs hub access)."""
    import transformers

    kind, value, revision = hub.parse_source(source, key)
    if kind == "tiny":
        return tiny_encoder_config(value) if key == "encoder" else hub.tiny_llm_config(value)
    try:
        if kind == "name":
            where = str(hub.model_dir(value))
        elif kind == "path":
            if not (Path(value) / "config.json").is_file():
                raise FileNotFoundError(f"no config.json in {value}")
            where = str(value)
        elif kind == "hub":  # the local hub cache first: no network round trips when it has it
            with contextlib.suppress(OSError):
                return transformers.AutoConfig.from_pretrained(value, revision=revision, local_files_only=True)
            return transformers.AutoConfig.from_pretrained(value, revision=revision)
        else:
            raise ValueError(f"must be tiny, path, name or hub, got {kind!r}")
        return transformers.AutoConfig.from_pretrained(where)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"model.{key}: cannot read the config of {source!r} to size the model "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); set "
                         "deepspeed to a JSON file instead of auto") from None


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _hidden_size(llm) -> int:
    return int(llm.get_input_embeddings().weight.shape[1])


def _trained_encoder_params(encoder, model_cfg: dict) -> int:
    k = int(model_cfg.get("train_encoder_layers") or 0)
    if not k:
        return 0
    return sum(_numel(m) for m in encoder.trained_modules(k))


def _lora_params(llm, lora: dict | None) -> int:
    if not lora:
        return 0
    r = int(lora.get("r", 8))
    targets = lora.get("target_modules", ["q_proj", "v_proj"])
    if targets == "all-linear":  # peft: every linear layer but the output head
        head = llm.get_output_embeddings()
        return sum(r * (m.in_features + m.out_features) for m in llm.modules()
                   if isinstance(m, torch.nn.Linear) and m is not head)
    if isinstance(targets, str):
        def named(name):
            return re.fullmatch(targets, name) is not None
    else:
        def named(name):
            return any(name == t or name.endswith("." + t) for t in targets)
    return sum(r * (m.in_features + m.out_features) for name, m in llm.named_modules()
               if isinstance(m, torch.nn.Linear) and named(name))


def _size(n: float) -> str:
    """Bytes with one decimal in GiB, or MiB / KiB below one of the unit above."""
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _count(n: int) -> str:
    """A parameter count: 35.7 M, or the number below 100 k."""
    return f"{n / 1e6:.1f} M" if n >= 100_000 else f"{n:,}"


__all__ = ["frozen_model_bytes", "trainable_params", "adapter_params", "choose_zero_stage",
           "auto_deepspeed_config", "default_reserve", "free_memory", "deepspeed_template",
           "ZERO2", "ZERO3", "RESERVE_SHARE", "RESERVE_MIN_BYTES"]
