"""mtbi_fast/cli.py: info, infer (streamed answers, bad audio), models list."""

import re
from pathlib import Path

import pytest
import yaml

from mtbi_fast.cli import main as cli
from mtbi_fast.model import ModelConfig, SpeechLLM

ROOT = Path(__file__).parents[1]


def test_info_and_version(capsys):
    assert cli(["--version"]) == 0
    assert cli(["info"]) == 0
    out = capsys.readouterr().out
    from mtbi_fast.loss import available_backends

    assert {"torch", "eager"} <= set(available_backends("cpu"))  # triton too under TRITON_INTERPRET=1
    assert f"loss backends on cpu: {', '.join(available_backends('cpu'))} (auto -> torch)" in out
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
                "--prompt", "Hi", "--max-new-tokens", "2", "--no-stream"]) == 2
    captured = capsys.readouterr()
    assert f"skipped: cannot read audio file {bad}" in captured.err
    assert captured.err.strip().splitlines()[-1] == (
        f"mtbi-fast: error: 1 of 2 audio files could not be answered (each is named above): {bad}")
    assert f"== {clip}" in captured.out  # the other files still get their answer
    assert cli(["infer", "--model", str(tmp_path / "run"), "--audio", str(clip),
                "--prompt", "Compare {speech} with {speech}"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "mtbi-fast: error: the prompt has {speech} 2 times; it marks the one place the utterance "
        "goes: 'Compare {speech} with {speech}'"]


@pytest.mark.parametrize("command", ["infer", "eval"])
@pytest.mark.parametrize("flag, value, message", [
    ("--no-repeat-ngram", "0", "--no-repeat-ngram: no_repeat_ngram must be an integer >= 1, got 0"),
    ("--repetition-penalty", "-1", "--repetition-penalty: repetition_penalty must be a finite number > 0, got -1.0"),
])
def test_decoding_flags_refuse_bad_values_before_loading(command, flag, value, message, tmp_path):
    args = {"infer": ["--audio", "x.wav", "--prompt", "Hi"],
            "eval": ["--manifest", "x.jsonl", "-o", str(tmp_path / "eval")]}[command]
    with pytest.raises(SystemExit, match=f"^{re.escape(message)}$"):
        cli([command, "--model", str(tmp_path / "no-run"), *args, flag, value])


def test_models_list(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MTBI_FAST_CACHE", str(tmp_path))
    assert cli(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "whisper-tiny.en" in out and str(tmp_path) in out


# ---------------------------------------------------------------------------------------------
# user errors: one line naming the file, key or utterance; exit code 2; --debug for the traceback


def behaviors_args(manifest, out, config="configs/tiny.yaml", *extra):
    return ["behaviors", "--manifest", str(manifest), "--config", str(ROOT / config), "-o", str(out),
            "--per-utterance", "1", "--max-new-tokens", "2", *extra]


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.rstrip("\n")


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    clips = ROOT / "tests" / "data" / "clips.jsonl"
    missing = tmp_path / "missing.yaml"
    assert cli(behaviors_args(clips, tmp_path / "b", missing)) == 2
    assert one_error(capsys) == f"mtbi-fast: error: config not found: {missing}"
    (tmp_path / "bad.yaml").write_text("model:\n  llm: {tiny: {}}\n  colour: red\n")
    assert cli(behaviors_args(clips, tmp_path / "b", tmp_path / "bad.yaml")) == 2
    assert one_error(capsys).startswith("mtbi-fast: error: unknown key model.colour (allowed: [")

    m = tmp_path / "m.jsonl"
    m.write_text(clips.read_text().replace("clip2.flac", "nope.flac").replace('"clip1.flac"',
                                                                             f'"{ROOT}/tests/data/clip1.flac"'))
    (tmp_path / "clip3.flac").write_bytes((ROOT / "tests" / "data" / "clip3.flac").read_bytes())
    assert cli(behaviors_args(m, tmp_path / "b")) == 2
    assert one_error(capsys) == f"mtbi-fast: error: {m}:2: clip2: audio file not found: {tmp_path / 'nope.flac'}"
    m.write_text(m.read_text().replace("clip3.flac", "gone.flac"))
    assert cli(behaviors_args(m, tmp_path / "b")) == 2
    assert one_error(capsys) == (
        f"mtbi-fast: error: {m}: 2 bad lines, the first: {m}:2: clip2: audio file not found: "
        f"{tmp_path / 'nope.flac'} (+1 more line: run with --debug or MTBI_FAST_DEBUG=1)")
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_behaviors_only_tasks(tmp_path, capsys):
    from mtbi_fast.behaviors_folder import read_behaviors
    from mtbi_fast.tasks import TaskLibrary

    clips = ROOT / "tests" / "data" / "clips.jsonl"
    library = ROOT / "configs" / "tasks.yaml"
    names = ", ".join(sorted(TaskLibrary.load(library).tasks))
    assert cli(behaviors_args(clips, tmp_path / "b", "configs/tiny.yaml", "--only-tasks", "repeat,recite")) == 2
    assert one_error(capsys) == (f"mtbi-fast: error: --only-tasks (configs/tasks.yaml): unknown task "
                                 f"'recite' (the library's tasks: {names})")
    assert cli(behaviors_args(clips, tmp_path / "b", "configs/tiny.yaml", "--only-tasks", " , ")) == 2
    assert one_error(capsys) == (f"mtbi-fast: error: --only-tasks (configs/tasks.yaml): no task named "
                                 f"(the library's tasks: {names})")
    assert cli(behaviors_args(clips, tmp_path / "b", "configs/tiny.yaml", "--only-tasks", "repeat",
                              "--split", "heldout_task")) == 2  # repeat is a training task
    assert one_error(capsys) == ("mtbi-fast: error: --only-tasks (configs/tasks.yaml): no heldout_task "
                                 "prompts of tasks ['repeat'] in the split (its tasks: give_title, "
                                 "judge_sentiment)")
    assert not (tmp_path / "b").exists()  # refused before anything was written

    out = tmp_path / "r"
    assert cli(behaviors_args(clips, out, "configs/tiny.yaml", "--only-tasks", "repeat",
                              "--tasks", str(library), "--per-utterance", "2")) == 0
    records = read_behaviors(out)
    n_clips = len(clips.read_text().splitlines())
    assert len(records) == 2 * n_clips and {r["task"] for r in records} == {"repeat"}


def test_behaviors_folder_in_use_and_made_differently(tmp_path, capsys):
    import os
    import socket

    from mtbi_fast.lock import FolderLock

    clips = ROOT / "tests" / "data" / "clips.jsonl"
    out = tmp_path / "b"
    with FolderLock(out, "behaviors"):
        assert cli(behaviors_args(clips, out)) == 2
        err = one_error(capsys)
    assert err.startswith(f"mtbi-fast: error: {out} is in use by process {os.getpid()} on "
                          f"{socket.gethostname()} (behaviors, since ")
    assert err.endswith(f"(lock file {out / '.lock'}); wait for it to finish or stop it, or use another folder")
    assert cli(behaviors_args(clips, out)) == 0
    capsys.readouterr()
    assert cli(behaviors_args(clips, out, "configs/tiny_train.yaml")) == 2  # another LLM init
    err = one_error(capsys)
    assert err.startswith(f"mtbi-fast: error: {out} holds behaviors made differently: "
                          "teacher.config_sha256 (recorded '")
    assert "teacher.weights" not in err
    assert cli(behaviors_args(clips, out, "configs/tiny_train.yaml", "--overwrite")) == 0
    assert f"its files were moved to {tmp_path}/b.replaced-" in capsys.readouterr().out
    from mtbi_fast.provenance import check_teacher

    check_teacher(out, yaml.safe_load((ROOT / "configs" / "tiny_train.yaml").read_text())["model"])


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import os
    import subprocess
    import sys

    import pytest

    from mtbi_fast.errors import DEBUG_ENV

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    missing = str(tmp_path / "nope.jsonl")
    for argv in (["--debug", "manifest", "validate", missing], ["manifest", "validate", missing, "--debug"]):
        with pytest.raises(FileNotFoundError, match="manifest not found"):
            cli(argv)
        assert DEBUG_ENV not in os.environ  # restored
    assert cli(["manifest", "validate", missing]) == 2
    assert one_error(capsys) == f"mtbi-fast: error: manifest not found: {missing}"
    run = subprocess.run([sys.executable, "-m", "mtbi_fast.cli", "--debug", "manifest", "validate",
                          missing], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1 and "Traceback (most recent call last)" in run.stderr
    assert run.stderr.rstrip().endswith(f"FileNotFoundError: manifest not found: {missing}")


def test_train_forwards_overwrite(monkeypatch):
    import mtbi_fast.train as train

    seen = []
    monkeypatch.setattr(train, "main", lambda argv: seen.append(argv) or 0)
    assert cli(["train", "run.yaml", "train.steps=3", "--no-resume", "--overwrite"]) == 0
    assert seen == [["--config", "run.yaml", "--no-resume", "--overwrite", "train.steps=3"]]
