"""Makes the three test clips (espeak-ng, 16 kHz FLAC) and clips.json with their texts.

    apt-get install espeak-ng && python tests/data/make_clips.py
"""

import json
import subprocess
import tempfile
from pathlib import Path

import soundfile as sf
import torch
import torchaudio

CLIPS = {
    "clip1": ("en-us", 150, "The weather today is sunny with a light breeze from the west."),
    "clip2": ("en-gb", 140, "Please send the report to the team before the meeting on Friday."),
    "clip3": ("en-us+m3", 145, "Speech models can learn to follow instructions they have never seen."),
}


def main():
    here = Path(__file__).parent
    meta = {}
    for name, (voice, rate, text) in CLIPS.items():
        with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", tmp.name, text], check=True)
            wave, sr = sf.read(tmp.name, dtype="float32")
        wave = torchaudio.functional.resample(torch.from_numpy(wave), sr, 16000).numpy()
        sf.write(here / f"{name}.flac", wave, 16000, subtype="PCM_16")
        meta[name] = {"text": text, "voice": voice, "seconds": round(len(wave) / 16000, 2)}
    (here / "clips.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
