"""Builds the bundled demo corpus from sentences.txt with espeak-ng (word times from the
synthesizer): data/demo/audio/*.flac (16 kHz) and the manifests train.jsonl and test.jsonl.

    apt-get install espeak-ng && python data/demo/make_demo.py

(The espeak-ng bindings are ``mtbi_fast.synth``, which ``mtbi-fast corpus build`` uses too, with
the library from the PyPI package espeakng-loader.)

Deterministic: the voice, rate and pitch of each sentence and the train/test split come from a
fixed seed. The last 40 sentences (after a seeded shuffle) are the test split. Samples are rounded
to 11 significant bits (about 66 dB SNR) before writing 16-bit FLAC: FLAC stores the unused low bits
for free, which keeps the corpus under 15 MB.
"""

import random
import sys
from pathlib import Path

import soundfile as sf
import torch
import torchaudio
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mtbi_fast.data import Utterance, Word, write_manifest  # noqa: E402
from mtbi_fast.synth import espeak as synthesize  # noqa: E402

HERE = Path(__file__).parent
VOICES = ["en-us", "en", "en-us+f2", "en+m3", "en-gb-x-rp", "en-029", "en-us+m3", "en+f3"]
N_TEST = 40
BITS = 11


def main():
    sentences = [s.strip() for s in (HERE / "sentences.txt").read_text().splitlines() if s.strip()]
    rng = random.Random(0)
    order = list(range(len(sentences)))
    rng.shuffle(order)
    (HERE / "audio").mkdir(exist_ok=True)
    utts = {"train": [], "test": []}
    for rank, idx in enumerate(tqdm(order, desc="synthesize", unit="utt")):
        text = sentences[idx]
        split = "test" if rank >= len(order) - N_TEST else "train"
        uid = f"demo-{split}-{idx:03d}"
        voice = VOICES[idx % len(VOICES)]
        audio, sr, words = synthesize(text, voice=voice, rate=rng.randint(140, 175),
                                      pitch=rng.randint(35, 65))
        wave = torchaudio.functional.resample(torch.from_numpy(audio), sr, 16000)
        step = 2.0 ** -(BITS - 1)
        wave = (torch.round(wave / step) * step).clamp(-1.0, 1.0 - step)
        path = HERE / "audio" / f"{uid}.flac"
        sf.write(path, wave.numpy(), 16000, subtype="PCM_16")
        duration = wave.numel() / 16000
        words = [Word(w.word, round(min(w.start, duration), 3), round(min(w.end, duration), 3))
                 for w in words]
        utts[split].append(Utterance(uid, str(path.resolve()), text, duration, words,
                                     extra={"voice": voice}))
    for split, items in utts.items():
        items.sort(key=lambda u: u.id)
        write_manifest(HERE / f"{split}.jsonl", items)
        hours = sum(u.duration for u in items) / 3600
        print(f"{split}: {len(items)} utterances, {hours * 60:.1f} min")


if __name__ == "__main__":
    main()
