"""An mtbi-fast speech LLM as a transformers model (``mtbi-fast export``).

This file is copied into the exported folder and loaded with ``trust_remote_code=True``: it
imports torch and transformers only (peft too, for a LoRA left unmerged), never mtbi_fast.

    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    features = AutoFeatureExtractor.from_pretrained(folder)
    print(model.answer([wave_16khz], ["Summarize what the speaker says."], tokenizer, features))

The speech of each clip goes where a run of ``config.audio_token_id`` stands in ``input_ids``
(``prepare_inputs`` builds them from a prompt with ``{speech}``, inside the tokenizer's chat
template). The speech encoder (Whisper, or a wav2vec2 / HuBERT / WavLM model) runs each clip at
its true length (no padding to 30 s), as mtbi-fast trained it; its features are what the folder's
feature extractor gives for the clip alone (Whisper's log-mel, or the normalized waveform).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from .configuration_mtbi_speech import MtbiSpeechConfig

SPEECH = "{speech}"
SAMPLE_RATE = 16000
HOP_LENGTH = 160


def chat_halves(tokenizer, prompt: str, marker: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted ``prompt`` before and after ``marker`` (exactly once);
    without a chat template the prompt is ``User: ...\\nAssistant:``."""
    if prompt.count(marker) > 1:
        raise ValueError(f"the prompt has {marker} {prompt.count(marker)} times; it marks the one "
                         f"place the utterance goes: {prompt!r}")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = f"User: {prompt}\nAssistant:"
    if marker not in text:
        raise ValueError(f"the prompt has no {marker} to put the utterance in: {prompt!r}")
    first, second = text.split(marker, 1)
    return ([int(i) for i in tokenizer(first, add_special_tokens=False)["input_ids"]],
            [int(i) for i in tokenizer(second, add_special_tokens=False)["input_ids"]])


ADAPTER_KINDS = ("stack", "conv", "audioflamingo3")


def adapter_frames(n_encoder_frames: int, stride: int, kind: str) -> int:
    """LLM speech frames an adapter gives ``n_encoder_frames`` encoder frames: ceil(T / stride)
    (``stack``, ``conv``: a clip is padded to a multiple of the stride), or floor(T / 2) for
    ``audioflamingo3`` (average pooling of frame pairs; an odd last frame is dropped)."""
    if kind == "audioflamingo3":
        return n_encoder_frames // 2
    return math.ceil(n_encoder_frames / stride)


class MtbiSpeechAdapter(nn.Module):
    """Encoder frames [T, d_enc] -> LLM frames [adapter_frames(T), d_llm]:

    - ``stack``: ``stride`` consecutive frames stacked into a 2-layer MLP;
    - ``conv``: a strided convolution before the MLP;
    - ``audioflamingo3``: transformers' AudioFlamingo3 layout: frame pairs average-pooled, then the
      encoder's final LayerNorm (``norm``, here after the pooling), then a 2-layer MLP to the LLM's
      width (``hidden`` is the LLM's width; the encoder runs without its own final LayerNorm).

    A ``stack`` / ``conv`` clip is padded with zero frames to a multiple of ``stride``."""

    def __init__(self, d_enc: int, d_llm: int, stride: int = 4, hidden: int | None = None,
                 kind: str = "stack"):
        super().__init__()
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter kind must be one of {', '.join(ADAPTER_KINDS)}, got {kind!r}")
        self.stride, self.kind = stride, kind
        if kind == "audioflamingo3":
            if stride != 2 or hidden not in (None, d_llm):
                raise ValueError("the audioflamingo3 adapter pools frame pairs into an MLP as wide as the "
                                 f"LLM: stride 2 and hidden {d_llm} (or unset), got stride {stride}, hidden {hidden}")
            self.norm = nn.LayerNorm(d_enc)
            self.proj = nn.Sequential(nn.Linear(d_enc, d_llm), nn.GELU(), nn.Linear(d_llm, d_llm))
            return
        hidden = hidden or d_llm
        if kind == "stack":
            self.proj = nn.Sequential(nn.Linear(stride * d_enc, hidden), nn.GELU(), nn.Linear(hidden, d_llm))
        else:
            self.conv = nn.Conv1d(d_enc, d_enc, kernel_size=stride, stride=stride)
            self.proj = nn.Sequential(nn.GELU(), nn.Linear(d_enc, hidden), nn.GELU(), nn.Linear(hidden, d_llm))

    @classmethod
    def from_settings(cls, d_enc: int, d_llm: int, settings: dict):
        """The adapter of a run's ``model.adapter`` mapping (kind, stride, hidden; the stride
        defaults to 2 for ``audioflamingo3``, else 4)."""
        kind = settings.get("kind", "stack")
        return cls(d_enc, d_llm, stride=settings.get("stride", 2 if kind == "audioflamingo3" else 4),
                   hidden=settings.get("hidden"), kind=kind)

    @property
    def encoder_final_norm(self) -> bool:
        """Whether the encoder applies its own final LayerNorm before this adapter."""
        return self.kind != "audioflamingo3"

    def n_frames(self, n_encoder_frames: int) -> int:
        return adapter_frames(n_encoder_frames, self.stride, self.kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.proj[-1].weight.dtype)
        if self.kind == "audioflamingo3":
            pairs = x[: x.shape[0] // 2 * 2].reshape(-1, 2, x.shape[1]).mean(1)
            return self.proj(self.norm(pairs))
        extra = -x.shape[0] % self.stride
        if extra:
            x = torch.cat([x, x.new_zeros(extra, x.shape[1])])
        if self.kind == "stack":
            return self.proj(x.reshape(-1, self.stride * x.shape[1]))
        return self.proj(self.conv(x.T[None])[0].T)


def speech_encoder(config) -> nn.Module:
    """The encoder module of ``config``: Whisper's encoder, or a waveform model (``AutoModel``)."""
    if config.model_type == "whisper":
        return WhisperEncoder(config)
    return AutoModel.from_config(config)


class MtbiSpeechForConditionalGeneration(PreTrainedModel):
    """Speech encoder (true length) -> adapter -> causal LM. ``forward`` returns the LLM's
    output (``logits``); ``generate`` decodes from the same inputs; ``answer`` goes from
    waveforms and prompts to text."""

    config_class = MtbiSpeechConfig
    base_model_prefix = "mtbi_speech"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: MtbiSpeechConfig):
        super().__init__(config)
        self.encoder = speech_encoder(config.encoder_config)
        self.waveform = config.encoder_config.model_type != "whisper"
        a = config.adapter
        d_enc = config.encoder_config.hidden_size if self.waveform else config.encoder_config.d_model
        self.adapter = MtbiSpeechAdapter(d_enc, config.text_config.hidden_size,
                                         stride=a["stride"], hidden=a.get("hidden"), kind=a["kind"])
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        if config.lora:
            try:
                import peft
            except ImportError:
                raise ImportError("this model keeps LoRA adapters unmerged: pip install peft "
                                  "(or export it with --merge-lora)") from None
            self.language_model = peft.get_peft_model(
                self.language_model, peft.LoraConfig(task_type="CAUSAL_LM", **config.lora))
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from the checkpoint

    @classmethod
    def can_generate(cls) -> bool:  # generate() delegates to the LLM: generation_config.json is ours
        return True

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    # -- speech ------------------------------------------------------------------------------

    def n_frames(self, n_steps: int) -> int:
        """Speech frames (LLM positions) of a clip whose features have ``n_steps`` time steps
        (log-mel frames, or samples for a waveform encoder)."""
        if self.waveform:
            return self.adapter.n_frames(int(self.encoder._get_feat_extract_output_lengths(torch.tensor(n_steps))))
        return self.adapter.n_frames(math.ceil(n_steps / 2))

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """One clip's features -> encoder states: a log-mel [n_mels, T] -> Whisper's states
        [ceil(T / 2), d_model] (without the final LayerNorm when the adapter applies it after
        pooling); a waveform [T] -> the waveform model's last hidden states."""
        if self.waveform:
            weight = next(self.encoder.parameters())
            if mel.dim() != 1:
                raise ValueError(f"a clip's waveform must be [T], got {tuple(mel.shape)}")
            return self.encoder(mel[None].to(weight.dtype)).last_hidden_state[0]
        enc = self.encoder
        limit = enc.embed_positions.num_embeddings
        if mel.dim() != 2 or mel.shape[0] != enc.config.num_mel_bins:
            raise ValueError(f"a clip's log-mel must be [{enc.config.num_mel_bins}, T], got {tuple(mel.shape)}")
        if math.ceil(mel.shape[1] / 2) > limit:
            raise ValueError(f"a clip of {mel.shape[1]} mel frames is longer than the encoder's {2 * limit}")
        x = nn.functional.gelu(enc.conv1(mel[None].to(enc.conv1.weight.dtype)))
        x = nn.functional.gelu(enc.conv2(x)).transpose(1, 2)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        for layer in enc.layers:
            out = layer(x, None)
            x = out[0] if isinstance(out, tuple) else out
        return (enc.layer_norm(x) if self.adapter.encoder_final_norm else x)[0]

    def speech_frames(self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Features [B, n_mels, T] (or waveforms [B, T]), each clip at the start of its row
        (``input_features_mask`` [B, T] marks its steps, all of them when None) -> every clip's
        adapter outputs back to back [sum F_i, H]."""
        lengths = (input_features_mask.sum(-1).tolist() if input_features_mask is not None
                   else [input_features.shape[-1]] * input_features.shape[0])
        return torch.cat([self.adapter(self.encode(f[..., : int(n)])) for f, n in zip(input_features, lengths)])

    def embed_inputs(self, input_ids: torch.Tensor, input_features: torch.Tensor | None = None,
                     input_features_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The LLM's input embeddings [B, L, H]: text tokens looked up, each run of
        ``audio_token_id`` filled with its clip's speech frames in order."""
        speech = input_ids == self.config.audio_token_id
        embed = self.get_input_embeddings()
        x = embed(input_ids.masked_fill(speech, 0))
        n = int(speech.sum())
        if input_features is None:
            if n:
                raise ValueError(f"input_ids hold {n} audio positions but no input_features were given")
            return x
        frames = self.speech_frames(input_features, input_features_mask).to(x.dtype)
        if frames.shape[0] != n:
            raise ValueError(f"the clips give {frames.shape[0]} speech frames but input_ids hold {n} "
                             f"audio positions (prepare_inputs builds matching ones)")
        return x.masked_scatter(speech[..., None], frames)

    # -- running -----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                input_features: torch.Tensor | None = None, input_features_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs):
        inputs_embeds = self.embed_inputs(input_ids, input_features, input_features_mask)
        if position_ids is None and attention_mask is not None:  # left padding: positions start at 0
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 input_features: torch.Tensor | None = None, input_features_mask: torch.Tensor | None = None,
                 **generation_kwargs) -> torch.Tensor:
        """The answer tokens [B, new] (greedy unless ``generation_config`` or the keywords say)."""
        inputs_embeds = self.embed_inputs(input_ids, input_features, input_features_mask)
        config = copy.deepcopy(generation_kwargs.pop("generation_config", None) or self.generation_config)
        rest = config.update(**generation_kwargs)  # what is not a generation setting (a streamer)
        return self.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                            generation_config=config, **rest)

    def prepare_inputs(self, tokenizer, feature_extractor, audios: list, prompts: list[str]) -> dict:
        """Model inputs for ``prompts[i]`` about ``audios[i]`` (16 kHz mono waveforms): the speech
        goes where ``{speech}`` stands (at the prompt's end when absent); rows left-padded."""
        if len(audios) != len(prompts):
            raise ValueError(f"{len(audios)} audios but {len(prompts)} prompts")
        mels, rows = [], []
        for audio, prompt in zip(audios, prompts):
            wave = torch.as_tensor(audio, dtype=torch.float32).reshape(-1)
            seconds = wave.numel() / SAMPLE_RATE
            if seconds > self.config.max_audio_seconds:
                raise ValueError(f"a clip of {seconds:.2f} s is over the model's {self.config.max_audio_seconds} s")
            if self.waveform:  # the (normalized) waveform itself
                mels.append(feature_extractor(wave.numpy(), sampling_rate=SAMPLE_RATE,
                                              return_tensors="pt")["input_values"][0])
            else:
                mel = feature_extractor(wave.numpy(), sampling_rate=SAMPLE_RATE, padding="longest",
                                        return_tensors="pt")["input_features"][0]
                mels.append(mel[:, : wave.numel() // HOP_LENGTH])
            before, after = chat_halves(tokenizer, prompt if SPEECH in prompt else prompt + "\n" + SPEECH, SPEECH)
            rows.append(before + [self.config.audio_token_id] * self.n_frames(mels[-1].shape[-1]) + after)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        width, frames = max(map(len, rows)), max(m.shape[-1] for m in mels)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        feats = torch.zeros(len(mels), *mels[0].shape[:-1], frames)
        feats_mask = torch.zeros(len(mels), frames, dtype=torch.long)
        for i, (row, mel) in enumerate(zip(rows, mels)):
            ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
            feats[i, ..., : mel.shape[-1]], feats_mask[i, : mel.shape[-1]] = mel, 1
        device = self.get_input_embeddings().weight.device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                "input_features": feats.to(device), "input_features_mask": feats_mask.to(device)}

    @torch.no_grad()
    def answer(self, audios: list, prompts: list[str], tokenizer, feature_extractor, **generation_kwargs
               ) -> list[str]:
        """The decoded answers to ``prompts[i]`` about ``audios[i]`` (16 kHz waveforms)."""
        inputs = self.prepare_inputs(tokenizer, feature_extractor, audios, prompts)
        if tokenizer.pad_token_id is None:
            generation_kwargs.setdefault("pad_token_id", tokenizer.eos_token_id)
        out = self.generate(**inputs, **generation_kwargs)
        return [tokenizer.decode(o, skip_special_tokens=True) for o in out]
