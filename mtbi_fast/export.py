"""A trained run as a transformers model folder that loads without mtbi-fast (``mtbi-fast export``).

    export("runs/my-run", "exported/my-model", merge_lora=True, dtype="bfloat16")

    # anywhere with torch + transformers (docs/export.md):
    model = AutoModel.from_pretrained("exported/my-model", trust_remote_code=True)

The folder holds ``config.json`` (``MtbiSpeechConfig``, with the encoder's and the LLM's configs
inside and an ``auto_map`` naming the two code files beside it), the whole model in safetensors
(encoder, adapter, LLM: frozen and trained parts alike), the tokenizer with its chat template,
Whisper's feature extractor, a generation config (greedy, as ``mtbi-fast infer``), and a model card
(``README.md``) naming the base models and their licenses, the training config, the data
fingerprint and the run's evaluation table. It is written under a temporary name beside the
target and renamed when complete.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from .fetch import MODELS

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
MAX_NEW_TOKENS = 64  # the exported generation config's default, as SpeechLLM.generate


def model_folder(path: str | Path) -> Path:
    """A run folder's ``final/``, or ``path`` itself when it is a ``save_pretrained`` folder."""
    folder = Path(path)
    return folder / "final" if (folder / "final" / "config.json").is_file() else folder


EXPORT_AS = ("mtbi", "audioflamingo3")


def export(run: str | Path, out: str | Path, *, merge_lora: bool = False, dtype: str = "float32",
           overwrite: bool = False, eval_report: str | Path | None = None, as_: str = "mtbi") -> Path:
    """Write ``run`` (a run folder or a ``save_pretrained`` folder) to ``out`` as a transformers
    model folder; returns ``out``. ``merge_lora``: fold LoRA adapters into the LLM's weights
    (otherwise they stay peft adapters, and loading needs peft). ``eval_report``: an ``eval.md``
    for the model card (default: the run folder's ``eval/eval.md`` or ``eval.md`` when present).
    Refuses a non-empty ``out`` unless ``overwrite``. ``as_="audioflamingo3"``: transformers' own
    ``AudioFlamingo3ForConditionalGeneration`` layout, no remote code (a run trained with
    ``model.adapter.kind: audioflamingo3``; LoRA is merged)."""
    from .model import SpeechLLM

    run, out = Path(run), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if as_ not in EXPORT_AS:
        raise ValueError(f"--as must be one of {', '.join(EXPORT_AS)}, got {as_!r}")
    source = model_folder(run)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{run} is neither a run folder with final/ nor a save_pretrained "
                                f"folder (no config.json)")
    _check_target(out, overwrite)
    model = SpeechLLM.from_pretrained(source).eval()
    if as_ == "audioflamingo3":
        hf, processor = build_audioflamingo3(model, dtype=DTYPES[dtype])
    else:
        hf, processor = build_hf_model(model, merge_lora=merge_lora, dtype=DTYPES[dtype]), None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        hf.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        else:
            _save_processing(model, tmp)
        report = _eval_report(run, eval_report)
        (tmp / "README.md").write_text(model_card(model, hf, run, source, report, dtype), encoding="utf-8")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def build_hf_model(model, *, merge_lora: bool = False, dtype: torch.dtype = torch.float32):
    """The ``MtbiSpeechForConditionalGeneration`` holding ``model``'s weights (a ``SpeechLLM``),
    built on the meta device and filled with them (no random initialization, no second copy)."""
    from .hf_code.configuration_mtbi_speech import MtbiSpeechConfig
    from .hf_code.modeling_mtbi_speech import MtbiSpeechForConditionalGeneration

    llm = model.llm
    lora = None
    if model.config.lora:
        if merge_lora:
            llm = llm.merge_and_unload()
        else:
            lora = lora_arguments(model.config.lora)
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    text_config = portable_config(base.config)
    encoder_config = portable_config(model.encoder.encoder.config)
    adapter = {"kind": model.adapter.kind, "stride": model.adapter.stride,
               "hidden": model.adapter.proj[-1].in_features}
    config = MtbiSpeechConfig(encoder_config=encoder_config, text_config=text_config, adapter=adapter,
                              lora=lora, max_audio_seconds=model.config.max_audio_seconds,
                              dtype=str(dtype).removeprefix("torch."))
    state = {}
    for key, value in model.encoder.encoder.state_dict().items():
        state[f"encoder.{key}"] = value
    for key, value in model.adapter.state_dict().items():
        state[f"adapter.{key}"] = value
    for key, value in llm.state_dict().items():
        state[f"language_model.{key}"] = value
    state = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach() for k, v in state.items()}
    with torch.device("meta"):
        hf = MtbiSpeechForConditionalGeneration(config)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"the export's layout does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    hf.tie_weights()
    hf.generation_config = generation_config(llm, model.tokenizer)
    MtbiSpeechConfig.register_for_auto_class()
    MtbiSpeechForConditionalGeneration.register_for_auto_class("AutoModel")
    return hf.eval()


AUDIO_TOKEN = "<sound>"  # AudioFlamingo3Processor's placeholder


def build_audioflamingo3(model, *, dtype: torch.dtype = torch.float32):
    """(``AudioFlamingo3ForConditionalGeneration``, ``AudioFlamingo3Processor``) holding a
    ``SpeechLLM`` trained with the ``audioflamingo3`` adapter: the Whisper layers as its audio tower
    (the adapter's LayerNorm as the tower's final one), the adapter's MLP as its projector, the LLM
    (LoRA merged) as its language model and head. The tokenizer gains the ``<sound>`` token (a new
    embedding row, zero, and a head row the generation config suppresses) unless it has one."""
    from transformers import (AudioFlamingo3Config, AudioFlamingo3EncoderConfig,
                              AudioFlamingo3ForConditionalGeneration, AudioFlamingo3Processor,
                              WhisperFeatureExtractor)

    if model.adapter.kind != "audioflamingo3":
        raise ValueError(f"--as audioflamingo3 needs a run trained with model.adapter.kind: audioflamingo3 "
                         f"(AudioFlamingo3's pooling and projector); this run's adapter is {model.adapter.kind!r}: "
                         f"export it without --as")
    llm = model.llm.merge_and_unload() if model.config.lora else model.llm
    tokenizer = copy.deepcopy(model.tokenizer)
    if AUDIO_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO_TOKEN]})
    audio_token_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    enc = model.encoder.encoder.config
    audio_config = AudioFlamingo3EncoderConfig(
        num_mel_bins=enc.num_mel_bins, hidden_size=enc.d_model, num_hidden_layers=enc.encoder_layers,
        num_attention_heads=enc.encoder_attention_heads, intermediate_size=enc.encoder_ffn_dim,
        activation_function=enc.activation_function, max_source_positions=enc.max_source_positions,
        scale_embedding=bool(getattr(enc, "scale_embedding", False)))
    text_config = portable_config(llm.config)
    vocab = llm.get_input_embeddings().weight.shape[0]
    rows = max(vocab, audio_token_id + 1)
    text_config["vocab_size"] = rows
    config = AudioFlamingo3Config(audio_config=audio_config, text_config=text_config, audio_token_id=audio_token_id,
                                  projector_hidden_act="gelu", projector_bias=True,
                                  dtype=str(dtype).removeprefix("torch."))
    state = {}
    for key, value in model.encoder.encoder.state_dict().items():
        if not key.startswith("layer_norm."):  # unused: the adapter applies it after pooling
            state[f"model.audio_tower.{key}"] = value
    for key, value in model.adapter.norm.state_dict().items():
        state[f"model.audio_tower.layer_norm.{key}"] = value
    for i, name in ((0, "linear_1"), (2, "linear_2")):
        for key, value in model.adapter.proj[i].state_dict().items():
            state[f"model.multi_modal_projector.{name}.{key}"] = value
    body = llm.get_decoder() if hasattr(llm, "get_decoder") else llm.model
    for key, value in body.state_dict().items():
        state[f"model.language_model.{key}"] = value
    head = llm.get_output_embeddings().weight
    state["lm_head.weight"] = head
    if llm.get_output_embeddings().bias is not None:
        raise ValueError("AudioFlamingo3's head has no bias; this LLM's has one: export it without --as")
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        w = state[key]
        if rows > w.shape[0]:
            state[key] = torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])
    state = {k: v.detach().to(dtype).clone() if v.is_floating_point() else v.detach() for k, v in state.items()}
    with torch.device("meta"):
        hf = AudioFlamingo3ForConditionalGeneration(config)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"the AudioFlamingo3 layout does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    gen = generation_config(llm, tokenizer)
    gen.suppress_tokens = [audio_token_id]
    hf.generation_config = gen
    processor = AudioFlamingo3Processor(WhisperFeatureExtractor(feature_size=enc.num_mel_bins), tokenizer,
                                        chat_template=getattr(tokenizer, "chat_template", None), audio_token=AUDIO_TOKEN)
    return hf.eval(), processor


def portable_config(config) -> dict:
    """A transformers config as a dict without the attention implementation (mtbi-fast's own
    names mean nothing elsewhere) or the dtype (the export's ``--dtype`` sets it)."""
    out = config.to_dict()
    for key in ("_attn_implementation", "_attn_implementation_internal", "attn_implementation",
                "torch_dtype", "dtype"):
        out.pop(key, None)
    return out


def lora_arguments(lora: dict) -> dict:
    """The peft ``LoraConfig`` arguments a run used (its ``model.lora`` over mtbi-fast's defaults)."""
    from .model import LORA_DEFAULTS

    return {**LORA_DEFAULTS, **lora}


def generation_config(llm, tokenizer):
    """Greedy decoding with the LLM's end-of-answer tokens, as ``SpeechLLM.generate`` decodes."""
    from transformers import GenerationConfig

    own = getattr(llm, "generation_config", None)
    eos = getattr(own, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bos = getattr(own, "bos_token_id", None)
    return GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos,
                            pad_token_id=pad, bos_token_id=bos)


def _save_processing(model, folder: Path) -> None:
    """The tokenizer and the encoder's feature extractor: Whisper's, or wav2vec2's for a waveform
    encoder (normalizing as the run's front end does)."""
    from transformers import Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

    model.tokenizer.save_pretrained(folder)
    if model.front.spectral:
        WhisperFeatureExtractor(feature_size=model.encoder.num_mel_bins).save_pretrained(folder)
    else:
        Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                 do_normalize=model.front.normalize, return_attention_mask=True
                                 ).save_pretrained(folder)


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")


def _replace(tmp: Path, out: Path) -> None:
    """``tmp`` renamed to ``out``; an old ``out`` is moved aside first and removed after."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


# ---------------------------------------------------------------------------------------------
# the model card


def _eval_report(run: Path, given: str | Path | None) -> str | None:
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"--eval-report: {path} not found")
        return path.read_text(encoding="utf-8")
    for path in (run / "eval" / "eval.md", run / "eval.md"):
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return None


def base_model(source: dict) -> tuple[str, str]:
    """(what a model source is, its license) for the model card."""
    from .hub import parse_source

    kind, value, revision = parse_source(source)
    if kind == "tiny":
        return "a random tiny model (tests)", "none (random weights)"
    if kind == "name":
        spec = MODELS.get(value, {})
        return f"`{value}`: {spec.get('about', 'converted by mtbi-fast models fetch')}", spec.get("license", "unknown")
    if kind == "hub":
        at = f" at `{revision}`" if revision else ""
        return f"[{value}](https://huggingface.co/{value}){at}", "see the model's page"
    record = Path(value) / "mtbi_fast_source.json"
    lic = "see the model's folder"
    if record.is_file():
        try:
            lic = json.loads(record.read_text()).get("license", lic)
        except ValueError:
            pass
    return f"a local folder (`{Path(value).name}`)", lic


def model_card(model, hf, run: Path, source: Path, report: str | None, dtype: str) -> str:
    """The exported folder's README.md."""
    cfg = model.config
    enc, enc_license = base_model(cfg.encoder)
    llm, llm_license = base_model(cfg.llm)
    licenses = sorted({x for x in (enc_license, llm_license) if x and not x.startswith(("none", "see", "unknown"))})
    record_path = run / "run.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    config_path = run / "config.yaml"
    config_text = config_path.read_text() if config_path.is_file() else yaml.safe_dump(
        {"model": cfg.to_dict()}, sort_keys=False)
    n_params = sum(p.numel() for p in hf.parameters())
    af3 = hf.config.model_type == "audioflamingo3"
    tags = "[speech, mtbi, mtbi-fast, audioflamingo3]" if af3 else "[speech, mtbi, mtbi-fast, custom_code]"
    lines = ["---", "library_name: transformers", "pipeline_tag: audio-text-to-text", f"tags: {tags}"]
    if len(licenses) == 1:
        lines.append(f"license: {licenses[0].lower()}")
    lora = "none" if not cfg.lora else ("kept as peft adapters (needs peft)" if getattr(hf.config, "lora", None)
                                        else "merged into the LLM")
    lines += ["---", "", f"# {run.resolve().name}", "",
              "A speech LLM trained with MTBI (multi-task behavior imitation) by mtbi-fast: a Whisper "
              "encoder, an adapter, and a causal LM that answers prompts about the speech.", "",
              "| part | base model | license |", "|---|---|---|",
              f"| speech encoder | {enc} | {enc_license} |",
              f"| LLM | {llm} | {llm_license} |",
              f"| adapter | {model.adapter.kind}, stride {model.adapter.stride} (trained) | - |", "",
              f"{n_params / 1e6:.1f} M parameters in {dtype}; LoRA {lora}.", "", "## Use", ""]
    if af3:
        lines += ["transformers' own `AudioFlamingo3ForConditionalGeneration` (no remote code). mtbi-fast "
                  "trained the encoder at each clip's true length; this class pads every clip to 30 s "
                  "with a mask, which changes the last frames a little (docs/export.md in mtbi-fast).", "",
                  "```python", "from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor", "",
                  'model = AudioFlamingo3ForConditionalGeneration.from_pretrained("PATH")',
                  'processor = AutoProcessor.from_pretrained("PATH")',
                  "# the prompt in the chat template, <sound> where the speech goes; wave: 16 kHz mono",
                  'inputs = processor(text=[prompt_with_sound], audio=[wave])',
                  "answer = model.generate(**inputs)", "```", ""]
    else:
        lines += ["```python", "from transformers import AutoFeatureExtractor, AutoModel, AutoTokenizer", "",
                  'model = AutoModel.from_pretrained("PATH", trust_remote_code=True)',
                  'tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)',
                  'features = AutoFeatureExtractor.from_pretrained("PATH")',
                  "# wave: a 16 kHz mono waveform; {speech} marks where it goes (at the end when absent)",
                  'print(model.answer([wave], ["Summarize what the speaker says: {speech}"], tokenizer, features))',
                  "```", ""]
    if report:
        lines += ["## Evaluation", "", report.strip(), ""]
    else:
        lines += ["## Evaluation", "", "No evaluation was found in the run folder (`mtbi-fast eval "
                  "--model RUN -o RUN/eval` writes one).", ""]
    data = record.get("data") or {}
    if data:
        lines += ["## Training data (fingerprint)", "", "| input | sha256 |", "|---|---|"]
        lines += [f"| {k} | `{v}` |" for k, v in sorted(data.items())]
        lines.append("")
    lines += ["## Training config", "", "```yaml", config_text.strip(), "```", ""]
    return "\n".join(lines)


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload an exported folder to the model repo ``repo_id`` (created when missing); returns
    the repo's URL. Needs ``huggingface_hub`` and a login (``hf auth login`` or ``HF_TOKEN``)."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ImportError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from None
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not an exported model folder (no config.json)")
    api = HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="mtbi-fast export")
    return str(url)
