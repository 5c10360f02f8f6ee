"""mtbi_fast/align.py: pocketsphinx alignment against the synthesizer's own word times."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pocketsphinx")

from mtbi_fast.align import align_manifest, normalize_word, number_words  # noqa: E402
from mtbi_fast.cli import main as cli  # noqa: E402
from mtbi_fast.data import Utterance, read_manifest  # noqa: E402

DEMO = Path(__file__).parents[1] / "data" / "demo"


def test_alignment_matches_synthesizer_times():
    utts = read_manifest(DEMO / "test.jsonl")[:12]
    aligned, problems = align_manifest(utts, workers=2, progress=False)
    assert not problems and len(aligned) == 12
    errors = []
    for a, ref in zip(aligned, utts):
        assert [w.word for w in a.words] == [w.word for w in ref.words]
        errors += [abs(x.start - y.start) for x, y in zip(a.words, ref.words)]
        errors += [abs(x.end - y.end) for x, y in zip(a.words, ref.words)]
    assert np.mean(errors) <= 0.050, np.mean(errors)


def test_unknown_words_and_bad_audio_are_reported_not_written(tmp_path):
    ref = read_manifest(DEMO / "test.jsonl")[0]
    oov = Utterance("oov", ref.audio, "the blorptastic zzqx idea", ref.duration)
    missing = Utterance("gone", str(tmp_path / "nope.flac"), "hello there", 1.0)
    aligned, problems = align_manifest([oov, missing, ref], workers=1, progress=False)
    assert [u.id for u in aligned] == [ref.id]
    assert problems[0] == "oov: words not in the pocketsphinx dictionary: blorptastic, zzqx"
    assert problems[1].startswith("gone: audio file not found")


def test_normalization():
    assert normalize_word("Hello,") == ["hello"]
    assert normalize_word("don't") == ["don't"]
    assert normalize_word("42") == ["forty", "two"]
    assert number_words(1999) == ["one", "thousand", "nine", "hundred", "ninety", "nine"]
    assert normalize_word("--") == []


def test_align_cli(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    lines = (DEMO / "test.jsonl").read_text().splitlines()[:3]
    import json
    rows = []
    for line in lines:
        d = json.loads(line)
        d["audio"] = str((DEMO / d["audio"]).resolve())
        d.pop("words")
        rows.append(json.dumps(d))
    src.write_text("\n".join(rows) + "\n")
    assert cli(["align", str(src), "-o", str(tmp_path / "out.jsonl"), "--workers", "1"]) == 0
    assert "aligned 3/3 utterances" in capsys.readouterr().out
    out = read_manifest(tmp_path / "out.jsonl", require_words=True)
    assert len(out) == 3 and all(u.words for u in out)
