"""The configuration of an mtbi-fast speech LLM exported for transformers (``mtbi-fast export``).

This file is copied into the exported folder: it imports transformers only, never mtbi_fast.
"""

from transformers import CONFIG_MAPPING, PretrainedConfig


class MtbiSpeechConfig(PretrainedConfig):
    """A speech encoder at the clip's true length, an adapter, and a causal LM.

    - ``encoder_config``: the encoder's config (as a dict or config): a ``WhisperConfig``, or a
      wav2vec2 / HuBERT / WavLM config;
    - ``text_config``: the LLM's config (any transformers causal LM);
    - ``adapter``: ``{"kind": "stack" | "conv", "stride": 4, "hidden": None}``;
    - ``lora``: peft ``LoraConfig`` arguments when the LLM keeps its LoRA adapters unmerged;
    - ``audio_token_id``: the placeholder id a run of which in ``input_ids`` marks where a clip's
      speech frames go (the LLM's vocabulary size: no text token has it).
    """

    model_type = "mtbi_speech"

    def __init__(self, encoder_config=None, text_config=None, adapter=None, lora=None,
                 max_audio_seconds: float = 30.0, audio_token_id: int | None = None, **kwargs):
        self.encoder_config = _config(encoder_config, "whisper")
        self.text_config = _config(text_config, "llama")
        self.adapter = {"kind": "stack", "stride": 4, "hidden": None, **(adapter or {})}
        self.lora = lora
        self.max_audio_seconds = float(max_audio_seconds)
        self.audio_token_id = self.text_config.vocab_size if audio_token_id is None else audio_token_id
        super().__init__(**kwargs)


def _config(value, default_type: str):
    if value is None:
        return CONFIG_MAPPING[default_type]()
    if isinstance(value, dict):
        value = dict(value)
        return CONFIG_MAPPING[value.pop("model_type", default_type)](**value)
    return value
