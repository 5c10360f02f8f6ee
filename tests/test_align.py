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


def test_coverage_rule():
    from mtbi_fast.align import coverage_warning
    from mtbi_fast.data import Word

    words = [Word("a", 0.2, 0.5), Word("b", 0.6, 6.5)]
    assert coverage_warning(words, 600.0) == (
        "the 2 words span only 1% of the audio (0.20-6.50 s of 600.00 s): the transcript may "
        "cover only part of the clip")
    assert coverage_warning(words, 12.0) is None  # 52% covered
    assert coverage_warning(words, 14.0) is not None  # 45% covered, 7.7 s not
    one = [Word("yes", 0.4, 0.7)]
    assert coverage_warning(one, 2.0) is None  # 15% covered, but only 1.7 s of silence
    assert coverage_warning(words, 14.0, min_coverage=0.4) is None


def test_align_flags_words_that_cover_little_of_the_audio(tmp_path, capsys):
    """A demo clip followed by 12 s of silence, with only its own transcript:
    forced alignment puts its words somewhere without an error, so the coverage is checked."""
    import json

    import soundfile as sf

    ref = read_manifest(DEMO / "test.jsonl")[0]
    wave, sr = sf.read(ref.audio, dtype="float32")
    padded = np.concatenate([wave, np.zeros(12 * sr, np.float32)])
    sf.write(tmp_path / "padded.flac", padded, sr)
    rows = [{"id": "padded", "audio": str(tmp_path / "padded.flac"), "text": ref.text,
             "duration": round(len(padded) / sr, 4)},
            {"id": ref.id, "audio": ref.audio, "text": ref.text, "duration": ref.duration}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["align", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                "--workers", "1"]) == 0
    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: padded: the ")
    assert "of the audio" in warnings[0]
    assert "1 aligned utterance flagged: the words cover little of the audio" in out.out
    got = {u.id: u for u in read_manifest(tmp_path / "out.jsonl", require_words=True)}
    assert got["padded"].extra["align_warning"] == warnings[0].removeprefix("warning: padded: ")
    assert "align_warning" not in got[ref.id].extra
    assert cli(["manifest", "validate", str(tmp_path / "out.jsonl")]) == 0
    assert "1 flagged by alignment (align_warning)" in capsys.readouterr().out
