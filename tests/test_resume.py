"""What resume promises (docs/resume.md): nothing is unpickled from a run folder, a checkpoint is
resumed only by the same run (config and data), --no-resume never loses or reuses the old run,
``checkpoints/latest`` never names an incomplete step, no metrics row appears twice, and one
training at a time writes into an output folder."""

import os
import pickle
import re
import shutil

import pytest
import torch

import mtbi_fast.train as train_mod
from mtbi_fast.config import load_config
from mtbi_fast.lock import FolderLockedError
from mtbi_fast.model import SpeechLLM
from mtbi_fast.runfolder import weights_only_deepspeed_loads
from mtbi_fast.trainer import Trainer

from helpers import CONFIG, ROOT, metrics, overrides

QUIET = ["train.eval_every=0"]


class Payload:
    """A pickle that runs a command when it is loaded (what issue 14 found a checkpoint can do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def run(data, out, *extra, flags=()):
    return train_mod.main(["--config", str(CONFIG), *flags, *overrides(data, out, *extra)])


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "mtbi-fast train: error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


def steps(out, key="loss"):
    return [r["step"] for r in metrics(out) if key in r]


def test_resume_checks_the_config_and_the_data(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(data, out, "train.steps=4", "train.save_every=2", *QUIET) == 0
    capsys.readouterr()
    # another learning rate (and a longer run, which is allowed): refused, naming the key
    assert run(data, out, "train.steps=6", "train.save_every=2", "train.lr=0.01", *QUIET) == 2
    line = error_line(capsys)
    assert re.search(r"cannot resume from .*checkpoints/step-000004: train\.lr \(0\.003 -> 0\.01\)\. "
                     r"Only ", line), line
    assert "train.steps (" not in line and "--no-resume --overwrite" in line
    # other behaviors (one record changed) under another path: refused by content
    beh = tmp_path / "beh-edited"
    shutil.copytree(data / "beh", beh)
    shard = beh / "part-00000.jsonl"
    shard.write_text(shard.read_text().replace('"task": "', '"task": "x', 1))
    assert run(data, out, "train.steps=6", "train.save_every=2", f"data.behaviors={beh}", *QUIET) == 2
    assert re.search(r"data\.behaviors \(other contents\)", error_line(capsys))
    assert steps(out) == [1, 2, 3, 4]  # nothing was touched
    # the same behaviors moved elsewhere, a longer run logged less often: resumed
    moved = tmp_path / "moved"
    shutil.copytree(data / "beh", moved)
    assert run(data, out, "train.steps=6", "train.save_every=2", f"data.behaviors={moved}",
               "train.log_every=2", *QUIET) == 0
    assert re.search(r"resumed from .*step-000004 at step 4", capsys.readouterr().out)
    assert steps(out) == [1, 2, 3, 4, 6]


def test_no_resume_refuses_or_moves_the_old_run_aside(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["train.steps=2", "train.save_every=2", "train.eval_every=2"]
    assert run(data, out, *args) == 0
    before = metrics(out)
    assert [r["step"] for r in before if "eval_kl" in r] == [0, 2]
    capsys.readouterr()
    assert run(data, out, *args, flags=["--no-resume"]) == 2
    line = error_line(capsys)
    assert re.search(r"--no-resume: .*run already holds a run \(checkpoints, config\.yaml, final, "
                     r"metrics\.jsonl, run\.json, tensorboard\); .* add --overwrite to move it aside to "
                     r"run\.replaced-<time>", line), line
    # a new run (another learning rate) started clean and killed before its first checkpoint
    real_log = Trainer._log

    def dying_log(self, *a, **k):
        real_log(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_log", dying_log)
    with pytest.raises(KeyboardInterrupt):
        run(data, out, *args, "train.lr=0.01", flags=["--no-resume", "--overwrite"])
    monkeypatch.setattr(Trainer, "_log", real_log)
    (old,) = tmp_path.glob("run.replaced-*")  # the old run, whole
    assert (old / "checkpoints" / "step-000002" / "COMPLETE").is_file()
    assert (old / "checkpoints" / "latest").read_text() == "step-000002"
    assert metrics(old) == before and (old / "final" / "model.safetensors").is_file()
    assert not (out / "checkpoints").exists()
    # rerun as it was: nothing of the old run is resumed, and no row is written twice (the
    # step-0 evaluation of the killed start included)
    assert run(data, out, *args, "train.lr=0.01") == 0
    assert "resumed" not in capsys.readouterr().out
    rows = metrics(out)
    assert [(r["step"], "eval_kl" in r) for r in rows] == [(0, True), (1, False), (2, False), (2, True)]
    assert rows[1]["lr"] != before[1]["lr"]


def test_latest_never_names_an_incomplete_checkpoint(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["train.steps=6", "train.save_every=2", *QUIET]
    real_export = Trainer.export

    def dying_export(self, directory):
        if directory.parent.name == ".step-000004.tmp":
            raise KeyboardInterrupt  # killed while the step-4 checkpoint exports its model
        return real_export(self, directory)

    monkeypatch.setattr(Trainer, "export", dying_export)
    with pytest.raises(KeyboardInterrupt):
        run(data, out, *args)
    monkeypatch.setattr(Trainer, "export", real_export)
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step-000002"
    assert (root / ".step-000004.tmp").is_dir() and not (root / "step-000004").exists()
    # the plain trainer state: safetensors and JSON, no pickle
    assert sorted(p.name for p in (root / "step-000002").iterdir()) == [
        "COMPLETE", "model", "run.json", "trainer.json", "trainer.safetensors"]
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')  # a row cut short by the kill
    capsys.readouterr()
    assert run(data, out, *args) == 0
    assert re.search(r"resumed from .*step-000002 at step 2", capsys.readouterr().out)
    assert not (root / ".step-000004.tmp").exists()
    assert (root / "latest").read_text() == "step-000006"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000004", "step-000006"]
    assert steps(out) == [1, 2, 3, 4, 5, 6]


def test_one_training_per_output_dir(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    first = Trainer(load_config(CONFIG, overrides(data, out, "train.steps=1", *QUIET)))

    def no_model(*a, **k):
        raise AssertionError("the model was built before the lock was checked")

    with monkeypatch.context() as m:
        m.setattr(SpeechLLM, "from_config", no_model)
        assert run(data, out, "train.steps=1", *QUIET) == 2
        line = error_line(capsys)
        assert re.search(rf"run is in use by process {os.getpid()} on .* \(training, since ", line), line
        with pytest.raises(FolderLockedError):
            Trainer(load_config(CONFIG, overrides(data, out, "train.steps=1")))
    first.train()  # releases the folder when it ends
    assert run(data, out, "train.steps=2", *QUIET) == 0
    assert steps(out) == [1, 2]


def test_crafted_trainer_state_is_never_unpickled(data, tmp_path, capsys):
    out = tmp_path / "run"
    marker = tmp_path / "payload-ran"
    assert run(data, out, "train.steps=2", "train.save_every=2", *QUIET) == 0
    ckpt = out / "checkpoints" / "step-000002"
    # an old-style trainer.pt with a payload, beside the real state: refused, never loaded
    torch.save({"step": 2, "optimizer": Payload(marker)}, ckpt / "trainer.pt")
    capsys.readouterr()
    assert run(data, out, "train.steps=4", "train.save_every=2", *QUIET) == 2
    assert re.search(r"refusing to resume: .*step-000002/trainer\.pt does not load as plain tensors",
                     error_line(capsys))
    assert not marker.exists()
    (ckpt / "trainer.pt").unlink()
    # the payload in place of the safetensors state
    safe = (ckpt / "trainer.safetensors").read_bytes()
    (ckpt / "trainer.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    assert run(data, out, "train.steps=4", "train.save_every=2", *QUIET) == 2
    assert re.search(r"trainer\.safetensors: its sha256 differs", error_line(capsys))  # the sums first
    _reseal(ckpt)  # past the sums, the safetensors reader itself refuses it
    assert run(data, out, "train.steps=4", "train.save_every=2", *QUIET) == 2
    assert re.search(r"trainer\.safetensors is not a readable safetensors file", error_line(capsys))
    assert not marker.exists()
    (ckpt / "trainer.safetensors").write_bytes(safe)
    _reseal(ckpt)
    # a checkpoint that records no run (an older trainer's): refused
    (ckpt / "run.json").rename(tmp_path / "run.json")
    assert run(data, out, "train.steps=4", "train.save_every=2", *QUIET) == 2
    assert "step-000002: it has no run.json" in error_line(capsys)
    (tmp_path / "run.json").rename(ckpt / "run.json")
    assert run(data, out, "train.steps=4", "train.save_every=2", *QUIET) == 0
    assert steps(out) == [1, 2, 3, 4]


def test_deepspeed_checkpoints_load_weights_only(data, tmp_path, capsys):
    """DeepSpeed's own ZeRO-2 files pass the weights_only check (its few state classes allowed),
    resume loads them weights_only, and a crafted ``*.pt`` is refused before DeepSpeed sees it."""
    ds = f"deepspeed={ROOT / 'configs' / 'ds_zero2.json'}"
    out = tmp_path / "run"
    marker = tmp_path / "payload-ran"
    assert run(data, out, ds, "train.steps=2", "train.save_every=2", *QUIET) == 0
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step-000002" and not list(root.glob(".step-*"))
    assert run(data, out, ds, "train.steps=3", "train.save_every=2", *QUIET) == 0
    assert re.search(r"resumed from .*step-000002 at step 2", capsys.readouterr().out)
    assert steps(out) == [1, 2, 3]
    optim = root / "step-000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload(marker)}, optim)
    assert run(data, out, ds, "train.steps=4", "train.save_every=2", *QUIET) == 2
    assert re.search(r"zero_pp_rank_0_mp_rank_00_optim_states\.pt: its sha256 differs", error_line(capsys))
    _reseal(root / "step-000002")  # past the sums, the weights-only check refuses it
    assert run(data, out, ds, "train.steps=4", "train.save_every=2", *QUIET) == 2
    assert re.search(r"refusing to resume: .*step-000002/zero_pp_rank_0_mp_rank_00_optim_states\.pt "
                     r"does not load as plain tensors", error_line(capsys))
    assert not marker.exists()
    # DeepSpeed's loader itself is weights_only while the trainer resumes (a file swapped after
    # the check runs nothing either)
    trainer = Trainer(load_config(CONFIG, overrides(data, tmp_path / "other", ds)))
    try:
        with weights_only_deepspeed_loads(trainer.engine):
            with pytest.raises(pickle.UnpicklingError):
                trainer.engine.checkpoint_engine.load(str(optim), map_location="cpu")
    finally:
        trainer.close()
    assert not marker.exists()


def _edit_json(path, **changes):
    import json

    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))


def _reseal(ckpt):
    """Record the checkpoint's current sums in its COMPLETE, as a consistent forgery would: the
    checks behind the sums must hold on their own."""
    import hashlib
    import json

    sums = {str(f.relative_to(ckpt)): hashlib.sha256(f.read_bytes() + b"\0").hexdigest()
            for f in sorted(ckpt.rglob("*")) if f.is_file() and f.name != "COMPLETE"}
    record = json.loads((ckpt / "COMPLETE").read_text())
    (ckpt / "COMPLETE").write_text(json.dumps({**record, "sha256": sums}))


def _rewrite_safetensors(path, key, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors[key] = fn(tensors[key])
    save_file(tensors, str(path))


@pytest.mark.parametrize("tamper, message", [
    (lambda c: _edit_json(c / "run.json", step=2), r"step-000004/run\.json: step is 2, but the checkpoint is step-000004"),
    (lambda c: _edit_json(c / "run.json", step=-3), r"step-000004/run\.json: step is -3, but the checkpoint is step-000004"),
    (lambda c: _edit_json(c / "run.json", step="4x"), r"step-000004/run\.json: step must be an integer, got '4x'"),
    (lambda c: _edit_json(c / "run.json", step=True), r"step-000004/run\.json: step must be an integer, got True"),
    (lambda c: _edit_json(c / "trainer.json", step=2), r"step-000004/trainer\.json: step is 2, but the checkpoint's run\.json says 4"),
    (lambda c: _edit_json(c / "trainer.json", optimizer="x"), r"step-000004/trainer\.json: the optimizer state is not what the trainer wrote"),
    (lambda c: (c / "trainer.json").write_text("{}"), r"step-000004/trainer\.json: step is None"),
    (lambda c: _rewrite_safetensors(c / "trainer.safetensors", "model.adapter.proj.0.weight",
                                    lambda t: t.view(torch.int32)),
     r"trainer\.safetensors: model\.adapter\.proj\.0\.weight is int32 \(\d+, \d+\), expected float32"),
    (lambda c: _rewrite_safetensors(c / "trainer.safetensors", "optimizer.0.exp_avg", lambda t: t.T.contiguous()),
     r"trainer\.safetensors: optimizer\.0\.exp_avg is float32 \((\d+), (\d+)\), expected float32 \(\2, \1\)"),
    (lambda c: _rewrite_safetensors(c / "trainer.safetensors", "rng.cpu", lambda t: t.float()),
     r"trainer\.safetensors: rng\.cpu must be a 1-D uint8 tensor"),
])
def test_values_read_back_from_a_checkpoint_are_checked(data, tmp_path, capsys, tamper, message):
    """A checkpoint's step, dtypes and shapes are checked against the run and the modules before
    anything is loaded: each edit is one line naming the file and the key, and the untouched
    checkpoint still resumes."""
    out = tmp_path / "run"
    assert run(data, out, "train.steps=4", "train.save_every=4", *QUIET) == 0
    ckpt = out / "checkpoints" / "step-000004"
    saved = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    tamper(ckpt)
    _reseal(ckpt)
    capsys.readouterr()
    assert run(data, out, "train.steps=6", "train.save_every=4", *QUIET) == 2
    assert re.search(message, error_line(capsys))
    for name, blob in saved.items():
        (ckpt / name).write_bytes(blob)
    assert run(data, out, "train.steps=6", "train.save_every=4", *QUIET) == 0
    assert steps(out) == [1, 2, 3, 4, 5, 6]


def test_a_finished_run_or_a_checkpoint_past_the_steps(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(data, out, "train.steps=4", "train.save_every=4", *QUIET) == 0
    capsys.readouterr()
    assert run(data, out, "train.steps=4", "train.save_every=4", *QUIET) == 0  # finished: says so
    said = capsys.readouterr().out
    assert "already at step 4 of 4, nothing left to train" in said and "nan" not in said
    assert run(data, out, "train.steps=3", "train.save_every=4", *QUIET) == 2
    assert re.search(r"run\.json: step 4 is past train\.steps=3", error_line(capsys))


def test_exported_weights_of_another_dtype_or_shape_are_refused(data, tmp_path):
    out = tmp_path / "run"
    assert run(data, out, "train.steps=1", *QUIET) == 0
    weights = out / "final" / "model.safetensors"
    _rewrite_safetensors(weights, "adapter.proj.0.weight", lambda t: t.view(torch.int32))
    with pytest.raises(ValueError, match=r"model\.safetensors: adapter\.proj\.0\.weight is int32 .*expected float32"):
        SpeechLLM.from_pretrained(out / "final")
    weights.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        SpeechLLM.from_pretrained(out / "final")


def test_a_folder_that_holds_no_run_is_never_written_over(data, tmp_path, capsys):
    """A non-empty output_dir that is not a run of this trainer (here: a passwd, a config.yaml and
    a metrics.jsonl of something else) is refused by resume and by --no-resume, also through a
    symlink, saying what it holds; nothing in it changes. --overwrite moves it aside whole."""
    out = tmp_path / "busy"
    out.mkdir()
    files = {"passwd": "root:x:0:0\n", "config.yaml": "mine: true\n", "metrics.jsonl": '{"mine": 1}\n'}
    for name, text in files.items():
        (out / name).write_text(text)
    link = tmp_path / "link"
    link.symlink_to(out)
    for target, flags in ((out, ()), (out, ("--no-resume",)), (link, ())):
        capsys.readouterr()
        assert run(data, target, "train.steps=1", *QUIET, flags=flags) == 2
        line = error_line(capsys)
        assert "config.yaml, metrics.jsonl, passwd" in line, line
        assert "holds no run of this trainer" in line and "already holds a run" not in line, line
        if target == link:
            assert f"{link} (a link to {out})" in line
        assert {p.name: p.read_text() for p in out.iterdir() if p.name != ".lock"} == files
    assert run(data, out, "train.steps=1", *QUIET, flags=("--overwrite",)) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("busy.replaced-")]
    assert len(aside) == 1 and {p.name: p.read_text() for p in aside[0].iterdir() if p.name != ".lock"} == files
    assert steps(out) == [1]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device", "trainer.safetensors"), "safetensors"])
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(data, tmp_path, capsys,
                                                                               monkeypatch, error):
    import mtbi_fast.trainer as trainer_mod
    from safetensors import SafetensorError

    out = tmp_path / "run"
    real = trainer_mod.save_trainer_state

    def full(folder, model, optimizer, scheduler, step):
        if step == 4:
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })") \
                if error == "safetensors" else error
        real(folder, model, optimizer, scheduler, step)

    monkeypatch.setattr(trainer_mod, "save_trainer_state", full)
    assert run(data, out, "train.steps=6", "train.save_every=2", *QUIET) == 2
    line = error_line(capsys)
    assert re.search(r"step 4: cannot write the checkpoint \(.*(No space left on device|StorageFull).*the disk may "
                     r"be full\); the previous checkpoint .*step-000002 is intact and a rerun resumes from it", line), line
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert not list((out / "checkpoints").glob(".step-*.tmp"))
    monkeypatch.setattr(trainer_mod, "save_trainer_state", real)
    assert run(data, out, "train.steps=6", "train.save_every=2", *QUIET) == 0
    assert steps(out) == [1, 2, 3, 4, 5, 6]


def _flip_byte(path, where=0.5):
    blob = bytearray(path.read_bytes())
    blob[int(len(blob) * where)] ^= 0x01
    path.write_bytes(bytes(blob))


def _edit_first_json_line(path, **changes):
    import json

    lines = path.read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), **changes})
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("name, tamper, refused", [
    # refused, naming the file
    ("run.json field", lambda o: _edit_json(o / "checkpoints" / "step-000004" / "run.json",
                                            config={"train": {"lr": 0.5}}), r"cannot resume .*train\.lr"),
    ("trainer.safetensors byte", lambda o: _flip_byte(o / "checkpoints" / "step-000004" / "trainer.safetensors", 0.9),
     r"trainer\.safetensors: its sha256 differs"),
    ("trainer.json field", lambda o: _edit_json(o / "checkpoints" / "step-000004" / "trainer.json",
                                                optimizer="x"), r"trainer\.json: its sha256 differs"),
    # provably harmless: the resumed run ends with the untampered run's weights and rows
    ("config.yaml", lambda o: (o / "config.yaml").write_text("anything: [\n"), None),  # written anew
    ("metrics.jsonl row", lambda o: _edit_first_json_line(o / "metrics.jsonl", loss=123.0), None),  # only appended to
    ("checkpoints/latest", lambda o: (o / "checkpoints" / "latest").write_text("step-000002"), None),
    ("exported copy", lambda o: _flip_byte(o / "checkpoints" / "step-000004" / "model" / "model.safetensors"),
     r"model/model\.safetensors: its sha256 differs from the one .*COMPLETE recorded"),
    ("COMPLETE field", lambda o: _edit_json(o / "checkpoints" / "step-000004" / "COMPLETE",
                                            sha256={"trainer.json": "0" * 64}), r"trainer\.json: its sha256 differs"),
    ("top-level run.json", lambda o: _edit_json(o / "run.json", data=None), None),  # rewritten at start
])
def test_tampering_with_a_run_folder_is_refused_by_name_or_harmless(data, tmp_path, capsys, name, tamper, refused):
    """One byte or one field of each kind of file a plain run folder holds: the resume refuses it
    with one line naming the file, or its outcome is the untampered resume's, weights included."""
    from safetensors.torch import load_file

    args = ("train.steps=6", "train.save_every=4", *QUIET)
    ref = tmp_path / "ref"
    assert run(data, ref, "train.steps=4", "train.save_every=4", *QUIET) == 0
    assert run(data, ref, *args) == 0
    out = tmp_path / "run"
    assert run(data, out, "train.steps=4", "train.save_every=4", *QUIET) == 0
    tamper(out)
    capsys.readouterr()
    code = run(data, out, *args)
    if refused:
        assert code == 2 and re.search(refused, error_line(capsys)), name
        return
    assert code == 0, capsys.readouterr().err[-2000:]
    assert steps(out) == steps(ref) == [1, 2, 3, 4, 5, 6]
    got, want = load_file(out / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
