"""experiments/generalization_study.py on the tiny random models and the demo corpus: every arm and
seed trains, the differences are MTBI's paired differences from each baseline (checked against the
evaluation rows), the goal's verdict follows them, and a rerun trains nothing again."""

import importlib.util
import json
import os

import pytest

from helpers import ROOT

OFFLINE = os.environ.get("MTBI_FAST_OFFLINE") == "1"


def load_study():
    spec = importlib.util.spec_from_file_location("generalization_study",
                                                  ROOT / "experiments" / "generalization_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(OFFLINE, reason="the evaluation's sentence embedder comes from PyPI")
def test_tiny_study_end_to_end(tmp_path):
    study_mod = load_study()
    out = tmp_path / "study"
    argv = ["--output", str(out), "--tiny", "--steps", "4", "--small", "10", "--seeds", "0", "1"]
    assert study_mod.main(argv) == 0
    study = json.loads((out / "study.json").read_text())
    assert (out / "report.md").is_file() and (out / "eval_kl.png").is_file() and (out / "differences.png").is_file()
    # the report's repeat WER over all words is the evaluation's own (same rows, same transcripts)
    repeat = json.loads((out / "eval" / "eval.json").read_text())["repeat"]
    assert f"| mtbi-s0 | seen task, seen wording | {repeat['mtbi-s0']['train']['wer']:.3f} |" in (
        out / "report.md").read_text()
    runs = [f"{arm}-s{seed}" for seed in (0, 1) for arm in study_mod.ARMS if arm != "mtbi-small" or seed == 0]
    assert sorted(study["eval_kl"]) == sorted(runs)
    assert all([step for step, _ in curve] == [0, 1, 2, 3, 4] for curve in study["eval_kl"].values())

    # the differences: MTBI minus the baseline on the same prompts, from the evaluation rows
    rows = json.loads((out / "eval" / "eval.json").read_text())["rows"]
    by = {(r["model"], r["id"]): r for r in rows}
    for seed in ("0", "1"):
        assert set(study["differences"][seed]) == set(study_mod.BASELINES)
        for base in study_mod.BASELINES:
            for split, cells in study["differences"][seed][base].items():
                ids = [r["id"] for r in rows if r["model"] == f"mtbi-s{seed}" and r["split"] == split]
                d = [by[(f"mtbi-s{seed}", i)]["rouge_l"] - by[(f"{base}-s{seed}", i)]["rouge_l"] for i in ids]
                assert cells["rouge_l"]["mean"] == pytest.approx(sum(d) / len(d))
                assert cells["rouge_l"]["lo"] <= cells["rouge_l"]["mean"] <= cells["rouge_l"]["hi"]
    # the verdict: a comparison holds when ROUGE-L's or chrF's interval is above 0
    assert len(study["goal"]) == 2 * 2 * 2
    for seed in ("0", "1"):
        for base in study_mod.GOAL_BASELINES:
            for split in study_mod.GOAL_SPLITS:
                cells = study["differences"][seed][base][split]
                key = f"s{seed} vs {base}, {study_mod.SPLIT_NAMES[split]}"
                assert study["goal"][key] == (cells["rouge_l"]["lo"] > 0 or cells["chrf"]["lo"] > 0)
    assert study["goal_met"] == all(study["goal"].values()) and study["goal_tested"]
    assert study_mod.verdict(study) == ("met" if study["goal_met"] else "not met")
    assert study_mod.verdict({"goal": {}, "goal_met": False}).startswith("not tested")
    # the memorization check: MTBI minus MTBI-small, seed 0, prompt by prompt
    for split, cells in study["memorization"].items():
        ids = [r["id"] for r in rows if r["model"] == "mtbi-s0" and r["split"] == split]
        d = [by[("mtbi-s0", i)]["chrf"] - by[("mtbi-small-s0", i)]["chrf"] for i in ids]
        assert cells["chrf"]["mean"] == pytest.approx(sum(d) / len(d))
    assert set(study["memorization"]) == {r["split"] for r in rows}

    # a rerun finds every run complete and the evaluation done
    stamps = {r: (out / f"run-{r}" / "metrics.jsonl").stat().st_mtime_ns for r in runs}
    assert study_mod.main(argv) == 0
    assert stamps == {r: (out / f"run-{r}" / "metrics.jsonl").stat().st_mtime_ns for r in runs}
    # ... and keeps what the training and the evaluation took the first time
    again = json.loads((out / "study.json").read_text())["seconds"]
    assert again["training"] == study["seconds"]["training"] > 0
    assert again["evaluation"] == study["seconds"]["evaluation"] > 0
