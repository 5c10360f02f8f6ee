"""The training run folder (mtbi_fast/runfolder.py) function by function: checkpoints published
whole and pruned, their steps and sums checked, metrics trimmed for a resume, the DeepSpeed JSON
and the output folder checked, and which config changes make another run. The whole-run
behaviour (kill, resume, tampering) is tests/test_resume.py's."""

import hashlib
import json

import pytest

from mtbi_fast.config import load_config
from mtbi_fast.runfolder import (check_checkpoint_sums, check_output_dir, checkpoint_step,
                                 complete_checkpoints, publish_checkpoint, read_deepspeed_config,
                                 run_differences, trim_metrics)

from helpers import CONFIG, overrides

PATHS = ["data.train_manifest=a", "data.behaviors=b", "output_dir=c"]


def _checkpoint(root, step, keep_last=2):
    tmp = root / f".step-{step:06d}.tmp"
    (tmp / "model").mkdir(parents=True)
    (tmp / "model" / "weights.bin").write_bytes(bytes([step]) * 100)
    publish_checkpoint(tmp, f"step-{step:06d}", {"step": step}, keep_last)
    return root / f"step-{step:06d}"


def test_published_checkpoints_are_complete_named_by_latest_and_pruned(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15):
        folder = _checkpoint(root, step)
    assert [p.name for p in complete_checkpoints(root)] == ["step-000010", "step-000015"]
    assert (root / "latest").read_text() == "step-000015" and not list(root.glob(".step-*"))
    done = json.loads((folder / "COMPLETE").read_text())
    def sha(data):  # a file's bytes, then a NUL
        return hashlib.sha256(data + b"\0").hexdigest()

    assert done["step"] == 15 and done["sha256"] == {
        "model/weights.bin": sha(bytes([15]) * 100), "run.json": sha((folder / "run.json").read_bytes())}
    assert json.loads((folder / "run.json").read_text()) == {"step": 15}
    (root / "step-000020").mkdir()  # no COMPLETE: a save that never finished
    assert [p.name for p in complete_checkpoints(root)][-1] == "step-000015"
    check_checkpoint_sums(folder)
    (folder / "model" / "weights.bin").write_bytes(bytes([16]) * 100)  # same size, other bytes
    with pytest.raises(ValueError, match=r"weights\.bin"):
        check_checkpoint_sums(folder)


@pytest.mark.parametrize("run_json, steps, message", [
    ({"step": "10"}, 20, r"run.json: step must be an integer, got '10'"),
    ({"step": True}, 20, r"run.json: step must be an integer, got True"),
    ({"step": 9}, 20, r"run.json: step is 9, but the checkpoint is step-000010"),
    ({"step": 10}, 8, r"run.json: step 10 is past train.steps=8 \(train longer with train.steps=10"),
])
def test_checkpoint_step_names_the_file_and_the_value(tmp_path, run_json, steps, message):
    folder = tmp_path / "step-000010"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps(run_json))
    with pytest.raises(ValueError, match=message):
        checkpoint_step(folder, steps)


def test_checkpoint_step_of_a_good_checkpoint(tmp_path):
    folder = tmp_path / "step-000010"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"step": 10}))
    assert checkpoint_step(folder, 10) == 10


def test_trim_metrics_keeps_the_rows_up_to_the_resumed_step(tmp_path):
    rows = [{"step": 0, "eval_kl": 3.0}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5},
            {"step": 3, "loss": 1.2}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo'  # a row cut by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    trim_metrics(tmp_path, 2)
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows[:3]
    trim_metrics(tmp_path, 0)  # starting over: the step-0 evaluation is written again too
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    trim_metrics(tmp_path / "nothing-here", 3)  # no metrics yet: nothing to do


@pytest.mark.parametrize("text, message", [
    (None, r"DeepSpeed config not found: .*ds\.json \(the deepspeed key\)"),
    ('{"zero_optimization": ', r"ds\.json: not valid JSON \(.* at line 1 column \d+\)"),
    ("[1, 2]", r"ds\.json: a DeepSpeed config must be a JSON object, got list"),
    ('{"zero_optimization": 3}', r"ds\.json: zero_optimization must be an object"),
])
def test_deepspeed_json_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "ds.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_deepspeed_config(str(path))


def test_output_dir_must_be_a_writable_folder(tmp_path):
    check_output_dir(tmp_path / "new" / "run")  # created
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"output_dir .*file is not a writable folder"):
        check_output_dir(tmp_path / "file")


def test_runs_recorded_before_the_streaming_keys_resume(data, tmp_path):
    """A run recorded before data.reader and the other new keys existed is the same run."""
    cfg = load_config(CONFIG, overrides(data, tmp_path / "o"))
    old = json.loads(json.dumps(cfg))
    for key in ("reader", "train_shards", "shuffle_cuts", "length_buckets", "skip_bad_shards"):
        del old["data"][key]
    del old["packing"]["token_budget"]
    assert run_differences({"config": old}, cfg, {}) == []
    cfg["data"]["shuffle_cuts"] = 7
    assert run_differences({"config": old}, cfg, {}) == ["data.shuffle_cuts (<missing> -> 7)"]


def test_a_model_key_spelled_at_its_default_is_the_same_run():
    """A base file may spell out model keys a recorded run left to ModelConfig's defaults: resume
    takes them as the same run; at another value they differ."""
    cfg = load_config(CONFIG, PATHS)
    recorded = {"config": json.loads(json.dumps(cfg))}
    cfg["model"].update(init_seed=0, max_audio_seconds=30.0, train_encoder_layers=0)
    assert run_differences(recorded, cfg, {}) == []
    cfg["model"]["init_seed"] = 3
    assert run_differences(recorded, cfg, {}) == ["model.init_seed (<missing> -> 3)"]
