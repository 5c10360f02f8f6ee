"""Audio: read, mix to mono, resample to 16 kHz; Whisper log-mel at the true length; SpecAugment.

    wave = load_audio("clip.flac", max_seconds=35)       # float32 [T] at 16 kHz
    mel = log_mel(wave, n_mels=80)                        # [80, T // 160], Whisper's features

``log_mel`` computes what transformers' ``WhisperFeatureExtractor`` computes (Hann window of 400
samples, hop 160, power spectrum, Slaney mel filters up to 8 kHz, log10 clamped at 1e-10, floor
at max - 8, then (x + 4) / 4) but for the utterance's own length instead of 30 s of padding.
Files are read with ``soundfile`` (``torchaudio.load`` needs torchcodec, whose PyPI build is
CUDA-linked); torchaudio is needed only to resample audio that is not at 16 kHz (the mel filters
are computed here, so a GPU machine without torchaudio still trains). Every failure names the file.
What each encoder reads is its front end's (``mtbi_fast.encoders``).
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second


def load_audio(path: str | os.PathLike, *, max_seconds: float | None = None,
               sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Mono float32 waveform at ``sample_rate`` from a wav/flac/ogg file.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for unreadable, empty,
    non-finite or over-long audio, each naming the file.
    """
    import soundfile as sf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types (LibsndfileError, RuntimeError)
        raise ValueError(f"cannot read audio file {path}: {exc}") from None
    return wave_from_samples(data, sr, path, max_seconds=max_seconds, sample_rate=sample_rate)


def wave_from_samples(data, sr: int, where: str, *, max_seconds: float | None = None,
                      sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """``load_audio``'s waveform from decoded samples ``data`` [T, channels] (float32 numpy) at
    ``sr`` Hz: mixed to mono, checked, resampled to ``sample_rate``. Errors name ``where`` (the
    file, or a cut in a shard)."""
    if data.size == 0:
        raise ValueError(f"audio file {where} is empty (no samples)")
    wave = torch.from_numpy(data).mean(dim=1)  # mix channels to mono
    if not torch.isfinite(wave).all():
        raise ValueError(f"audio file {where} has NaN or infinite samples")
    seconds = wave.numel() / sr
    if max_seconds is not None and seconds > max_seconds:
        raise ValueError(f"audio file {where} is {seconds:.2f} s long, over the limit of "
                         f"{max_seconds} s")
    if sr != sample_rate:
        try:
            import torchaudio
        except ImportError as exc:
            raise ValueError(f"audio file {where} is at {sr} Hz; resampling it to {sample_rate} Hz "
                             f"needs torchaudio ({exc})") from None
        wave = torchaudio.functional.resample(wave, sr, sample_rate)
    return wave.contiguous()


def log_mel(wave: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Whisper log-mel features [n_mels, len(wave) // 160] of a 16 kHz waveform (true length)."""
    if wave.dim() != 1:
        raise ValueError(f"log_mel takes one waveform [T], got shape {tuple(wave.shape)}")
    if wave.numel() < N_FFT // 2 + 1:
        raise ValueError(f"waveform of {wave.numel()} samples is too short for a mel frame")
    window = torch.hann_window(N_FFT, device=wave.device)
    stft = torch.stft(wave.float(), N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = _mel_filters(n_mels, wave.device).T @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def mel_frames(n_samples: int) -> int:
    """Mel frames ``log_mel`` gives for ``n_samples`` samples at 16 kHz."""
    return n_samples // HOP_LENGTH


@lru_cache(maxsize=8)
def _mel_filters_cpu(n_mels: int) -> torch.Tensor:
    """Slaney-style mel filters [n_freqs, n_mels] from 0 to 8 kHz, area-normalized (what
    Whisper's feature extractor and librosa's ``mel(htk=False, norm="slaney")`` use), computed in
    float32 in the same order as torchaudio's ``melscale_fbanks``, so the features are
    bit-identical to those made with it."""
    freqs = torch.linspace(0, SAMPLE_RATE // 2, N_FFT // 2 + 1)
    mels = torch.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), n_mels + 2)
    edges = _mel_to_hz(mels)  # n_mels + 2 band edges in Hz
    width = edges[1:] - edges[:-1]
    slopes = edges.unsqueeze(0) - freqs.unsqueeze(1)  # [n_freqs, n_mels + 2]
    rising = (-1.0 * slopes[:, :-2]) / width[:-1]
    falling = slopes[:, 2:] / width[1:]
    filters = torch.max(torch.zeros(1), torch.min(rising, falling))
    return filters * (2.0 / (edges[2:n_mels + 2] - edges[:n_mels])).unsqueeze(0)  # equal areas


# The Slaney mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above.
_F_SP, _MIN_LOG_HZ = 200.0 / 3, 1000.0
_MIN_LOG_MEL, _LOG_STEP = _MIN_LOG_HZ / _F_SP, math.log(6.4) / 27.0


def _hz_to_mel(hz: float) -> float:
    if hz < _MIN_LOG_HZ:
        return hz / _F_SP
    return _MIN_LOG_MEL + math.log(hz / _MIN_LOG_HZ) / _LOG_STEP


def _mel_to_hz(mels: torch.Tensor) -> torch.Tensor:
    hz = _F_SP * mels
    log_part = mels >= _MIN_LOG_MEL
    hz[log_part] = _MIN_LOG_HZ * torch.exp(_LOG_STEP * (mels[log_part] - _MIN_LOG_MEL))
    return hz


def _mel_filters(n_mels: int, device) -> torch.Tensor:
    return _mel_filters_cpu(n_mels).to(device)


def spec_augment(mel: torch.Tensor, *, freq_masks: int = 2, freq_width: int = 27,
                 time_masks: int = 2, time_width: float = 0.05,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """SpecAugment on one [n_mels, frames] log-mel: ``freq_masks`` bands of up to ``freq_width``
    bins and ``time_masks`` spans of up to ``time_width`` of the frames (a fraction, or frames if
    >= 1) set to the utterance mean. Returns a new tensor. Training applies it to its inputs when
    the run config sets ``data.spec_augment`` (these keywords; {} for the defaults)."""
    out = mel.clone()
    n_mels, frames = out.shape
    # the mean in float64 by numpy (one thread, a fixed order): torch's parallel reduction gives a
    # result that depends on the thread count, and DataLoader workers run single-threaded
    fill = float(out.detach().cpu().numpy().astype("float64").mean())
    max_t = int(time_width * frames) if time_width < 1 else int(time_width)
    for _ in range(freq_masks):
        w = int(torch.randint(0, freq_width + 1, (), generator=generator))
        f0 = int(torch.randint(0, max(1, n_mels - w), (), generator=generator))
        out[f0:f0 + w, :] = fill
    for _ in range(time_masks):
        w = int(torch.randint(0, max_t + 1, (), generator=generator))
        t0 = int(torch.randint(0, max(1, frames - w), (), generator=generator))
        out[:, t0:t0 + w] = fill
    return out

