"""mtbi_fast/data.py: manifest validation messages, skip-bad, atomic writes, LibriSpeech import."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mtbi_fast.cli import main as cli
from mtbi_fast.data import ManifestError, import_librispeech, read_manifest, write_manifest

DATA = Path(__file__).parent / "data"


def test_bundled_clips_manifest_reads():
    utts = read_manifest(DATA / "clips.jsonl")
    assert [u.id for u in utts] == ["clip1", "clip2", "clip3"]
    assert Path(utts[0].audio).is_file() and utts[0].words is None and utts[0].duration > 3


def write_lines(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def test_every_bad_line_is_reported(tmp_path):
    audio = tmp_path / "a.wav"
    sf.write(audio, np.zeros(16000, np.float32), 16000)  # 1.0 s
    good = {"id": "ok", "audio": "a.wav", "text": "hello there", "duration": 1.0}
    lines = [
        good,
        "{not json",
        {"id": "", "audio": "a.wav", "text": "x", "duration": 1.0},
        {"id": "u3", "audio": "missing.wav", "text": "x", "duration": 1.0},
        {"id": "u4", "audio": "a.wav", "text": "  ", "duration": 1.0},
        {"id": "u5", "audio": "a.wav", "text": "x", "duration": 2.5},
        {"id": "u6", "audio": "a.wav", "text": "a b", "duration": 1.0,
         "words": [{"word": "a", "start": 0.5, "end": 0.6}, {"word": "b", "start": 0.2, "end": 0.3}]},
        {"id": "u7", "audio": "a.wav", "text": "a", "duration": 1.0,
         "words": [{"word": "a", "start": 0.5, "end": 1.6}]},
        good,
    ]
    write_lines(tmp_path / "m.jsonl", lines)
    with pytest.raises(ManifestError) as err:
        read_manifest(tmp_path / "m.jsonl")
    msg = str(err.value)
    expected = [
        r"m.jsonl: 8 bad lines",
        r"m.jsonl:2: \?: not valid JSON",
        r"m.jsonl:3: \?: missing or empty 'id'",
        r"m.jsonl:4: u3: audio file not found: .*missing.wav",
        r"m.jsonl:5: u4: empty or missing 'text'",
        r"m.jsonl:6: u5: duration 2.5 s does not match the audio \(1.00 s\)",
        r"m.jsonl:7: u6: word 1 'b' \(start 0.2\) overlaps the previous word 'a'",
        r"m.jsonl:8: u7: word 0 'a' ends at 1.6 s, beyond the audio",
        r"m.jsonl:9: ok: duplicate id \(first on line 1\)",
    ]
    import re
    for e in expected:
        assert re.search(e, msg), (e, msg)
    good_utts, problems = read_manifest(tmp_path / "m.jsonl", skip_bad=True)
    assert [u.id for u in good_utts] == ["ok"] and len(problems) == 8


def test_cli_skip_bad_writes_good_lines(tmp_path, capsys):
    sf.write(tmp_path / "a.wav", np.zeros(8000, np.float32), 16000)
    write_lines(tmp_path / "m.jsonl", [{"id": "a", "audio": "a.wav", "text": "hi", "duration": 0.5},
                                       {"id": "b", "audio": "nope.wav", "text": "hi", "duration": 0.5}])
    assert cli(["manifest", "validate", str(tmp_path / "m.jsonl")]) == 1
    assert "nope.wav" in capsys.readouterr().err
    out = tmp_path / "clean" / "good.jsonl"
    assert cli(["manifest", "validate", str(tmp_path / "m.jsonl"), "--skip-bad", "-o", str(out)]) == 0
    assert "1 good lines, 1 problems" in capsys.readouterr().out
    utts = read_manifest(out)  # audio paths rewritten relative to the new manifest
    assert [u.id for u in utts] == ["a"] and Path(utts[0].audio) == (tmp_path / "a.wav").resolve()
    assert not list(out.parent.glob(".*"))  # no temp files left


def test_librispeech_import(tmp_path):
    d = tmp_path / "LibriSpeech" / "dev" / "84" / "121123"
    d.mkdir(parents=True)
    for i, n in enumerate((16000, 24000)):
        sf.write(d / f"84-121123-000{i}.flac", np.zeros(n, np.float32), 16000)
    (d / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n")
    utts = import_librispeech(tmp_path / "LibriSpeech")
    assert [(u.id, u.text, u.duration) for u in utts] == [
        ("84-121123-0000", "go do you hear", 1.0), ("84-121123-0001", "but in less than five minutes", 1.5)]
    write_manifest(tmp_path / "ls.jsonl", utts)
    assert len(read_manifest(tmp_path / "ls.jsonl")) == 2
    with pytest.raises(FileNotFoundError, match="no \\*.trans.txt files"):
        import_librispeech(tmp_path / "nothing")
