"""Speech encoders: one interface, one class per family.

    encoder = load_encoder({"tiny": {"model_type": "hubert"}})
    feats = encoder.front.features(wave)             # what the encoder reads, from a 16 kHz waveform
    states, lengths = encoder.packed([feats])        # [sum n_i, d_model], n_i = front.n_frames(samples_i)

A ``SpeechEncoder`` owns everything that depends on its family:

- ``front``, its ``FrontEnd``: features from a waveform, the encoder frames a clip of n samples
  gives (``n_frames``) and the longest clip it takes (``max_seconds``). It is a small picklable
  value: the batch builders carry it into DataLoader workers instead of the model;
- ``packed``: features of several clips -> each clip's states at its true length, back to back;
  a clip's output does not depend on what it is batched with;
- the layers ``model.train_encoder_layers`` trains (``trained_modules``); the rest stays frozen
  and in eval mode (no dropout, layer drop or masking in what is not trained);
- its FLOPs per clip (``flops``) and how it is built from a transformers config and loaded.

The family is chosen by the config's ``model_type`` (``ENCODER_FAMILIES``): ``whisper``
(``WhisperEncoder`` on log-mels, without its 30 s padding) and the waveform encoders wav2vec2,
HuBERT and WavLM (transformers ``AutoModel`` on the raw waveform). A ``{tiny: {...}}`` source is a
random Whisper-shaped encoder unless its ``model_type`` names another family. Adding a family:
docs/design.md, "Adding a speech encoder".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .attention import TORCH_VARLEN, TORCH_VARLEN_KERNEL, VARLEN_SDPA
from .audio import HOP_LENGTH, SAMPLE_RATE, log_mel, mel_frames
from .hub import parse_source, source_config, source_folder

# ``{"tiny": {overrides}}`` sources: transformers config arguments of the random tiny encoders
TINY_ENCODER = dict(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                    encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=4,
                    decoder_ffn_dim=128, max_source_positions=1500, vocab_size=128,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
# a waveform encoder with the real models' convolutions (a frame per 320 samples: 50 Hz) and
# nothing random in its forward pass, like the tiny Whisper
TINY_WAVEFORM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                     feat_extract_norm="layer", do_stable_layer_norm=True, hidden_dropout=0.0,
                     attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                     layerdrop=0.0, mask_time_prob=0.0, vocab_size=32)


# ---------------------------------------------------------------------------------------------
# front ends: plain values, picklable


class FrontEnd:
    """A family's audio front end. ``features(wave)``: what the encoder reads from a 16 kHz
    waveform [T]; ``length(features)``: its time length; ``frames(length)``: encoder frames of
    features that long; ``n_frames(samples)``: encoder frames of a clip of ``samples`` samples."""

    frame_rate: float        # encoder frames per second
    samples_per_step: int    # waveform samples per feature time step
    unit: str                # what a feature time step is called
    spectral = False         # features are [bins, time]: SpecAugment applies
    max_frames: int | None = None
    max_steps: int | None = None  # the longest features it takes

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def frames(self, length: int) -> int:
        raise NotImplementedError

    def steps(self, n_samples: int) -> int:
        """Feature time steps of a clip of ``n_samples`` samples."""
        return n_samples // self.samples_per_step

    @staticmethod
    def length(features: torch.Tensor) -> int:
        return int(features.shape[-1])

    def n_frames(self, n_samples: int) -> int:
        return self.frames(self.steps(n_samples))

    @property
    def max_seconds(self) -> float:
        """The longest clip the encoder takes (inf: no limit of its own)."""
        return math.inf if self.max_frames is None else self.max_frames / self.frame_rate


@dataclass(frozen=True)
class LogMelFrontEnd(FrontEnd):
    """Whisper's: log-mel features [n_mels, samples // 160] (``audio.log_mel``), one encoder frame
    per 2 mel frames (the second convolution's stride), at most ``max_frames`` frames (its
    position table: 1500 = 30 s)."""

    n_mels: int = 80
    max_frames: int | None = 1500
    stride: int = 2
    frame_rate = SAMPLE_RATE / HOP_LENGTH / 2
    samples_per_step = HOP_LENGTH
    unit = "mel frames"
    spectral = True

    @property
    def max_steps(self) -> int | None:
        return None if self.max_frames is None else self.max_frames * self.stride

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        return log_mel(wave, self.n_mels)

    def steps(self, n_samples: int) -> int:
        return mel_frames(n_samples)

    def frames(self, length: int) -> int:
        return math.ceil(length / self.stride)


@dataclass(frozen=True)
class WaveformFrontEnd(FrontEnd):
    """wav2vec2 / HuBERT / WavLM: the waveform itself [samples], normalized to zero mean and unit
    variance per clip when the model was trained so (its feature extractor's ``do_normalize``);
    encoder frames from its convolutions (``conv``: (kernel, stride) per layer, no padding)."""

    conv: tuple[tuple[int, int], ...] = ((10, 5),) + ((3, 2),) * 4 + ((2, 2),) * 2
    normalize: bool = True
    samples_per_step = 1
    unit = "samples"

    @property
    def frame_rate(self) -> float:
        return SAMPLE_RATE / math.prod(s for _, s in self.conv)

    @property
    def min_samples(self) -> int:
        """The shortest clip that gives one frame (the convolutions' receptive field)."""
        n = 1
        for k, s in reversed(self.conv):
            n = (n - 1) * s + k
        return n

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() != 1:
            raise ValueError(f"a waveform encoder takes one waveform [T], got shape {tuple(wave.shape)}")
        if wave.numel() < self.min_samples:
            raise ValueError(f"waveform of {wave.numel()} samples is too short for an encoder frame "
                             f"({self.min_samples} samples)")
        if not self.normalize:
            return wave.float().contiguous()
        # float64 numpy: one thread, a fixed order, the same in every DataLoader worker
        x = wave.detach().cpu().numpy().astype(np.float64)
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        return torch.from_numpy(x.astype(np.float32)).to(wave.device)

    def frames(self, length: int) -> int:
        for k, s in self.conv:
            length = (length - k) // s + 1
        return max(length, 0)


# ---------------------------------------------------------------------------------------------
# the interface


class SpeechEncoder(nn.Module):
    """One family's encoder: ``self.encoder`` is the transformers module (its state-dict keys are
    ``encoder.*``), ``self.front`` its ``FrontEnd``. Subclasses set ``family`` and ``model_types``
    and implement ``packed``, ``d_model``, ``layers``, ``flops`` and the class methods
    ``front_end``, ``build`` and ``from_folder``."""

    family: str = ""
    model_types: tuple[str, ...] = ()

    def __init__(self, encoder: nn.Module, front: FrontEnd):
        super().__init__()
        self.encoder, self.front = encoder, front
        self._trained: list[nn.Module] = []
        self.encoder.eval()

    # -- what every family gives

    @property
    def d_model(self) -> int:
        raise NotImplementedError

    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def packed(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Features of several clips -> (their encoder states back to back [sum n_i, d_model], [n_i])."""
        raise NotImplementedError

    def flops(self, lengths: list[int], trained_layers: int) -> int:
        """Model FLOPs of forward (+ backward through ``trained_layers`` top layers) over clips
        whose features are ``lengths`` steps long."""
        raise NotImplementedError

    @classmethod
    def front_end(cls, config, folder: Path | None = None) -> FrontEnd:
        raise NotImplementedError

    @classmethod
    def build(cls, config) -> nn.Module:
        """The transformers module, randomly initialized (under ``torch.device("meta")``: sizes only)."""
        raise NotImplementedError

    @classmethod
    def from_folder(cls, folder: str) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def max_frames_of(cls, config) -> int | None:
        """The most encoder frames a model of this config takes (None: no limit of its own)."""
        return None

    @classmethod
    def limit_note(cls, config) -> str:
        """Why a model of this config takes no longer clips (where it has a limit of its own)."""
        return f"the encoder's {cls.max_frames_of(config)} frames"

    # -- shared

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        states, lengths = self.packed(features)
        return list(states.split(lengths))

    def trained_modules(self, k: int) -> list[nn.Module]:
        """What ``train_encoder_layers: k`` trains: the top ``k`` layers."""
        return list(self.layers[-k:]) if k else []

    def set_trainable(self, k: int) -> None:
        self.requires_grad_(False)
        self._trained = self.trained_modules(k)
        for m in self._trained:
            m.requires_grad_(True)

    def train(self, mode: bool = True) -> "SpeechEncoder":
        super().train(mode)
        self.encoder.eval()  # frozen parts compute as at inference
        for m in self._trained:
            m.train(mode)
        return self

    def check_lengths(self, features: list[torch.Tensor]) -> list[int]:
        """Each clip's encoder frames; a clip over ``front.max_frames`` or under one frame is an error."""
        out = []
        for i, f in enumerate(features):
            n = self.front.frames(self.front.length(f))
            if n < 1:
                raise ValueError(f"clip {i}: features of {self.front.length(f)} steps give no encoder frame")
            if self.front.max_frames is not None and n > self.front.max_frames:
                steps = self.front.length(f)
                raise ValueError(f"clip {i}: {steps} {self.front.unit} ({steps * self.front.samples_per_step / SAMPLE_RATE:.1f}"
                                 f" s) is longer than the encoder's {self.front.max_steps}")
            out.append(n)
        return out


# ---------------------------------------------------------------------------------------------
# Whisper


class WhisperSpeechEncoder(SpeechEncoder):
    """transformers' ``WhisperEncoder`` modules on log-mels of any length up to its position
    table, not padded to 3000 frames: the convolutions run on the batch padded to its longest
    clip (the first one's output zeroed past each clip's end, so the second sees what it would at
    the true length), then the clips' frames are packed back to back and the layers run on them
    with varlen attention (``mtbi_fast.attention``, not causal): no padded frame is computed and no
    mask is built. ``final_norm`` False leaves the last LayerNorm to the adapter (audioflamingo3)."""

    family = "whisper"
    model_types = ("whisper",)

    def __init__(self, encoder: nn.Module, front: FrontEnd | None = None):
        super().__init__(encoder, front or self.front_end(encoder.config))
        self.final_norm = True
        encoder.config._attn_implementation = TORCH_VARLEN if TORCH_VARLEN_KERNEL is not None else VARLEN_SDPA

    @property
    def d_model(self) -> int:
        return self.encoder.config.d_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    @property
    def num_mel_bins(self) -> int:
        return self.encoder.config.num_mel_bins

    def trained_modules(self, k: int) -> list[nn.Module]:
        mods = super().trained_modules(k)
        if k and self.final_norm:  # else unused: the adapter holds the LayerNorm
            mods.append(self.encoder.layer_norm)
        return mods

    @classmethod
    def front_end(cls, config, folder=None) -> LogMelFrontEnd:
        return LogMelFrontEnd(n_mels=config.num_mel_bins, max_frames=cls.max_frames_of(config))

    @classmethod
    def max_frames_of(cls, config) -> int | None:
        return int(config.max_source_positions)

    @classmethod
    def limit_note(cls, config) -> str:
        n = cls.max_frames_of(config)
        return f"the encoder's max_source_positions = {n} (x 2 / 100 = {n * 2 / 100:g} s)"

    @classmethod
    def build(cls, config) -> nn.Module:
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder(config)

    @classmethod
    def from_folder(cls, folder: str) -> nn.Module:
        import transformers

        return transformers.WhisperForConditionalGeneration.from_pretrained(folder).get_encoder()

    def packed(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        enc = self.encoder
        for i, m in enumerate(features):
            if m.dim() != 2 or m.shape[0] != self.num_mel_bins:
                raise ValueError(f"clip {i}: log-mel must be [{self.num_mel_bins}, T], got {tuple(m.shape)}")
        out_lengths = self.check_lengths(features)
        lengths = [m.shape[-1] for m in features]
        if not features:
            return torch.zeros(0, self.d_model, device=enc.conv1.weight.device), []
        device, dtype = enc.conv1.weight.device, enc.conv1.weight.dtype
        x = torch.nn.utils.rnn.pad_sequence([m.T for m in features], batch_first=True).transpose(1, 2)
        x = nn.functional.gelu(enc.conv1(x.to(dtype)))
        # host-built index tensors, copied without a sync
        keep = host_to(torch.arange(x.shape[-1])[None, :] < torch.tensor(lengths)[:, None], device)
        x = x * keep[:, None, :].to(x.dtype)  # conv2 must see zeros past each clip's end
        x = nn.functional.gelu(enc.conv2(x)).transpose(1, 2)
        n = x.shape[1]
        x = x + enc.embed_positions(torch.arange(n, device=device))  # a module call: ZeRO-3 safe
        x = nn.functional.dropout(x, p=enc.dropout, training=enc.training)
        # pack: the clips' own frames back to back, one sequence each (clip i's frame t is row
        # i * n + t of the padded batch)
        lens = torch.tensor(out_lengths)
        shift = torch.repeat_interleave(torch.arange(len(features)) * n - (torch.cumsum(lens, 0) - lens), lens)
        rows = torch.arange(sum(out_lengths)) + shift
        x = x.reshape(-1, x.shape[-1]).index_select(0, host_to(rows, device))[None]
        bounds = [0]
        for k in out_lengths:
            bounds.append(bounds[-1] + k)
        cu = host_to(torch.tensor(bounds, dtype=torch.int32), device)
        packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(out_lengths),
                      max_length_k=max(out_lengths), mtbi_bounds=tuple(bounds))
        for layer in enc.layers:  # trained top layers may be float32 below frozen bf16 ones
            x = layer(x.to(layer.fc1.weight.dtype), None, **packed)
        if self.final_norm:
            x = enc.layer_norm(x.to(enc.layer_norm.weight.dtype))
        return x[0], out_lengths

    def flops(self, lengths: list[int], trained_layers: int) -> int:
        """conv1 2 x 3 x n_mels x d x T, conv2 2 x 3 x d^2 x n, each layer 2 x (4 d^2 + 2 d ffn) x n
        + 4 d n^2 (T mel frames, n = ceil(T / 2) frames); a trained layer 3x (forward + backward)."""
        cfg = self.encoder.config
        d, ffn, layers = cfg.d_model, cfg.encoder_ffn_dim, cfg.encoder_layers
        trained = min(trained_layers, layers)
        conv = layer = 0
        for t in lengths:
            n = self.front.frames(t)
            conv += 2 * 3 * cfg.num_mel_bins * d * t + 2 * 3 * d * d * n
            layer += 2 * (4 * d * d + 2 * d * ffn) * n + 4 * d * n * n
        return conv + (layers - trained) * layer + trained * 3 * layer


# ---------------------------------------------------------------------------------------------
# wav2vec2 / HuBERT / WavLM


class WaveformSpeechEncoder(SpeechEncoder):
    """A transformers ``AutoModel`` speech encoder on raw waveforms (wav2vec2, HuBERT, WavLM).

    With layer-normalized convolutions (``feat_extract_norm: layer``, the large models) the clips
    run as one zero-padded batch with an attention mask: the convolutions have no padding and the
    positional convolution sees zeros past each clip's end, as alone. Group-normalized ones
    (``group``, the base models) normalize over the whole padded length, so each clip runs alone."""

    family = "waveform"
    model_types = ("wav2vec2", "hubert", "wavlm")

    def __init__(self, encoder: nn.Module, front: FrontEnd | None = None):
        super().__init__(encoder, front or self.front_end(encoder.config))

    @property
    def d_model(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.encoder.layers

    def trained_modules(self, k: int) -> list[nn.Module]:
        mods = super().trained_modules(k)
        if k and getattr(self.encoder.config, "do_stable_layer_norm", False):
            mods.append(self.encoder.encoder.layer_norm)  # pre-norm layers: the final LayerNorm follows them
        return mods

    @classmethod
    def front_end(cls, config, folder=None) -> WaveformFrontEnd:
        normalize = getattr(config, "do_normalize", None)
        pre = Path(folder) / "preprocessor_config.json" if folder is not None else None
        if normalize is None and pre is not None and pre.is_file():
            normalize = json.loads(pre.read_text()).get("do_normalize")
        return WaveformFrontEnd(conv=tuple(zip(config.conv_kernel, config.conv_stride)),
                                normalize=True if normalize is None else bool(normalize))

    @classmethod
    def build(cls, config) -> nn.Module:
        import transformers

        return transformers.AutoModel.from_config(config)

    @classmethod
    def from_folder(cls, folder: str) -> nn.Module:
        import transformers

        return transformers.AutoModel.from_pretrained(folder)

    def packed(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        for i, f in enumerate(features):
            if f.dim() != 1:
                raise ValueError(f"clip {i}: a waveform encoder takes waveforms [T], got {tuple(f.shape)}")
        out_lengths = self.check_lengths(features)
        model = self.encoder
        weight = model.feature_extractor.conv_layers[0].conv.weight
        if not features:
            return torch.zeros(0, self.d_model, device=weight.device), []
        device, dtype = weight.device, weight.dtype
        if model.config.feat_extract_norm == "group":
            states = [model(host_to(f, device).to(dtype)[None]).last_hidden_state[0] for f in features]
        else:
            lengths = [f.shape[0] for f in features]
            x = torch.nn.utils.rnn.pad_sequence([host_to(f, device) for f in features], batch_first=True)
            mask = host_to(torch.arange(x.shape[1])[None, :] < torch.tensor(lengths)[:, None], device)
            h = model(x.to(dtype), attention_mask=mask.long()).last_hidden_state
            states = [h[i, :n] for i, n in enumerate(out_lengths)]
        for i, (s, n) in enumerate(zip(states, out_lengths)):
            if s.shape[0] != n:
                raise ValueError(f"clip {i}: the encoder gave {s.shape[0]} frames, its front end says {n}")
        return torch.cat(states), out_lengths

    def flops(self, lengths: list[int], trained_layers: int) -> int:
        """Each convolution 2 x kernel x c_in x c_out per output step, the projection 2 x c x d,
        the positional convolution 2 x K x d^2 / groups, each layer 2 x (4 d^2 + 2 d ffn) + 4 d n
        per frame; a trained layer 3x."""
        cfg = self.encoder.config
        d, ffn, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        trained = min(trained_layers, layers)
        dims = [1, *cfg.conv_dim]
        conv = layer = 0
        for t in lengths:
            steps = t
            for (k, s), c_in, c_out in zip(self.front.conv, dims[:-1], dims[1:]):
                steps = (steps - k) // s + 1
                conv += 2 * k * c_in * c_out * steps
            n = steps
            conv += 2 * dims[-1] * d * n + 2 * cfg.num_conv_pos_embeddings * d * d // cfg.num_conv_pos_embedding_groups * n
            layer += 2 * (4 * d * d + 2 * d * ffn) * n + 4 * d * n * n
        return conv + (layers - trained) * layer + trained * 3 * layer


ENCODER_FAMILIES: dict[str, type[SpeechEncoder]] = {
    t: cls for cls in (WhisperSpeechEncoder, WaveformSpeechEncoder) for t in cls.model_types}


# ---------------------------------------------------------------------------------------------
# from a model source


def encoder_class(config) -> type[SpeechEncoder]:
    """The family of a transformers config (its ``model_type``); a clear error for any other."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ENCODER_FAMILIES:
        raise ValueError(f"model.encoder: a {model_type!r} model is not a supported speech encoder "
                         f"(supported: {', '.join(sorted(ENCODER_FAMILIES))})")
    return ENCODER_FAMILIES[model_type]


def tiny_encoder_config(overrides: dict | None):
    """The transformers config of a ``{tiny: {...}}`` encoder source: Whisper-shaped
    (``TINY_ENCODER``), or another family's when ``model_type`` names one (``TINY_WAVEFORM``)."""
    import transformers

    spec = dict(overrides or {})
    model_type = spec.pop("model_type", "whisper")
    if model_type == "whisper":
        return transformers.WhisperConfig(**{**TINY_ENCODER, **spec})
    if ENCODER_FAMILIES.get(model_type) is WaveformSpeechEncoder:
        return transformers.AutoConfig.for_model(model_type, **{**TINY_WAVEFORM, **spec})
    raise ValueError(f"model.encoder.tiny.model_type must be one of {', '.join(sorted(ENCODER_FAMILIES))}, "
                     f"got {model_type!r}")


def encoder_source_config(source: dict):
    """(transformers config, local folder or None) of an encoder source, without loading weights
    (a hub id is resolved to its cached snapshot)."""
    import transformers

    kind, value, revision = parse_source(source, "encoder")
    if kind == "tiny":
        return tiny_encoder_config(value), None
    folder = source_folder(kind, value, revision)
    return transformers.AutoConfig.from_pretrained(folder), Path(folder)


def load_encoder(source: dict, seed: int = 0) -> SpeechEncoder:
    """The ``SpeechEncoder`` of a model source (random init seeded by ``seed`` for ``tiny``)."""
    config, folder = encoder_source_config(source)
    cls = encoder_class(config)
    if folder is None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            module = cls.build(config)
    else:
        module = cls.from_folder(str(folder))
    return cls(module, cls.front_end(module.config, folder))


def meta_encoder(config) -> SpeechEncoder:
    """A ``SpeechEncoder`` of ``config`` on the meta device (sizes only, no memory)."""
    cls = encoder_class(config)
    with torch.device("meta"):
        module = cls.build(config)
    return cls(module, cls.front_end(config))


def max_audio_seconds(model_config: dict) -> tuple[float, str]:
    """The longest clip a model takes, and why, from its config (a run config's ``model``
    section), without building it: the smaller of ``max_audio_seconds`` (default 30) and the
    encoder's own limit (``SpeechEncoder.limit_note``: Whisper's position table). The encoder's
    config is read from the tiny defaults or the model folder's ``config.json``; a hub id is not
    read (no network)."""
    import transformers

    limit = float(model_config.get("max_audio_seconds", 30.0))
    why = f"model.max_audio_seconds = {limit:g}"
    kind, value, _ = parse_source(model_config.get("encoder") or {"tiny": {}}, "encoder")
    if kind == "hub":
        return limit, why
    if kind == "tiny":
        config = tiny_encoder_config(value)
    else:
        cfg = source_config(kind, value, "encoder")[1]
        if cfg.get("model_type") not in ENCODER_FAMILIES:
            return limit, why
        config = transformers.AutoConfig.for_model(**cfg)
    cls = encoder_class(config)
    own = cls.front_end(config).max_seconds
    if own < limit:
        limit, why = own, cls.limit_note(config)
    return limit, why


def host_to(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``. A host tensor headed for a GPU goes through pinned memory without
    blocking: no host sync, and the copy is ordered before the kernels that read it."""
    device = torch.device(device)
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)
