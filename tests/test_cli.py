"""mtbi_fast/cli.py: info, infer (streamed answers, bad audio), models list."""

from pathlib import Path

import yaml

from mtbi_fast.cli import main as cli
from mtbi_fast.model import ModelConfig, SpeechLLM

ROOT = Path(__file__).parents[1]


def test_info_and_version(capsys):
    assert cli(["--version"]) == 0
    assert cli(["info"]) == 0
    out = capsys.readouterr().out
    assert "loss backends on cpu: chunked, eager" in out
    assert "(auto -> chunked)" in out
    assert "attention: auto -> mtbi_varlen_sdpa" in out  # no GPU here: SDPA per packed sequence


def test_infer_streams_answers_and_reports_bad_audio(tmp_path, capsys):
    cfg = ModelConfig.from_dict(yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"])
    SpeechLLM.from_config(cfg).save_pretrained(tmp_path / "run" / "final")
    clip = ROOT / "tests" / "data" / "clip1.flac"
    assert cli(["infer", "--model", str(tmp_path / "run"), "--audio", str(clip), str(clip),
                "--prompt", "Summarize {speech}", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"== {clip}") == 2 and len(out.strip().splitlines()) >= 3
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    assert cli(["infer", "--model", str(tmp_path / "run" / "final"), "--audio", str(bad), str(clip),
                "--prompt", "Hi", "--max-new-tokens", "2", "--no-stream"]) == 1
    captured = capsys.readouterr()
    assert f"error: cannot read audio file {bad}" in captured.err
    assert f"== {clip}" in captured.out  # the other files still get their answer


def test_models_list(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MTBI_FAST_CACHE", str(tmp_path))
    assert cli(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "whisper-tiny.en" in out and str(tmp_path) in out
