"""experiments/probe_settings.py: its decoding switches are checked before anything loads."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def load_probe():
    spec = importlib.util.spec_from_file_location("probe_settings", ROOT / "experiments" / "probe_settings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("extra, message", [
    (["--repeat-wer", "--no-repeat-ngram", "0"], "no_repeat_ngram must be an integer >= 1, got 0"),
    (["--repeat-wer", "--repetition-penalty", "0"], "repetition_penalty must be a finite number > 0, got 0.0"),
    (["--no-repeat-ngram", "3"], "--no-repeat-ngram and --repetition-penalty shape the --repeat-wer answers: "
                                 "add --repeat-wer"),
])
def test_bad_decoding_switches_are_refused_by_name(extra, message, monkeypatch, capsys, tmp_path):
    probe = load_probe()
    monkeypatch.setattr(sys, "argv", ["probe_settings.py", str(tmp_path / "no-demo"), "h", *extra])
    with pytest.raises(SystemExit) as exc:
        probe.main()
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {message}")
