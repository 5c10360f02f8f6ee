"""``train.report_to`` (mtbi_fast/tracking.py): TensorBoard and W&B get the rows of metrics.jsonl;
a tracker that is not installed is an error naming its package."""

import importlib.util
import json
from pathlib import Path

import pytest

from mtbi_fast.cli import main as cli
from mtbi_fast.config import load_config

from helpers import CONFIG, metrics, overrides


def tensorboard_scalars(folder) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def wandb_records(path) -> list:
    """The protobuf records of an offline W&B run file (``run-<id>.wandb``): a 7-byte W&B header,
    then a LevelDB log (32 KiB blocks; each chunk a 7-byte header: checksum, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B"
    records, pos, buf = [], 7, b""
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        if length == 0 and kind == 0:
            break
        buf += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def test_tensorboard_gets_every_number_of_metrics_jsonl(data, tmp_path):
    out = tmp_path / "run"
    assert cli(["train", str(CONFIG), *overrides(data, out, "train.steps=3", "train.eval_every=3")]) == 0
    scalars = tensorboard_scalars(out / "tensorboard")
    rows = metrics(out)
    for row in rows:
        for key, value in row.items():
            if key in ("step", "time") or value is None:  # mfu is null off a GPU
                assert key not in scalars or row["step"] not in scalars[key]
                continue
            assert scalars[key][row["step"]] == pytest.approx(value, rel=1e-6), key
    assert {"loss", "kl", "lr", "eval_kl"} <= set(scalars)


def test_wandb_offline_writes_the_config_and_the_scalars(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    args = overrides(data, out, "train.steps=3", "train.save_every=3", "train.report_to=[wandb]")
    assert cli(["train", str(CONFIG), *args]) == 0
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (out / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(run_id) and list(runs[0].glob(f"run-{run_id}.wandb"))
    records = wandb_records(next(runs[0].glob(f"run-{run_id}.wandb")))
    config = {u.key: json.loads(u.value_json) for r in records if r.HasField("run") for u in r.run.config.update}
    config.update({u.key: json.loads(u.value_json) for r in records if r.HasField("config") for u in r.config.update})
    assert config["train"]["steps"] == 3 and config["output_dir"] == str(out)
    history = {}
    for r in records:
        if r.HasField("history"):
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
    for row in metrics(out):  # every number of every row, at its step
        for key, value in row.items():
            if key not in ("step", "time") and value is not None:
                assert history[row["step"]][key] == pytest.approx(value), (row["step"], key)
    assert not (out / "tensorboard").exists()  # report_to names the trackers: only W&B here
    # a resumed run continues the same W&B run
    assert cli(["train", str(CONFIG), *args[:-3], "train.steps=5", "train.save_every=3",
                "train.report_to=[wandb]"]) == 0
    assert (out / "wandb_run_id").read_text().strip() == run_id
    assert all(p.name.endswith(run_id) for p in (out / "wandb").glob("offline-run-*"))


def test_a_tracker_that_is_not_installed_is_an_error_naming_the_package(data, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    base = overrides(data, tmp_path / "run")
    with pytest.raises(ValueError, match=r"train\.report_to: wandb needs the wandb package, which is not "
                                         r"installed: pip install wandb"):
        load_config(CONFIG, [*base, "train.report_to=[tensorboard, wandb]"])
    with pytest.raises(ValueError, match=r"unknown tracker 'mlflow' \(known: tensorboard, wandb\)"):
        load_config(CONFIG, [*base, "train.report_to=[mlflow]"])
    with pytest.raises(ValueError, match=r"train.report_to must be list, got str"):  # the schema check
        load_config(CONFIG, [*base, "train.report_to=tensorboard"])
    assert load_config(CONFIG, [*base, "train.report_to=[]"])["train"]["report_to"] == []
    assert load_config(CONFIG, base)["train"]["report_to"] == ["tensorboard"]  # the default
