"""mtbi_fast/encoders.py: the encoder interface and its two families (Whisper on log-mels,
wav2vec2 / HuBERT / WavLM on waveforms), checked against transformers' own modules and feature
extractors; a waveform-encoder run end to end through train, eval and infer."""

import json
import math

import pytest
import torch
import transformers

from mtbi_fast.audio import load_audio, log_mel
from mtbi_fast.cli import main as cli
from mtbi_fast.encoders import (ENCODER_FAMILIES, LogMelFrontEnd, WaveformFrontEnd,
                                WaveformSpeechEncoder, WhisperSpeechEncoder, encoder_class, load_encoder,
                                max_audio_seconds, tiny_encoder_config)
from mtbi_fast.model import ModelConfig, SpeechLLM

from helpers import CONFIG, ROOT, metrics, overrides

WAVEFORM_TYPES = ["wav2vec2", "hubert", "wavlm"]
CLIP = ROOT / "tests" / "data" / "clip1.flac"


def reference_module(encoder):
    """The family's transformers module alone, on a copy of its weights (fp32, eval)."""
    ref = type(encoder.encoder)(encoder.encoder.config).eval()
    ref.load_state_dict(encoder.encoder.state_dict())
    return ref


def waves(seconds, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(int(s * 16000), generator=g) for s in seconds]


def test_the_families_are_chosen_by_model_type():
    assert set(ENCODER_FAMILIES) == {"whisper", "wav2vec2", "hubert", "wavlm"}
    assert isinstance(load_encoder({"tiny": {}}), WhisperSpeechEncoder)
    for t in WAVEFORM_TYPES:
        enc = load_encoder({"tiny": {"model_type": t}})
        assert isinstance(enc, WaveformSpeechEncoder) and enc.encoder.config.model_type == t
    with pytest.raises(ValueError, match=r"model.encoder.tiny.model_type must be one of hubert, wav2vec2, "
                                         r"wavlm, whisper, got 'llama'"):
        tiny_encoder_config({"model_type": "llama"})
    with pytest.raises(ValueError, match=r"model.encoder: a 'bert' model is not a supported speech encoder"):
        encoder_class(transformers.BertConfig())


@pytest.mark.parametrize("model_type", WAVEFORM_TYPES)
def test_waveform_frames_match_transformers_output_lengths(model_type):
    enc = load_encoder({"tiny": {"model_type": model_type}})
    lengths = torch.tensor([400, 401, 719, 720, 16000, 16319, 16320, 48_123])
    want = enc.encoder._get_feat_extract_output_lengths(lengths).tolist()
    assert [enc.front.n_frames(n) for n in lengths.tolist()] == want
    assert enc.front.frame_rate == 50.0 and enc.front.min_samples == 400
    assert enc.front.n_frames(399) == 0
    with pytest.raises(ValueError, match="waveform of 399 samples is too short for an encoder frame"):
        enc.front.features(torch.zeros(399))


@pytest.mark.parametrize("normalize", [True, False])
def test_waveform_features_are_the_feature_extractors(normalize):
    wave = load_audio(CLIP)
    fe = transformers.Wav2Vec2FeatureExtractor(do_normalize=normalize)
    want = torch.from_numpy(fe(wave.numpy(), sampling_rate=16000, return_tensors="np")["input_values"][0])
    got = WaveformFrontEnd(normalize=normalize).features(wave)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_log_mel_front_end_is_whispers():
    enc = load_encoder({"tiny": {}})
    wave = load_audio(CLIP)
    torch.testing.assert_close(enc.front.features(wave), log_mel(wave))
    feats = [enc.front.features(w) for w in waves([1.0, 2.37, 0.51])]
    assert [s.shape[0] for s in enc(feats)] == [enc.front.n_frames(w.numel()) for w in waves([1.0, 2.37, 0.51])]
    assert enc.front == LogMelFrontEnd(n_mels=80, max_frames=1500) and enc.front.max_seconds == 30.0


@pytest.mark.parametrize("model_type", WAVEFORM_TYPES)
@pytest.mark.parametrize("norm", ["layer", "group"])
def test_a_waveform_clip_encodes_as_it_does_alone(model_type, norm):
    """Batched clips of different lengths: each clip's states equal transformers' model on the
    clip alone (layer-normalized convolutions run padded with a mask; group-normalized ones,
    which normalize over the padded length, run clip by clip)."""
    overrides_ = {"model_type": model_type, "feat_extract_norm": norm, "do_stable_layer_norm": norm == "layer"}
    enc = load_encoder({"tiny": overrides_}, seed=3)
    ref = reference_module(enc)
    clips = [enc.front.features(w) for w in waves([0.73, 1.5, 0.2])]
    with torch.no_grad():
        got = enc(clips)
        for clip, states in zip(clips, got):
            alone = ref(clip[None]).last_hidden_state[0]
            assert states.shape == alone.shape == (enc.front.n_frames(clip.numel()), 64)
            torch.testing.assert_close(states, alone, atol=2e-5, rtol=2e-5)


def test_frozen_encoder_parts_stay_in_eval_mode_and_top_layers_train():
    """With dropout and layer drop configured, training mode changes nothing below the trained
    top layer (the frozen parts compute as at inference); the trained layer gets gradients."""
    cfg = ModelConfig(encoder={"tiny": {"model_type": "hubert", "hidden_dropout": 0.5, "layerdrop": 0.5,
                                        "mask_time_prob": 0.5, "mask_time_length": 2}},
                      train_encoder_layers=1)
    model = SpeechLLM.from_config(cfg).train()
    enc = model.encoder
    trained = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")}
    top = len(enc.layers) - 1
    assert trained == {f"encoder.encoder.encoder.layers.{top}.{n}" for n, _ in enc.layers[-1].named_parameters()} | {
        "encoder.encoder.encoder.layer_norm.weight", "encoder.encoder.encoder.layer_norm.bias"}
    assert not enc.encoder.training and enc.layers[-1].training and not enc.layers[0].training
    feats = [enc.front.features(w) for w in waves([0.8])]
    enc.layers[-1].eval()  # the dropout of the trained layer aside, two passes are equal
    a, b = enc(feats)[0], enc(feats)[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    enc.train()
    enc(feats)[0].square().mean().backward()
    assert all(p.grad is not None for p in enc.layers[-1].parameters())
    assert all(p.grad is None for p in enc.layers[0].parameters())


def test_waveform_encoder_flops_match_torchs_counter():
    """SpeechEncoder.flops against torch.utils.flop_counter on one clip: exactly, with eager
    attention (whose matmuls the counter sees; it counts no CPU SDPA kernel) and an odd positional
    kernel (an even one computes a frame more, which the model drops)."""
    from torch.utils.flop_counter import FlopCounterMode

    enc = load_encoder({"tiny": {"model_type": "wav2vec2", "num_conv_pos_embeddings": 17}})
    enc.encoder.config._attn_implementation = "eager"
    clip = enc.front.features(waves([1.2])[0])
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        enc([clip])
    assert enc.flops([clip.numel()], 0) == counter.get_total_flops()
    top = sum(counter.get_flop_counts()[f"WaveformSpeechEncoder.encoder.encoder.layers.{len(enc.layers) - 1}"].values())
    assert enc.flops([clip.numel()], 1) == counter.get_total_flops() + 2 * top  # a trained layer: 3x


def test_max_audio_seconds_of_a_waveform_encoder_is_the_configs():
    assert max_audio_seconds({"encoder": {"tiny": {"model_type": "hubert"}}, "max_audio_seconds": 45}) == (
        45.0, "model.max_audio_seconds = 45")
    assert WaveformFrontEnd().max_seconds == math.inf
    model = SpeechLLM.from_config(ModelConfig(encoder={"tiny": {"model_type": "wavlm"}}, max_audio_seconds=12))
    assert model.max_seconds == 12.0 and model.frame_rate == 50.0 / 4


def test_clips_over_max_audio_seconds_are_listed_for_a_waveform_encoder():
    """A waveform encoder has no limit of its own: model.max_audio_seconds is the limit, and the
    error names it and the clips over it."""
    from mtbi_fast.data import Utterance
    from mtbi_fast.dataset import check_durations

    model = SpeechLLM.from_config(ModelConfig(encoder={"tiny": {"model_type": "hubert"}}, max_audio_seconds=20))
    utts = [Utterance("a", str(CLIP), "x", 12.0), Utterance("b", str(CLIP), "x", 25.0)]
    with pytest.raises(ValueError, match=r"^m.jsonl: 1 utterance is longer than the model's limit of 20 s "
                                         r"\(model.max_audio_seconds\): b \(25.0 s\); remove it"):
        check_durations(utts, model, "m.jsonl")
    check_durations(utts[:1], model, "m.jsonl")


def test_settings_that_need_whisper_are_refused_for_a_waveform_encoder(data, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"model.adapter.kind: audioflamingo3 applies a Whisper encoder's "
                                         r"final LayerNorm; this encoder is waveform"):
        SpeechLLM.from_config(ModelConfig(encoder={"tiny": {"model_type": "hubert"}},
                                          adapter={"kind": "audioflamingo3"}))
    assert cli(["train", str(CONFIG), *overrides(data, tmp_path / "run", "model.encoder={tiny: {model_type: hubert}}",
                                                 "data.spec_augment={}", "train.steps=1")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "mtbi-fast train: error: data.spec_augment masks log-mel features; this model's waveform encoder reads "
        "waveforms (set data.spec_augment: null)")


def test_a_hubert_run_trains_evaluates_and_answers(data, tmp_path, capsys):
    """The second family end to end: a tiny HuBERT encoder trained (loss falls), resumed from a
    checkpoint, evaluated (prompt/task generalization and ASR) and asked with infer, whose
    answer equals greedy decoding from transformers' modules and the feature extractor alone."""
    out = tmp_path / "run"
    args = overrides(data, out, "model.encoder={tiny: {model_type: hubert}}", "train.steps=24",
                     "interleave.schedule=constant", "interleave.start=0.0", "train.save_every=12",
                     "train.eval_every=12")
    assert cli(["train", str(CONFIG), *args]) == 0
    rows = [r for r in metrics(out) if "loss" in r]
    first, last = sum(r["loss"] for r in rows[:4]) / 4, sum(r["loss"] for r in rows[-4:]) / 4
    assert last < 0.9 * first, (first, last)
    assert all(r["tflops"] > 0 for r in rows)
    model = SpeechLLM.from_pretrained(out / "final").eval()
    assert isinstance(model.encoder, WaveformSpeechEncoder)
    assert cli(["train", str(CONFIG), *args, "train.steps=26"]) == 0  # resumes at step 24
    assert [r["step"] for r in metrics(out) if "loss" in r][-2:] == [25, 26]
    capsys.readouterr()

    assert cli(["eval", "--model", str(out), "--manifest", str(data / "test.jsonl"), "-o", str(tmp_path / "eval"),
                "--per-split", "1", "--max-new-tokens", "4", "--no-similarity", "--no-untrained"]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert {r["model"] for r in result["rows"]} == {"teacher", "mtbi"}
    assert all(r["kl"] >= 0 for r in result["rows"] if r["model"] == "mtbi" and "kl" in r)
    assert cli(["eval", "--model", str(out), "--asr", str(data / "test.jsonl"), "-o", str(tmp_path / "asr"),
                "--max-new-tokens", "4"]) == 0
    assert json.loads((tmp_path / "asr" / "asr.json").read_text())["utterances"] == 4
    capsys.readouterr()

    prompt = "Summarize {speech}"
    assert cli(["infer", "--model", str(out), "--audio", str(CLIP), "--prompt", prompt, "--max-new-tokens", "6",
                "--no-stream"]) == 0
    answer = capsys.readouterr().out.split(f"== {CLIP}", 1)[1].strip()
    assert answer == reference_answer(model, CLIP, prompt, 6)


def reference_answer(model, clip, prompt, max_new_tokens):
    """Greedy decoding from transformers' HuBERT (the feature extractor's input values, the clip
    alone), the trained adapter on its frames, and the LLM on the chat-formatted embeddings."""
    from mtbi_fast.prompts import prompt_halves

    wave = load_audio(clip)
    enc = reference_module(model.encoder)
    fe = transformers.Wav2Vec2FeatureExtractor(do_normalize=model.front.normalize)
    with torch.no_grad():
        values = torch.from_numpy(fe(wave.numpy(), sampling_rate=16000, return_tensors="np")["input_values"])
        states = enc(values).last_hidden_state[0]
        frames = model.adapter(states)
        before, after = prompt_halves(model.tokenizer, prompt)
        embed = model.llm.get_input_embeddings()
        x = torch.cat([embed(torch.tensor(before)), frames, embed(torch.tensor(after))])[None]
        out = model.llm.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=model.tokenizer.eos_token_id)
    return model.tokenizer.decode(out[0], skip_special_tokens=True).strip()
