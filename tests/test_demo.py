"""`mtbi-fast demo --tiny`: the whole pipeline (behaviors, training, evaluation, report) end to end."""

import json

from mtbi_fast.cli import main as cli


def test_tiny_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--tiny", "--output", str(out)]) == 0
    for name in ("report.md", "loss_curve.png", "eval/eval.png", "eval/eval.json", "eval/eval.md",
                 "run/final/model.safetensors", "run/metrics.jsonl", "behaviors/split.json"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "Held-out imitation KL (speech only)" in report and "new task" in report
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_kl" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["eval_kl"] < evals[0]["eval_kl"]  # held-out imitation improves
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert {r["model"] for r in result["rows"]} == {"teacher", "mtbi", "untrained"}
    assert set(result["deltas"]) == {"mtbi"} and "Difference from the untrained model" in report
    # a second run resumes from what is there: nothing is regenerated or retrained
    stamp = (out / "behaviors" / "part-00000.jsonl").stat().st_mtime
    assert cli(["demo", "--tiny", "--output", str(out)]) == 0
    assert (out / "behaviors" / "part-00000.jsonl").stat().st_mtime == stamp
    assert "Held-out imitation KL" in capsys.readouterr().out


def test_tiny_demo_with_baselines(tmp_path):
    """--baselines: continuation-only and no-interleaving runs, evaluated in the same table."""
    out = tmp_path / "demo"
    assert cli(["demo", "--tiny", "--baselines", "--output", str(out)]) == 0
    tasks = {json.loads(line)["task"] for line in (out / "behaviors-continue" / "part-00000.jsonl")
             .read_text().splitlines()}
    assert tasks == {"continue"}
    ratios = {json.loads(line).get("ratio") for line in (out / "run-no-interleave" / "metrics.jsonl")
              .read_text().splitlines()} - {None}
    assert ratios == {0.0}
    models = {r["model"] for r in json.loads((out / "eval" / "eval.json").read_text())["rows"]}
    assert models == {"teacher", "mtbi", "continue-only", "no-interleave", "untrained"}
    deltas = json.loads((out / "eval" / "eval.json").read_text())["deltas"]
    assert set(deltas) == {"mtbi", "continue-only", "no-interleave"}  # each against the untrained


def test_demo_steps_must_be_sensible(tmp_path):
    import pytest

    from mtbi_fast.demo import run_demo

    with pytest.raises(ValueError, match="--steps must be >= 4, got 2"):
        run_demo(tmp_path / "demo", tiny=True, steps=2)
    assert not (tmp_path / "demo").exists()  # refused before anything was written



def test_tiny_demo_on_the_larger_corpus(tmp_path, monkeypatch):
    """--corpus large takes its utterances from `mtbi-fast corpus build`'s folder (here a stand-in
    folder given as the cached corpus; the build itself: tests/test_corpus.py)."""
    import mtbi_fast.corpus as corpus_mod
    from mtbi_fast.data import Utterance, read_manifest, write_manifest
    from helpers import ROOT

    built = tmp_path / "natural"
    for split, n in (("train", 40), ("test", 4)):
        utts = read_manifest(ROOT / "data" / "demo" / f"{split}.jsonl", require_words=True)[:n]
        write_manifest(built / f"{split}.jsonl", [Utterance(f"nat-{u.id}", u.audio, u.text, u.duration, u.words,
                                                            {"speaker": "stand-in"}) for u in utts])
    monkeypatch.setattr(corpus_mod, "build_corpus", lambda *a, **k: built)
    out = tmp_path / "demo"
    assert cli(["demo", "--tiny", "--corpus", "large", "--output", str(out), "--steps", "4"]) == 0
    used = read_manifest(out / "train.jsonl")
    assert len(used) == 40 and all(u.id.startswith("nat-") and u.extra == {"speaker": "stand-in"} for u in used)
    assert "the larger corpus" in (out / "report.md").read_text()
