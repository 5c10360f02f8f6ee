"""mtbi_fast/audio.py: loading, resampling, Whisper log-mel against transformers, errors."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from transformers import WhisperFeatureExtractor

from mtbi_fast.audio import load_audio, log_mel, mel_frames, spec_augment


def speechlike(seconds, sr=16000, seed=0):
    """A chirp with harmonics, amplitude modulation and noise: energy across the mel range."""
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 80 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.2 * x + 0.01 * g.standard_normal(t.size)).astype(np.float32)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("seconds", [1.0, 3.73, 12.0])
def test_log_mel_matches_whisper_feature_extractor(n_mels, seconds):
    wave = speechlike(seconds, seed=int(seconds * 10))
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    expected = fe(wave, sampling_rate=16000, padding="longest", return_tensors="np").input_features[0]
    ours = log_mel(torch.from_numpy(wave), n_mels=n_mels)
    assert ours.shape == expected.shape == (n_mels, mel_frames(wave.size))
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_torchaudio(n_mels):
    """The in-house Slaney filters (no torchaudio needed to train) equal torchaudio's, bit for bit."""
    from mtbi_fast.audio import _mel_filters_cpu

    expected = torchaudio.functional.melscale_fbanks(201, f_min=0.0, f_max=8000.0, n_mels=n_mels,
                                                     sample_rate=16000, norm="slaney",
                                                     mel_scale="slaney")
    assert torch.equal(_mel_filters_cpu(n_mels), expected)  # bit-identical: the same features


@pytest.mark.parametrize("ext, subtype", [("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS")])
def test_load_audio_mixes_and_resamples(tmp_path, ext, subtype):
    sr = 44100
    left = speechlike(1.5, sr, seed=1)
    right = speechlike(1.5, sr, seed=2)
    path = tmp_path / f"clip.{ext}"
    sf.write(path, np.stack([left, right], axis=1), sr, subtype=subtype)
    wave = load_audio(path)
    stored, _ = sf.read(path, dtype="float32", always_2d=True)
    expected = torchaudio.functional.resample(torch.from_numpy(stored).mean(1), sr, 16000)
    assert wave.dtype == torch.float32 and wave.shape == expected.shape
    assert wave.numel() == math.ceil(1.5 * 16000)
    torch.testing.assert_close(wave, expected)


def test_load_audio_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"audio file not found: .*nope\.wav"):
        load_audio(tmp_path / "nope.wav")
    bad = tmp_path / "garbage.flac"
    bad.write_bytes(b"this is not audio" * 10)
    with pytest.raises(ValueError, match=r"cannot read audio file .*garbage\.flac"):
        load_audio(bad)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0,), np.float32), 16000)
    with pytest.raises(ValueError, match=r"audio file .*empty\.wav is empty"):
        load_audio(empty)
    nan = tmp_path / "nan.wav"
    x = speechlike(0.5)
    x[100] = np.nan
    sf.write(nan, x, 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"audio file .*nan\.wav has NaN or infinite samples"):
        load_audio(nan)
    long = tmp_path / "long.wav"
    sf.write(long, speechlike(3.0), 16000)
    with pytest.raises(ValueError, match=r"audio file .*long\.wav is 3.00 s long, over the limit of 2.5 s"):
        load_audio(long, max_seconds=2.5)


def test_spec_augment_masks_reproducibly():
    mel = log_mel(torch.from_numpy(speechlike(4.0)))
    a = spec_augment(mel, generator=torch.Generator().manual_seed(0))
    b = spec_augment(mel, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == mel.shape
    changed = a != mel
    assert changed.any()
    assert changed.float().mean() < 0.5  # masks, not a rewrite
    assert torch.equal(mel, log_mel(torch.from_numpy(speechlike(4.0))))  # input untouched
