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
    assert "1 good lines, 1 bad line (decoded, " in capsys.readouterr().out
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


# ---------------------------------------------------------------------------------------------
# audio checked up front: decoding, non-finite samples, truncation, the model's length limit


@pytest.fixture
def bad_audio(tmp_path):
    """A manifest of one good clip and every kind of audio training cannot use."""
    t = np.arange(16000) / 16000
    tone = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    sf.write(tmp_path / "good.flac", tone, 16000)
    whole = (tmp_path / "good.flac").read_bytes()
    sf.write(tmp_path / "long.flac", np.tile(tone, 3), 16000)
    (tmp_path / "cut.flac").write_bytes((tmp_path / "long.flac").read_bytes()[:len(whole) * 2])
    sf.write(tmp_path / "nan.wav", np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    inf = tone.copy()
    inf[100] = np.inf
    sf.write(tmp_path / "inf.wav", inf, 16000, subtype="FLOAT")
    sf.write(tmp_path / "40s.flac", np.zeros(40 * 16000, np.float32), 16000)
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really audio")
    row = lambda i, a, d, text="hello there": {"id": i, "audio": a, "text": text, "duration": d}  # noqa: E731
    write_lines(tmp_path / "m.jsonl", [row("ok", "good.flac", 1.0), row("cut", "cut.flac", 3.0),
                                       row("nan", "nan.wav", 1.0), row("inf", "inf.wav", 1.0),
                                       row("long", "40s.flac", 40.0), row("junk", "junk.wav", 1.0),
                                       row("two", "nan.wav", 1.0, text=" ")])
    return tmp_path


def test_decoding_rejects_truncated_and_non_finite_audio(bad_audio):
    m = bad_audio / "m.jsonl"
    # headers alone pass the truncated FLAC and the NaN/inf WAVs (what the issue found)
    good, problems = read_manifest(m, skip_bad=True)
    assert [u.id for u in good] == ["ok", "cut", "nan", "inf", "long"]
    good, problems = read_manifest(m, skip_bad=True, decode=True, max_seconds=30)
    assert [u.id for u in good] == ["ok"]
    assert len(problems) == 6  # one per bad line, however many faults it has
    import re
    expected = [
        rf"^{m}:2: cut: cannot read audio file {bad_audio / 'cut.flac'}: ",
        rf"^{m}:3: nan: audio file {bad_audio / 'nan.wav'} has NaN or infinite samples$",
        rf"^{m}:4: inf: audio file {bad_audio / 'inf.wav'} has NaN or infinite samples$",
        rf"^{m}:5: long: audio is 40.00 s long, over the model's limit of 30 s$",
        rf"^{m}:6: junk: cannot read audio {bad_audio / 'junk.wav'}: ",
        rf"^{m}:7: two: empty or missing 'text'; audio file {bad_audio / 'nan.wav'} has NaN or "
        r"infinite samples$",
    ]
    for p, e in zip(problems, expected):
        assert re.search(e, p), (e, p)
    with pytest.raises(ManifestError) as err:
        read_manifest(m, decode=True)
    assert str(err.value).splitlines()[0] == f"{m}: 5 bad lines, the first: {problems[0]}"


def test_a_decoded_length_short_of_the_header_is_truncation(tmp_path, monkeypatch):
    """A FLAC cut at a frame boundary may decode without an error: the decoded length is
    compared with the header's."""
    import torch

    import mtbi_fast.data as data  # read_manifest's load_audio

    sf.write(tmp_path / "a.flac", np.zeros(32000, np.float32), 16000)
    write_lines(tmp_path / "m.jsonl", [{"id": "a", "audio": "a.flac", "text": "hi", "duration": 2.0}])
    monkeypatch.setattr(data, "load_audio", lambda path, **kw: torch.zeros(16000))
    _, problems = read_manifest(tmp_path / "m.jsonl", skip_bad=True, decode=True)
    assert problems == [f"{tmp_path / 'm.jsonl'}:1: a: audio file {tmp_path / 'a.flac'} is truncated: "
                        "it decodes to 1.00 s of the 2.00 s its header declares"]


def test_cli_validate_decodes_by_default_and_counts_lines(bad_audio, capsys):
    m = str(bad_audio / "m.jsonl")
    assert cli(["manifest", "validate", m]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6 and err[-1] == f"{m}: 5 bad lines (--skip-bad -o GOOD.jsonl writes the good ones)"
    assert "nan: audio file" in err[1]
    assert cli(["manifest", "validate", m, "--skip-bad", "--config", "configs/tiny_train.yaml"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0] == "longest clip the model takes: 30 s (model.max_audio_seconds = 30)"
    assert out.out.splitlines()[1].startswith("1 good lines, 6 bad lines (decoded, ")
    assert len(out.err.splitlines()) == 6
    assert cli(["manifest", "validate", m, "--skip-bad", "--no-decode"]) == 0
    assert capsys.readouterr().out.startswith("5 good lines, 2 bad lines (headers read, ")


def test_max_audio_seconds_from_the_model_config(tmp_path):
    from mtbi_fast.encoders import max_audio_seconds

    assert max_audio_seconds({"encoder": {"tiny": {}}}) == (30.0, "model.max_audio_seconds = 30")
    assert max_audio_seconds({"encoder": {"tiny": {}}, "max_audio_seconds": 12.5})[0] == 12.5
    assert max_audio_seconds({"encoder": {"tiny": {"max_source_positions": 750}}}) == (
        15.0, "the encoder's max_source_positions = 750 (x 2 / 100 = 15 s)")
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"model_type": "whisper",
                                                              "max_source_positions": 1000}))
    assert max_audio_seconds({"encoder": {"path": str(tmp_path / "enc")}})[0] == 20.0
    assert max_audio_seconds({"encoder": {"hub": "openai/whisper-tiny"}})[0] == 30.0  # not read
    with pytest.raises(FileNotFoundError, match="encoder config not found: .*nothing/config.json"):
        max_audio_seconds({"encoder": {"path": str(tmp_path / "nothing")}})


def test_a_decoder_error_is_one_short_line():
    """What a bad clip's error says: no object reprs, no kilobytes of Lhotse cut repr, capped."""
    from mtbi_fast.dataset import MAX_ERROR_CHARS, BadAudioError, features_or_bad_audio
    from mtbi_fast.encoders import LogMelFrontEnd

    def corrupt_flac():
        import io
        raise RuntimeError(f"Error opening {io.BytesIO(b'x')!r}: Format not recognised.")

    with pytest.raises(BadAudioError) as exc:
        features_or_bad_audio("u1", "shard recording.000001.tar (cut 'u1')", corrupt_flac, LogMelFrontEnd(), True)
    assert "object at 0x" not in str(exc.value) and "Error opening the audio bytes: Format not recognised" in str(exc.value)

    def lhotse_style():
        raise ValueError("Reading audio from MonoCut(id='u1', start=0, duration=3.2, channel=0, supervisions=["
                         + "SupervisionSegment(id='u1', text='" + "word " * 400 + "')])) failed")

    with pytest.raises(BadAudioError) as exc:
        features_or_bad_audio("u1", "shard recording.000001.tar (cut 'u1')", lhotse_style, LogMelFrontEnd(), True)
    msg = str(exc.value)
    assert "cut 'u1'" in msg and "SupervisionSegment" not in msg and len(msg) < MAX_ERROR_CHARS + 120, msg
