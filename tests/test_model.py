"""mtbi_fast/model.py on configs/tiny.yaml: encoder at true length, forward/backward, packed vs
unpacked, save/load, generate."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mtbi_fast.audio import log_mel
from mtbi_fast.data import Word
from mtbi_fast.interleave import example_pair
from mtbi_fast.model import ModelConfig, SpeechLLM, decoding_kwargs
from mtbi_fast.packing import pack
from mtbi_fast.prompts import prompt_halves

ROOT = Path(__file__).parents[1]
TEXTS = ["the cat sat on the mat", "speech models follow new instructions well",
         "a quick brown fox jumps over the lazy dog today", "hello world"]


def tiny_config(**overrides) -> ModelConfig:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]
    cfg.update(overrides)
    return ModelConfig.from_dict(cfg)


@pytest.fixture(scope="module")
def model():
    return SpeechLLM.from_config(tiny_config())


def clip(seconds, seed):
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    x = np.sin(2 * np.pi * (150 + 50 * seed) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t))
    return torch.from_numpy((0.3 * x + 0.02 * g.standard_normal(t.size)).astype(np.float32))


def batch_for(model, ratio=0.5, seed=0, n=4, with_examples=False):
    """Student and teacher packed batches and log-mels for n synthetic utterances."""
    tok = model.tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    students, teachers, mels = [], [], []
    for i in range(n):
        text = TEXTS[i % len(TEXTS)]
        seconds = 1.5 + 0.7 * i
        wave = clip(seconds, i)
        words_ = text.split()
        step = (seconds - 0.4) / len(words_)
        words = [Word(w, 0.2 + k * step, 0.2 + (k + 0.8) * step) for k, w in enumerate(words_)]
        s, t = example_pair(f"utt{i}", words, model.n_frames(wave.numel()), model.frame_rate, ratio,
                            enc("User: summarize:"), enc("\nAssistant:"), enc(" it is about " + words_[-1]),
                            enc, generator=torch.Generator().manual_seed(seed + i))
        students.append(s)
        teachers.append(t)
        mels.append(log_mel(wave))
    out = (pack(students, 256), pack(teachers, 256), mels)
    return out + (students,) if with_examples else out


def test_encoder_output_does_not_depend_on_padding(model):
    short, long = log_mel(clip(1.3, 0)), log_mel(clip(4.1, 1))
    alone = model.encoder([short])[0]
    batched = model.encoder([long, short])[1]
    assert alone.shape == (short.shape[1] // 2 + short.shape[1] % 2, 64)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_packed_encoder_equals_transformers_at_30_seconds(model):
    """A 30 s clip has no padding at all: the packed varlen path must give what transformers'
    own WhisperEncoder (SDPA, 3000 frames) gives."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    mel = log_mel(clip(30.0, 2))[:, :3000]
    ref_enc = WhisperEncoder(model.encoder.encoder.config.__class__(
        **{**model.encoder.encoder.config.to_dict(), "_attn_implementation": "sdpa"})).eval()
    ref_enc.load_state_dict(model.encoder.encoder.state_dict())
    ref_enc.config._attn_implementation = "sdpa"
    with torch.no_grad():
        ref = ref_enc(mel[None]).last_hidden_state[0]
        ours = model.encoder([mel])[0]
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)


def test_packed_encoder_and_adapter_equal_the_padded_masked_reference():
    """Clips of mixed lengths: the packed encoder equals the padded, dense-mask reference
    (mtbi_fast.reference), and the adapter run once over all clips equals it run per clip; for
    both adapter kinds and lengths that are not multiples of the stride."""
    from mtbi_fast.reference import padded_encoder_states

    for kind in ("stack", "conv"):
        m = SpeechLLM.from_config(tiny_config(adapter={"kind": kind, "stride": 3}))
        mels = [log_mel(clip(s, i)) for i, s in enumerate((1.31, 3.07, 0.52, 2.2))]
        with torch.no_grad():
            ref = padded_encoder_states(m.encoder.encoder, mels, [m.front.frames(x.shape[1]) for x in mels])
            states = m.encoder(mels)
            frames = m.speech_frames(mels)
        assert [s.shape[0] % 3 for s in states] != [0] * 4  # some clips need padding to the stride
        for got, want in zip(states, ref):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        for got, state in zip(frames, ref):
            torch.testing.assert_close(got, m.adapter(state), atol=2e-5, rtol=2e-5)


def test_audioflamingo3_adapter_pools_pairs_then_applies_the_encoders_layernorm():
    """adapter.kind audioflamingo3: the encoder stops before its final LayerNorm; each clip's
    frame pairs are averaged (an odd last frame dropped), then LayerNorm (initialized from the
    encoder's) and the MLP, checked against a float64 hand computation; packed equals per clip."""
    from mtbi_fast.reference import padded_encoder_states

    m = SpeechLLM.from_config(tiny_config(adapter={"kind": "audioflamingo3"}))
    enc = m.encoder.encoder
    assert not m.encoder.final_norm and m.adapter.stride == 2
    torch.testing.assert_close(m.adapter.norm.weight, enc.layer_norm.weight)
    mels = [log_mel(clip(s, i)) for i, s in enumerate((1.33, 3.07, 0.52))]  # 67, 154, 26 encoder frames
    with torch.no_grad():
        ref = padded_encoder_states(enc, mels, [m.front.frames(x.shape[1]) for x in mels])  # with the LN
        states = m.encoder(mels)
        frames = m.speech_frames(mels)
    lengths = [s.shape[0] for s in states]
    assert any(n % 2 for n in lengths)
    assert [f.shape[0] for f in frames] == [n // 2 for n in lengths] == [m.adapter.n_frames(n) for n in lengths]
    a = m.adapter
    for state, want_ln, got in zip(states, ref, frames):
        # the states are the layers' output without the LayerNorm: applying it gives the reference
        torch.testing.assert_close(enc.layer_norm(state), want_ln, atol=2e-5, rtol=2e-5)
        x = state.double()[: state.shape[0] // 2 * 2].reshape(-1, 2, state.shape[1]).mean(1)
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], a.norm.weight.double(), a.norm.bias.double())
        x = torch.nn.functional.gelu(x @ a.proj[0].weight.double().T + a.proj[0].bias.double())
        x = x @ a.proj[2].weight.double().T + a.proj[2].bias.double()
        torch.testing.assert_close(got.double(), x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, m.adapter(state), atol=2e-6, rtol=2e-6)
    with pytest.raises(ValueError, match="stride 2 and hidden"):
        SpeechLLM.from_config(tiny_config(adapter={"kind": "audioflamingo3", "stride": 4}))


def test_gradient_checkpointing_recomputes_the_llm_and_gives_the_same_gradients():
    """With model.gradient_checkpointing every decoder layer runs again in backward (counted by a
    pre-hook on its MLP), also with the frozen LLM in eval mode as the trainer keeps it, and the loss
    and the adapter's gradients are those of the plain model."""
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = SpeechLLM.from_config(tiny_config(gradient_checkpointing=ckpt))
        assert not m.llm.training  # frozen: eval mode, no dropout
        calls = []
        # a pre-hook: the recomputation stops (early) inside the MLP, before a forward hook would fire
        m.llm.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        student, teacher, mels = batch_for(m, ratio=0.3)
        out = m(student, features=mels, teacher=teacher)
        before = len(calls)  # the student's pass and the online teacher's
        out["loss"].backward()
        results.append((out["loss"].detach(), [p.grad.clone() for p in m.adapter.parameters()],
                        len(calls) - before))
    (loss0, grads0, again0), (loss1, grads1, again1) = results
    assert (again0, again1) == (0, 1)  # recomputed once in backward, only with checkpointing
    torch.testing.assert_close(loss1, loss0)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    m.eval()  # (evaluate.py does this) the layers keep recomputing; nothing else trains
    assert all(layer.training for layer in m.llm.model.layers) and not m.llm.model.layers[0].self_attn.training


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Liger's kernels do not run "
                    "in Triton's CPU interpreter, and its RoPE patch is process-wide)")
def test_liger_fused_ops_match_the_plain_llm():
    """model.fused_ops=liger (Liger-Kernel's RMSNorm, RoPE, SwiGLU) gives the plain LLM's hidden
    states, in float32 on the GPU."""
    pytest.importorskip("liger_kernel")
    from mtbi_fast.model import apply_fused_ops

    m = SpeechLLM.from_config(tiny_config(fused_ops="none")).cuda()
    student, teacher, mels = batch_for(m, ratio=0.3, n=2)
    with torch.no_grad():
        plain = m.teacher_states(teacher)
        assert apply_fused_ops(m.llm, "liger") == "liger"
        assert type(m.llm.model.layers[0].mlp).__name__.startswith("Liger")
        fused = m.teacher_states(teacher)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)


def test_fused_ops_auto_is_none_without_cuda(monkeypatch):
    from mtbi_fast.model import apply_fused_ops

    m = SpeechLLM.from_config(tiny_config(fused_ops="auto"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert apply_fused_ops(m.llm, "auto") == "none" and m.fused_ops in ("none", "liger")
    m.llm.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="model.fused_ops: liger supports llama, qwen2, mistral LLMs, not 'gpt2'"):
        apply_fused_ops(m.llm, "liger")


def test_fused_ops_refuses_unknown_modes_by_name():
    with pytest.raises(ValueError, match="model.fused_ops must be one of auto, liger, compile, none"):
        tiny_config(fused_ops="fast")
    with pytest.raises(ValueError, match="model.gradient_checkpointing must be true or false"):
        tiny_config(gradient_checkpointing="yes")


def test_encoder_rejects_over_30_seconds(model):
    with pytest.raises(ValueError, match=r"clip 0: 3002 mel frames \(30.0 s\) is longer than the encoder's 3000"):
        model.encoder([torch.zeros(80, 3002)])


def test_frames_match_n_frames(model):
    for seconds in (0.9, 2.0, 7.3):
        wave = clip(seconds, 0)
        assert model.speech_frames([log_mel(wave)])[0].shape == (model.n_frames(wave.numel()), 64)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_forward_backward_trains_only_the_adapter(family):
    model = SpeechLLM.from_config(tiny_config(llm={"tiny": {"model_type": family}}))
    assert model.llm.config.model_type == family
    student, teacher, mels = batch_for(model)
    out = model(student, model.speech_frames(mels), teacher=teacher)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0 and out["rows"] == student.target_ids.numel()
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter.parameters())
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is None for p in model.encoder.parameters())


def test_bfloat16_keeps_trained_weights_float32():
    """dtype=bfloat16: frozen weights in bf16, trained ones (adapter, top encoder layer) float32;
    the loss and the adapter's gradients follow the float32 model within bf16 rounding."""
    ref = SpeechLLM.from_config(tiny_config(train_encoder_layers=1))
    low = SpeechLLM.from_config(tiny_config(train_encoder_layers=1, dtype="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in low.llm.parameters())
    assert all(p.dtype == torch.bfloat16 for p in low.encoder.encoder.layers[0].parameters())
    trained = [n for n, p in low.named_parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in low.parameters() if p.requires_grad)
    assert any(n.startswith("encoder.") for n in trained)
    student, teacher, mels = batch_for(ref, seed=2)
    outs = {}
    for name, m in (("ref", ref), ("low", low)):
        out = m(student, features=mels, teacher=teacher)
        out["loss"].backward()
        outs[name] = (out["loss"].detach(), [p.grad for p in m.adapter.parameters()])
    assert outs["low"][0].dtype == torch.float32
    torch.testing.assert_close(outs["low"][0], outs["ref"][0], rtol=0.05, atol=0.02)
    for g_low, g_ref in zip(outs["low"][1], outs["ref"][1]):
        assert g_low.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(g_low.flatten(), g_ref.flatten(), dim=0)
        assert cos > 0.95, float(cos)


def test_ratio_one_student_is_the_teacher(model):
    """At ratio 1 the student's input is the teacher's: the imitation KL is zero."""
    student, teacher, mels = batch_for(model, ratio=1.0)
    assert torch.equal(student.source, teacher.source)
    out = model(student, model.speech_frames(mels), teacher=teacher)
    assert out["kl"].abs() < 1e-6


def test_cached_teacher_equals_online_teacher(model):
    student, teacher, mels = batch_for(model, seed=3)
    frames = model.speech_frames(mels)
    online = model(student, frames, teacher=teacher)
    cached = model(student, frames, teacher_hidden=model.teacher_states(teacher))
    torch.testing.assert_close(online["loss"], cached["loss"])


def test_packed_equals_unpacked_end_to_end(model):
    student, teacher, mels, examples = batch_for(model, seed=5, with_examples=True)
    frames = model.speech_frames(mels)
    packed = model.loss_states(student, torch.cat(frames))
    assert student.rows < len(student.example_ids)  # several examples share a row
    singles = [model.loss_states(pack([ex], 256), f) for ex, f in zip(examples, frames)]
    torch.testing.assert_close(packed, torch.cat(singles), atol=1e-5, rtol=1e-5)


def test_training_steps_reduce_the_loss(model):
    torch.manual_seed(0)
    m = SpeechLLM.from_config(tiny_config())
    student, teacher, mels = batch_for(m, ratio=0.3, seed=7)
    cache = m.teacher_states(teacher)
    opt = torch.optim.Adam(m.adapter.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = m(student, m.speech_frames(mels), teacher_hidden=cache)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_save_load_round_trip(tmp_path, model):
    m = SpeechLLM.from_config(tiny_config(adapter={"kind": "conv", "stride": 4}, train_encoder_layers=1))
    with torch.no_grad():
        for p in m.adapter.parameters():
            p.add_(0.01 * torch.randn_like(p))
        m.encoder.encoder.layers[-1].fc1.weight.add_(0.01)
    m.save_pretrained(tmp_path / "run")
    saved = set(m.trainable_state_dict())
    assert any(k.startswith("encoder.encoder.layers.1.") for k in saved)
    assert not any(k.startswith("llm.") for k in saved)
    loaded = SpeechLLM.from_pretrained(tmp_path / "run")
    student, teacher, mels = batch_for(m, seed=9)
    a = m(student, m.speech_frames(mels), teacher=teacher)["loss"]
    b = loaded(student, loaded.speech_frames(mels), teacher=teacher)["loss"]
    assert torch.equal(a, b)
    m.save_pretrained(tmp_path / "run")  # overwriting an existing save works
    with pytest.raises(FileNotFoundError, match="no config.json"):
        SpeechLLM.from_pretrained(tmp_path)


def test_generate_returns_text(model, tmp_path):
    import soundfile as sf

    path = tmp_path / "clip.wav"
    sf.write(path, clip(1.2, 0).numpy(), 16000)
    out = model.generate(str(path), "What is said in {speech}?", max_new_tokens=5)
    assert isinstance(out, str) and len(out) > 0
    a, b = prompt_halves(model.tokenizer, "Summarize {speech} briefly.")
    assert model.tokenizer.decode(a).endswith("Summarize ") and "briefly." in model.tokenizer.decode(b)


def test_generate_batch_matches_one_at_a_time(model, tmp_path):
    """Left-padded batched decoding gives each prompt the same greedy answer as decoding it alone
    (clips and prompts of different lengths, so the padding really differs per row)."""
    import soundfile as sf

    paths = []
    for i, seconds in enumerate((0.7, 1.9, 1.2)):
        paths.append(tmp_path / f"clip{i}.wav")
        sf.write(paths[-1], clip(seconds, i).numpy(), 16000)
    prompts = ["What is said in {speech}?", "Summarize {speech} in one short sentence please.", "Hi"]
    batched = model.generate_batch([str(p) for p in paths], prompts, max_new_tokens=6)
    alone = [model.generate(str(p), q, max_new_tokens=6) for p, q in zip(paths, prompts)]
    assert batched == alone and all(batched)
    with pytest.raises(ValueError, match="3 audios but 2 prompts"):
        model.generate_batch([str(p) for p in paths], prompts[:2])
    with pytest.raises(ValueError, match="a streamer follows one answer: generate one prompt at a time"):
        model.generate_batch([str(p) for p in paths], prompts, streamer=object())


class _IdsTokenizer:
    """The model's tokenizer, but ``decode`` spells the token ids (up to the first end token), so
    a test sees exactly what ``generate`` chose."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def decode(self, ids, skip_special_tokens=True):
        ids = [int(i) for i in ids]
        if self._tok.eos_token_id in ids:
            ids = ids[:ids.index(self._tok.eos_token_id)]
        return " ".join(map(str, ids))


def repeated_ngrams(ids: list[str], n: int) -> int:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) - len(set(grams))


def test_no_repeat_ngram_keeps_greedy_answers_out_of_loops(model, tmp_path):
    """``decoding_kwargs(no_repeat_ngram=2)``: no token pair twice in any answer of a batch. Plain
    greedy decoding of the random tiny model repeats pairs, so the check is not vacuous; the
    first token, chosen before anything can repeat, is the same."""
    import soundfile as sf

    paths = []
    for i, seconds in enumerate((0.8, 1.5)):
        paths.append(tmp_path / f"clip{i}.wav")
        sf.write(paths[-1], clip(seconds, i).numpy(), 16000)
    prompts = ["Repeat {speech} word for word.", "What is said in {speech}?"]
    tok = _IdsTokenizer(model.tokenizer)
    greedy = [a.split() for a in model.generate_batch([str(p) for p in paths], prompts, tok, max_new_tokens=24)]
    free = [a.split() for a in model.generate_batch([str(p) for p in paths], prompts, tok, max_new_tokens=24,
                                                   **decoding_kwargs(no_repeat_ngram=2))]
    assert sum(repeated_ngrams(a, 2) for a in greedy) > 0
    assert all(repeated_ngrams(a, 2) == 0 for a in free) and all(len(a) >= 3 for a in free)
    assert [a[0] for a in free] == [a[0] for a in greedy]


@pytest.mark.parametrize("kw, message", [
    ({"no_repeat_ngram": 0}, "no_repeat_ngram must be an integer >= 1, got 0"),
    ({"no_repeat_ngram": 2.5}, "no_repeat_ngram must be an integer >= 1, got 2.5"),
    ({"no_repeat_ngram": True}, "no_repeat_ngram must be an integer >= 1, got True"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a finite number > 0, got 0"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty must be a finite number > 0, got nan"),
    ({"repetition_penalty": "1.2"}, "repetition_penalty must be a finite number > 0, got '1.2'"),
])
def test_decoding_kwargs_refuses_bad_settings_by_name(kw, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        decoding_kwargs(**kw)


def test_decoding_kwargs_maps_to_generate_names():
    assert decoding_kwargs() == {}
    assert decoding_kwargs(3, 1.2) == {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2}


@pytest.mark.parametrize("cfg, message", [
    ({"encoderr": {}}, r"unknown key model.encoderr"),
    ({"llm": {"weights": "x"}}, r"model.llm must be one of"),
    ({"adapter": {"strid": 4}}, r"unknown key model.adapter.strid"),
    ({"adapter": {"kind": "qformer"}}, r"model.adapter.kind must be one of stack, conv, audioflamingo3, got 'qformer'"),
    ({"dtype": "fp8"}, r"model.dtype must be auto, float32, bfloat16 or float16, got 'fp8'"),
])
def test_config_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(cfg)


@pytest.mark.skipif(__import__("os").environ.get("MTBI_FAST_OFFLINE") == "1", reason="no downloads")
def test_demo_config_real_models(tmp_path):
    """configs/demo.yaml: Whisper tiny.en + SmolLM2-135M-Instruct from `models fetch`; one training
    step on a bundled clip moves the adapter, and generate answers in text."""
    import json

    from mtbi_fast.audio import load_audio
    from mtbi_fast.fetch import fetch

    fetch("whisper-tiny.en", quiet=True)
    fetch("smollm2-135m-instruct", quiet=True)
    cfg = ModelConfig.from_dict(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["model"])
    m = SpeechLLM.from_config(cfg)
    assert m.encoder.d_model == 384 and m.hidden_size == 576 and m.frame_rate == 6.25
    meta = json.loads((ROOT / "tests" / "data" / "clips.json").read_text())
    wave = load_audio(ROOT / "tests" / "data" / "clip1.flac")
    text = meta["clip1"]["text"]
    ws = text.split()
    step = meta["clip1"]["seconds"] / len(ws)
    words = [Word(w, k * step, (k + 0.9) * step) for k, w in enumerate(ws)]
    tok = m.tokenizer
    before, after = tok("Repeat: ", add_special_tokens=False)["input_ids"], tok("\n", add_special_tokens=False)["input_ids"]
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    s, t = example_pair("clip1", words, m.n_frames(wave.numel()), m.frame_rate, 0.3, before, after,
                        enc(" " + text), enc, generator=torch.Generator().manual_seed(0))
    student, teacher = pack([s], 512), pack([t], 512)
    out = m(student, m.speech_frames([log_mel(wave)]), teacher=teacher)
    assert torch.isfinite(out["loss"]) and out["kl"] > 0
    out["loss"].backward()
    assert all(p.grad is not None for p in m.adapter.parameters())
    answer = m.generate(ROOT / "tests" / "data" / "clip1.flac", "Repeat what you hear: {speech}",
                        max_new_tokens=8)
    assert isinstance(answer, str) and answer.strip()


def test_lora_trains_and_round_trips(tmp_path):
    pytest.importorskip("peft")
    m = SpeechLLM.from_config(tiny_config(lora={"r": 4, "lora_alpha": 8}))
    saved = m.trainable_state_dict()
    assert any("lora_A" in k for k in saved) and not any("embed_tokens" in k for k in saved)
    student, teacher, mels = batch_for(m, seed=11)
    out = m(student, m.speech_frames(mels), teacher=teacher)
    out["loss"].backward()
    lora_b = [p for n, p in m.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    with torch.no_grad():
        for p in lora_b:
            p.add_(0.05)
    # the teacher is the original LLM: LoRA is off for its pass
    base = SpeechLLM.from_config(tiny_config())
    torch.testing.assert_close(m.teacher_states(teacher), base.teacher_states(teacher))
    m.save_pretrained(tmp_path / "lora")
    loaded = SpeechLLM.from_pretrained(tmp_path / "lora")
    a = m(student, m.speech_frames(mels), teacher=teacher)["loss"]
    b = loaded(student, loaded.speech_frames(mels), teacher=teacher)["loss"]
    torch.testing.assert_close(a, b)


def test_auto_dtype(monkeypatch):
    """model.dtype=auto: bfloat16 only where bf16 matmuls are native."""
    from mtbi_fast import hub

    assert hub.resolve_dtype("float16") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for forced in ("bfloat16", "float32"):  # the suite's switch to run as on the other CPU kind
        monkeypatch.setenv(hub.AUTO_DTYPE_ENV, forced)
        assert hub.resolve_dtype("auto") is getattr(torch, forced)
    monkeypatch.setenv(hub.AUTO_DTYPE_ENV, "half")
    with pytest.raises(ValueError, match="MTBI_FAST_AUTO_DTYPE must be bfloat16 or float32, got 'half'"):
        hub.resolve_dtype("auto")
    monkeypatch.delenv(hub.AUTO_DTYPE_ENV)
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(hub, "_cpu_has_bf16", lambda native=native: native)
        assert hub.resolve_dtype("auto") is expected
        m = SpeechLLM.from_config(tiny_config(dtype="auto"))
        assert next(m.llm.parameters()).dtype is expected
        assert all(p.dtype is torch.float32 for p in m.adapter.parameters())
