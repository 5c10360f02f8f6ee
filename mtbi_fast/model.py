"""The SpeechLLM that MTBI trains: speech encoder (true length) -> adapter -> causal LM decoder.

    model = SpeechLLM.from_config(ModelConfig.from_dict(yaml.safe_load(open("configs/tiny.yaml"))["model"]))
    frames = model.speech_frames([model.features(wave)])   # adapter outputs, one [F, H] per clip
    out = model(student_batch, frames, teacher=teacher_batch)   # {"loss", "kl", "ce"}
    text = model.generate("clip.flac", "Summarize what the speaker says.", tokenizer)

- The encoder is a ``mtbi_fast.encoders.SpeechEncoder`` (Whisper on log-mels, or a wav2vec2 /
  HuBERT / WavLM model on waveforms), run at each clip's true length; its front end
  (``model.front``) makes the features and says how many frames a clip gives.
- ``Adapter`` stacks ``stride`` consecutive encoder frames (50 Hz -> 12.5 Hz at stride 4) and maps
  them through a 2-layer MLP to the LLM's hidden size (or a strided convolution, ``kind: conv``);
  it runs once over all clips of a batch (``Adapter.packed``).
- ``model.gradient_checkpointing`` recomputes the frozen LLM's layers in backward (non-reentrant)
  instead of keeping their activations; ``model.fused_ops`` patches Liger-Kernel's RMSNorm, RoPE
  and SwiGLU into a Llama / Qwen2 LLM, or compiles its decoder layers (``apply_fused_ops``).
- The LLM is any transformers causal LM (Llama, Qwen2, ...), frozen by default; the teacher is the
  same LLM fed the text transcript (an online no-grad pass, or cached hidden states), and the
  imitation loss is ``mtbi_fast.ImitationLoss`` through the LLM's own head.

``save_pretrained`` writes only the trained parts (safetensors) plus the config; ``from_pretrained``
rebuilds the configured encoder and LLM and loads them back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .attention import padded_attention
from .audio import load_audio
from .embeddings import check_pack_source, pack_embeddings
from .hf_code.modeling_mtbi_speech import ADAPTER_KINDS, MtbiSpeechAdapter
from .encoders import SpeechEncoder, host_to, load_encoder
from .hub import cast_weights, load_llm, parse_source, resolve_dtype
from .loss import TEMPERATURE_RANGE, ImitationLoss, gathered
from .packing import PackedBatch, gather_loss_rows, model_inputs
from .prompts import left_pad, prompt_halves
from .settings import Bound

# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class ModelConfig:
    """What to build. ``encoder`` and ``llm`` are model sources:

    - ``{"tiny": {...config overrides}}``: a random model from a transformers config (tests);
    - ``{"path": "/a/folder"}``: a transformers checkpoint folder;
    - ``{"name": "smollm2-135m-instruct"}``: a model converted by ``mtbi-fast models fetch``;
    - ``{"hub": "Qwen/Qwen2.5-7B-Instruct", "revision": "<commit or tag>"}``: a model hub id (the
      Hugging Face cache, or hub access), pinned to ``revision`` (default main; the commit it
      resolved to is recorded in the run and checked on resume).
    """

    encoder: dict = field(default_factory=lambda: {"tiny": {}})
    llm: dict = field(default_factory=lambda: {"tiny": {}})
    adapter: dict = field(default_factory=dict, metadata={"bounds": {  # kind: stack|conv|audioflamingo3
        "stride": Bound("int", 1), "hidden": Bound("int", 1, nullable=True)}})  # hidden null: the kind's own
    train_encoder_layers: int = field(default=0, metadata={"bound": Bound("int", 0)})  # top k encoder layers trained
    lora: dict | None = None                          # peft LoraConfig arguments
    loss: dict = field(default_factory=dict, metadata={"bounds": {  # ImitationLoss arguments
        "temperature": Bound("number", 0, False, high=TEMPERATURE_RANGE[1], floor=TEMPERATURE_RANGE[0]),
        "kl_weight": Bound("number", 0, high=1e3), "ce_weight": Bound("number", 0, high=1e3),
        "chunk_size": Bound("int", 1, nullable=True), "memory_budget": Bound("int", 1, nullable=True)}})
    attn_implementation: str = "auto"                 # auto: flash-attn if installed, else varlen SDPA
    max_audio_seconds: float = field(default=30.0, metadata={"bound": Bound("number", 0, False)})
    init_seed: int = field(default=0, metadata={"bound": Bound("int", 0, high=2**63 - 1)})  # tiny models, adapter
    dtype: str = "float32"                             # frozen weights (auto: bf16 where native)
    gradient_checkpointing: bool = False               # recompute the frozen LLM's layers in backward
    fused_ops: str = "auto"                            # auto|liger|compile|none (apply_fused_ops)

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "model") -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        for key in cfg:
            if key not in names:
                raise ValueError(f"unknown key {where}.{key} (allowed: {sorted(names)})")
        out = cls(**cfg)
        for key in ("encoder", "llm"):
            try:
                parse_source(getattr(out, key), key)
            except ValueError as exc:
                raise ValueError(str(exc).replace("model.", f"{where}.", 1)) from None
        unknown = set(out.adapter) - {"kind", "stride", "hidden"}
        if unknown:
            raise ValueError(f"unknown key {where}.adapter.{sorted(unknown)[0]}")
        if out.adapter.get("kind", "stack") not in ADAPTER_KINDS:
            raise ValueError(f"{where}.adapter.kind must be one of {', '.join(ADAPTER_KINDS)}, got "
                             f"{out.adapter['kind']!r}")
        if out.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"{where}.dtype must be auto, float32, bfloat16 or float16, got {out.dtype!r}")
        if not isinstance(out.gradient_checkpointing, bool):
            raise ValueError(f"{where}.gradient_checkpointing must be true or false, got "
                             f"{out.gradient_checkpointing!r}")
        if out.fused_ops not in FUSED_OPS:
            raise ValueError(f"{where}.fused_ops must be one of {', '.join(FUSED_OPS)}, got {out.fused_ops!r}")
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# model


class Adapter(MtbiSpeechAdapter):
    """Encoder frames [T, d_enc] -> LLM frames [adapter_frames(T), d_llm] (the exported model's
    ``MtbiSpeechAdapter``, with the packed pass over many clips)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One clip's encoder frames [T, d_enc] -> [ceil(T / stride), d_llm]."""
        return self.packed(x, [x.shape[0]])

    def packed(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Clips' encoder frames back to back [sum T_i, d_enc] (``SpeechEncoder.packed``) -> their
        LLM frames back to back [sum ceil(T_i / stride), d_llm], in one pass: each clip is padded
        with zero frames to a multiple of ``stride`` (one gather), so no window straddles clips."""
        x = x.to(self.proj[-1].weight.dtype)
        d = x.shape[1]
        if self.kind == "audioflamingo3":  # each clip's frame pairs, an odd last frame left out
            starts = torch.cumsum(torch.tensor([0, *lengths[:-1]]), 0)
            index = torch.cat([s + torch.arange(t // 2 * 2) for s, t in zip(starts.tolist(), lengths)]) \
                if lengths else torch.zeros(0, dtype=torch.long)
            pairs = x.index_select(0, host_to(index, x.device)).reshape(-1, 2, d).mean(1)
            return self.proj(self.norm(pairs))
        if any(t % self.stride for t in lengths):
            lens = torch.tensor(lengths)
            padded = -(-lens // self.stride) * self.stride
            clip = torch.repeat_interleave(torch.arange(len(lengths)), padded)
            offset = torch.arange(sum(-(-t // self.stride) * self.stride for t in lengths)) \
                - (torch.cumsum(padded, 0) - padded)[clip]
            # a clip's own frames, then row sum(lengths): an appended zero frame
            index = torch.where(offset < lens[clip], (torch.cumsum(lens, 0) - lens)[clip] + offset, sum(lengths))
            x = torch.cat([x, x.new_zeros(1, d)]).index_select(0, host_to(index, x.device))
        if self.kind == "stack":
            return self.proj(x.reshape(-1, self.stride * d))
        return self.proj(self.conv(x.T[None])[0].T)


class SpeechLLM(nn.Module):
    """Speech encoder -> adapter -> causal LM, with the MTBI imitation loss."""

    def __init__(self, config: ModelConfig, encoder: SpeechEncoder, llm, tokenizer=None):
        super().__init__()
        self.config = config
        self.encoder = encoder
        d_llm = _embed_shape(llm)[1]
        with torch.random.fork_rng():
            torch.manual_seed(config.init_seed + 1)
            self.adapter = Adapter.from_settings(self.encoder.d_model, d_llm, config.adapter)
        if not self.adapter.encoder_final_norm:  # the pretrained LayerNorm, after the pooling
            if encoder.family != "whisper":
                raise ValueError(f"model.adapter.kind: audioflamingo3 applies a Whisper encoder's final "
                                 f"LayerNorm; this encoder is {encoder.family} (use stack or conv)")
            self.encoder.final_norm = False
            self.adapter.norm.load_state_dict(encoder.encoder.layer_norm.state_dict())
        self.llm = llm
        self.tokenizer = tokenizer
        self.loss_fn = ImitationLoss(**config.loss)
        self._set_trainable()

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ModelConfig, llm_context=None) -> "SpeechLLM":
        """Build the configured model. ``llm_context``: a context manager the LLM is loaded in
        (the trainer passes ``deepspeed.zero.Init`` so that a ZeRO-3 run partitions the LLM while
        it is built or loaded, never holding all of it on one rank)."""
        encoder = load_encoder(config.encoder, seed=config.init_seed)
        with llm_context if llm_context is not None else contextlib.nullcontext():
            llm, tokenizer = load_llm(config.llm, seed=config.init_seed,
                                      attn_implementation=config.attn_implementation)
        model = cls(config, encoder, llm, tokenizer)
        if config.lora:
            model.llm = _apply_lora(model.llm, config.lora)
            model._set_trainable()
        model.fused_ops = apply_fused_ops(model.llm, config.fused_ops)
        if config.gradient_checkpointing:
            # non-reentrant: the frozen LLM's inputs (the speech frames) carry the gradient
            enable = getattr(model.llm, "activation_checkpointing_enable", None)  # transformers >= 5.x
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model._keep_checkpointing()
        return model.cast(resolve_dtype(config.dtype))

    def cast(self, dtype: torch.dtype) -> "SpeechLLM":
        """Frozen weights (encoder, LLM) to ``dtype``, trained ones (adapter, trained encoder
        layers, LoRA) kept in float32: bfloat16 halves the frozen LLM's matmul time on CPUs with
        bf16 instructions and on GPUs, while the optimizer still updates float32 weights. Each
        part casts its input to its own weights' dtype. The rotary frequencies stay float32
        (``hub.cast_weights``)."""
        cast_weights(self, dtype)
        for p in self.parameters():
            if p.requires_grad and p.is_floating_point():
                p.data = p.data.float()
        return self

    def _set_trainable(self):
        self.encoder.set_trainable(self.config.train_encoder_layers)
        self.adapter.requires_grad_(True)
        if not self.config.lora:
            self.llm.requires_grad_(False)

    def train(self, mode: bool = True) -> "SpeechLLM":
        """Training mode for what is trained (the adapter, trained encoder layers, LoRA); the
        frozen encoder part and a frozen LLM stay in eval mode (``SpeechEncoder.train``)."""
        super().train(mode)
        if not self.config.lora:
            self.llm.eval()
        self._keep_checkpointing()
        return self

    def _keep_checkpointing(self):
        """transformers recomputes a layer in backward only while that layer is in training mode,
        and the frozen LLM stays in eval mode (no dropout): with ``gradient_checkpointing`` the
        decoder layers alone are flagged as training (their submodules, dropout included, keep
        their mode; the recomputation runs only where gradients are being recorded)."""
        if not self.config.gradient_checkpointing:
            return
        try:
            from transformers.modeling_layers import GradientCheckpointingLayer as layer_type
        except ImportError:  # an older transformers: any module with the flag
            layer_type = torch.nn.Module
        for module in self.llm.modules():
            if isinstance(module, layer_type) and getattr(module, "gradient_checkpointing", False) is True:
                module.training = True

    # -- speech ------------------------------------------------------------------------------

    @property
    def front(self):
        """The encoder's front end (``encoders.FrontEnd``): features, frames per clip, its limit."""
        return self.encoder.front

    @property
    def frame_rate(self) -> float:
        """LLM speech frames per second (after the adapter)."""
        return self.front.frame_rate / self.adapter.stride

    @property
    def max_seconds(self) -> float:
        """The longest clip the model takes: ``max_audio_seconds``, or the encoder's own limit
        when that is shorter."""
        return min(float(self.config.max_audio_seconds), self.front.max_seconds)

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """The encoder's input features of a 16 kHz waveform [T]."""
        return self.front.features(wave)

    def n_frames(self, n_samples: int) -> int:
        """Speech frames the model gives a clip of ``n_samples`` samples at 16 kHz."""
        return self.adapter.n_frames(self.front.n_frames(n_samples))

    def speech_frames(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encoder features (``features``) -> adapter outputs [F_i, H] in the LLM's embedding space,
        one per clip."""
        buffer, counts = self.speech_buffer(features)
        return list(buffer.split(counts))

    def speech_buffer(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Encoder features -> (the clips' adapter outputs back to back [sum F_i, H], [F_i]): the
        encoder over the packed clips, then the adapter once over all of them."""
        device = self.adapter.proj[-1].weight.device
        states, lengths = self.encoder.packed([host_to(m, device) for m in features])
        return self.adapter.packed(states, lengths), [self.adapter.n_frames(n) for n in lengths]

    # -- training ----------------------------------------------------------------------------

    def forward(self, student: PackedBatch, frames: list[torch.Tensor] | None = None,
                teacher: PackedBatch | None = None, teacher_hidden: torch.Tensor | None = None,
                features: list[torch.Tensor] | None = None) -> dict:
        """MTBI loss of a packed student batch.

        ``frames``: the adapter outputs of the student batch's examples, in its input order
        (``speech_frames`` of their encoder features), or ``features`` to compute them here (what a DeepSpeed
        engine's forward needs); ``teacher``: the same examples as text (online teacher), or
        ``teacher_hidden`` [M, H]: cached teacher states at the loss positions.
        Returns ``{"loss", "kl", "ce", "rows"}``.
        """
        if (frames is None) == (features is None):
            raise ValueError("pass frames (adapter outputs) or features (the encoder's inputs)")
        if (teacher is None) == (teacher_hidden is None):
            raise ValueError("pass exactly one of teacher (a packed text batch) or teacher_hidden")
        device = self.adapter.proj[-1].weight.device
        if frames is None:
            buffer, sizes = self.speech_buffer(features)
        else:
            sizes = [f.shape[0] for f in frames]
            buffer = torch.cat(frames) if frames else torch.zeros(0, self.hidden_size, device=device)
        # every check reads the batch's host copy: nothing is read back from the GPU
        counts = torch.diff(student.frame_offsets).tolist() if student.frame_offsets.device.type == "cpu" \
            else sizes
        for i, (f, n) in enumerate(zip(sizes, counts)):
            if f != n:
                raise ValueError(f"example {student.example_ids[i]!r}: the model gives {f} "
                                 f"speech frames but the batch expects {n}")
        vocab = self.vocab_size
        check_pack_source(student.source, vocab, buffer.shape[0])
        if teacher is not None:
            if teacher.target_ids.numel() != student.target_ids.numel() or not torch.equal(
                    teacher.target_ids.cpu(), student.target_ids.cpu()):
                raise ValueError("teacher and student batches do not have the same response tokens "
                                 "in the same order")
        student = student.to(device, non_blocking=True)
        h_s = self.loss_states(student, buffer)
        if teacher is not None:
            h_t = self.teacher_states(teacher)
        else:
            h_t = teacher_hidden.to(device=device, dtype=h_s.dtype)
            if h_t.shape != h_s.shape:
                raise ValueError(f"teacher_hidden has shape {tuple(h_t.shape)}, expected {tuple(h_s.shape)}")
        head = self.llm.get_output_embeddings()
        loss, parts = self.loss_fn(h_s, h_t, head.weight, student.target_ids,
                                   getattr(head, "bias", None), return_parts=True)
        return {"loss": loss, "kl": parts["kl"], "ce": parts["ce"], "rows": h_s.shape[0]}

    @torch.no_grad()
    def teacher_states(self, teacher: PackedBatch) -> torch.Tensor:
        """The teacher's final hidden states at the loss positions [M, H] (for a cache). The
        teacher is the original LLM: LoRA adapters, when configured, are off for this pass."""
        device = self.adapter.proj[-1].weight.device
        check_pack_source(teacher.source, self.vocab_size, 0)
        off = self.llm.disable_adapter() if self.config.lora else contextlib.nullcontext()
        with off:
            return self.loss_states(teacher.to(device, non_blocking=True),
                                    torch.zeros(0, self.hidden_size, device=device))

    def loss_states(self, batch: PackedBatch, frames: torch.Tensor) -> torch.Tensor:
        """The LLM's final hidden states at the loss positions of ``batch`` [M, H] (in input
        order), its speech positions filled from ``frames`` (the adapter outputs of its examples,
        concatenated in input order)."""
        embed_module = self.llm.get_input_embeddings()
        embed = embed_module.weight
        if hasattr(embed, "ds_id") and embed.data.numel() == 0 and embed.requires_grad:
            # a trained ZeRO-3 partitioned table: look the text rows up through the module
            # (gathered by DeepSpeed's hooks, its gradient reduced by them), then place the frames
            speech = batch.source < 0
            x = embed_module(batch.source.clamp(min=0))
            x = torch.where(speech[:, None], frames.to(x.dtype)[(-batch.source - 1).clamp(min=0)]
                            if frames.shape[0] else x, x)
        else:  # the packing kernel (Triton on a GPU); a frozen partitioned table is gathered for it
            with gathered(embed):  # a frozen ZeRO-3 table: whole for the forward only
                x = pack_embeddings(batch.source, embed, frames.to(embed.dtype), check_ids=False)
        body = self.llm.get_decoder() if hasattr(self.llm, "get_decoder") else self.llm.model
        kw = model_inputs(batch, x, attn_implementation=self.llm.config._attn_implementation)
        hidden = body(**kw).last_hidden_state
        return gather_loss_rows(hidden, batch)

    @property
    def hidden_size(self) -> int:
        return _embed_shape(self.llm)[1]

    @property
    def vocab_size(self) -> int:
        """Rows of the LLM's embedding table (token ids are below it)."""
        return _embed_shape(self.llm)[0]

    # -- inference ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, audio, prompt: str, tokenizer=None, *, streamer=None, **generation_kwargs) -> str:
        """Answer ``prompt`` about ``audio`` (a file path or a 16 kHz waveform).

        The speech goes where ``{speech}`` stands in the prompt (at its end when absent), inside
        the tokenizer's chat template when it has one. ``streamer``: a transformers streamer that
        receives the tokens as they come.
        """
        return self.generate_batch([audio], [prompt], tokenizer, streamer=streamer,
                                   **generation_kwargs)[0]

    @torch.no_grad()
    def generate_batch(self, audios: list, prompts: list[str], tokenizer=None, *, streamer=None,
                       **generation_kwargs) -> list[str]:
        """Answer ``prompts[i]`` about ``audios[i]`` for all i in one left-padded batch (the
        encoder runs each clip at its true length; the LLM decodes the batch together).
        Greedy by default; ``generation_kwargs`` go to the LLM's ``generate``."""
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise ValueError("generate needs a tokenizer (none was loaded with the LLM)")
        if len(audios) != len(prompts):
            raise ValueError(f"{len(audios)} audios but {len(prompts)} prompts")
        if streamer is not None and len(audios) != 1:
            raise ValueError("a streamer follows one answer: generate one prompt at a time")
        waves = [a if isinstance(a, torch.Tensor) else load_audio(a, max_seconds=self.max_seconds)
                 for a in audios]
        frames = self.speech_frames([self.features(w) for w in waves])
        embed = self.llm.get_input_embeddings()
        dev = embed.weight.device
        rows = []
        for f, prompt in zip(frames, prompts):
            before, after = prompt_halves(tokenizer, prompt)
            rows.append(torch.cat([embed(torch.tensor(before, dtype=torch.long, device=dev)),
                                   f.to(embed.weight.dtype),
                                   embed(torch.tensor(after, dtype=torch.long, device=dev))]))
        x, mask = left_pad(rows)
        kw = dict(max_new_tokens=64, do_sample=False)
        kw.update(generation_kwargs)
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            kw.setdefault("pad_token_id", tokenizer.eos_token_id)
        with padded_attention(self.llm), warnings.catch_warnings():
            # the prompt is embeddings, so these settings see the answer only (as decoding_kwargs says)
            warnings.filterwarnings("ignore", message=r"Passing `(no_repeat_ngram_size|repetition_penalty)` "
                                    r"with `inputs_embeds`")
            out = self.llm.generate(inputs_embeds=x, attention_mask=mask, streamer=streamer, **kw)
        return [tokenizer.decode(o, skip_special_tokens=True) for o in out]

    # -- persistence -------------------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.named_parameters() if v.requires_grad}

    def save_pretrained(self, directory: str | os.PathLike):
        """Write ``config.json`` and ``model.safetensors`` (trained parts only) atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        try:
            (tmp / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
            save_file(self.trainable_state_dict(), str(tmp / "model.safetensors"))
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                directory.rename(old)
                tmp.rename(directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "SpeechLLM":
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path = directory / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"no config.json in {directory} (not a save_pretrained folder)")
        raw = json.loads(cfg_path.read_text())
        if isinstance(raw, dict) and "model_type" in raw:  # a transformers folder, not ours
            raise ValueError(f"{directory} is a transformers model folder (model_type "
                             f"{raw['model_type']!r}, e.g. an `mtbi-fast export`), not a run or "
                             f"save_pretrained folder: `mtbi-fast serve {directory}` answers with it, "
                             f"or pass the run folder it was exported from")
        config = ModelConfig.from_dict(raw, where=str(cfg_path))
        model = cls.from_config(config)
        weights = directory / "model.safetensors"
        try:
            state = load_file(str(weights))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{weights} is not a readable safetensors file ({exc})") from None
        current = model.trainable_state_dict()
        if set(state) != set(current):
            missing, extra = sorted(set(current) - set(state)), sorted(set(state) - set(current))
            raise ValueError(f"{weights} does not match the config: "
                             f"missing {missing[:5]}, unexpected {extra[:5]}")
        for key, t in state.items():  # a header declaring another dtype or shape would load
            want = current[key]
            if t.dtype != want.dtype or t.shape != want.shape:
                raise ValueError(f"{weights}: {key} is {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}, "
                                 f"expected {str(want.dtype).removeprefix('torch.')} {tuple(want.shape)}")
        model.load_state_dict(state, strict=False)
        return model


FUSED_OPS = ("auto", "liger", "compile", "none")
# peft LoraConfig arguments a model.lora mapping is laid over
LORA_DEFAULTS = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
LIGER_MODEL_TYPES = ("llama", "qwen2", "mistral")


def apply_fused_ops(llm, mode: str = "auto") -> str:
    """Fused kernels for the frozen LLM's elementwise work; returns what was applied.

    - "liger": Liger-Kernel's RMSNorm, RoPE and SwiGLU patched into a Llama / Qwen2 / Mistral
      instance (its Triton kernels: a CUDA GPU, or the CPU interpreter); its own loss patches are
      never applied (the imitation loss is mtbi-fast's). Liger patches the model family's module
      functions (RoPE) for the whole process, as its own API does.
    - "compile": ``torch.compile`` (dynamic shapes) of each decoder layer's MLP and norms, whose
      shapes vary only in the token count; attention stays on the varlen path.
    - "none": as transformers builds it.
    - "auto": "liger" on a CUDA machine with liger-kernel installed and a supported family, else
      "none" (which one wins on a GPU is measured by ``benchmarks/train_cases.py fused-ops``).
    """
    if mode not in FUSED_OPS:
        raise ValueError(f"fused_ops must be one of {', '.join(FUSED_OPS)}, got {mode!r}")
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    family = base.config.model_type
    if mode == "auto":
        import importlib.util

        mode = ("liger" if torch.cuda.is_available() and family in LIGER_MODEL_TYPES
                and importlib.util.find_spec("liger_kernel") is not None else "none")
    if mode == "liger":
        if family not in LIGER_MODEL_TYPES:
            raise ValueError(f"model.fused_ops: liger supports {', '.join(LIGER_MODEL_TYPES)} LLMs, "
                             f"not {family!r}; use compile or none")
        try:
            from liger_kernel.transformers import monkey_patch
        except ImportError:
            raise ImportError("model.fused_ops: liger needs liger-kernel: pip install liger-kernel") from None
        patch = getattr(monkey_patch, f"apply_liger_kernel_to_{family}")
        patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
              fused_linear_cross_entropy=False, model=base)
    elif mode == "compile":
        body = base.get_decoder() if hasattr(base, "get_decoder") else base.model
        for layer in body.layers:
            for name in ("mlp", "input_layernorm", "post_attention_layernorm"):
                module = getattr(layer, name, None)
                if module is not None:
                    module.compile(dynamic=True)
    return mode


def decoding_kwargs(no_repeat_ngram: int | None = None,
                    repetition_penalty: float | None = None) -> dict:
    """``generate`` keyword arguments that keep a free-running answer out of loops: no n-gram of
    ``no_repeat_ngram`` tokens twice in one answer, and ``repetition_penalty`` (> 1) dividing
    the positive logit (multiplying the negative one) of every token the answer already holds
    (the prompt is embeddings, so neither sees it).
    An undertrained adapter's greedy answers often repeat one phrase until ``max_new_tokens``
    (docs/results.md, "Repeat WER"). None leaves plain greedy decoding."""
    kw = {}
    if no_repeat_ngram is not None:
        if isinstance(no_repeat_ngram, bool) or not isinstance(no_repeat_ngram, int) or no_repeat_ngram < 1:
            raise ValueError(f"no_repeat_ngram must be an integer >= 1, got {no_repeat_ngram!r}")
        kw["no_repeat_ngram_size"] = no_repeat_ngram
    if repetition_penalty is not None:
        if (isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float))
                or not math.isfinite(repetition_penalty) or repetition_penalty <= 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty!r}")
        kw["repetition_penalty"] = float(repetition_penalty)
    return kw


def _embed_shape(llm) -> tuple[int, int]:
    """The LLM's embedding table shape (also when it is a ZeRO-3 partitioned parameter)."""
    w = llm.get_input_embeddings().weight
    return tuple(getattr(w, "ds_shape", w.shape))


def _apply_lora(llm, lora: dict):
    try:
        import peft
    except ImportError:
        raise ImportError("model.lora needs peft: pip install -e '.[lora]'") from None
    return peft.get_peft_model(llm, peft.LoraConfig(task_type="CAUSAL_LM", **{**LORA_DEFAULTS, **lora}))
