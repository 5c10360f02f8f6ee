"""The trainer (mtbi_fast/trainer.py and its entry point train.py): a single-process run, MFU in
the metrics, non-finite losses, kill-and-resume, ZeRO-3 and deepspeed=auto on 2 ranks, data wait,
bad audio, checks before the model is built. The config is tests/test_config.py's, the batches
tests/test_dataset.py's, the run folder tests/test_runfolder.py's."""

import dataclasses
import json
import os
import re
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import mtbi_fast.train as train_mod
from mtbi_fast.cli import main as cli
from mtbi_fast.config import load_config
from mtbi_fast.data import read_manifest, write_manifest
from mtbi_fast.dataset import MicroBatches
from mtbi_fast.model import SpeechLLM
from mtbi_fast.trainer import Trainer

from helpers import CONFIG, ROOT, assert_same_batch, metrics, overrides

def assert_data_wait(rows):
    for r in rows:
        assert r["data_wait_s"] >= 0 and 0 <= r["data_wait_share"] <= 1, r


def test_single_process_run(data, tmp_path):
    out = tmp_path / "run"
    # a constant ratio (pure speech), so that the task does not change while the loss is compared
    assert cli(["train", str(CONFIG), *overrides(data, out, "train.steps=30", "interleave.schedule=constant",
                                                 "interleave.start=0.0", "train.save_every=10")]) == 0
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("step", "loss", "kl", "ce", "tokens_per_s", "tflops", "mfu", "lr", "ratio", "data_wait_s",
                "data_wait_share"):
        assert key in rows[0]
    assert_data_wait(rows)
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    evals = [r for r in metrics(out) if "eval_kl" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30] and all(r["eval_kl"] > 0 for r in evals)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000020", "step-000030"]  # keep_last 2
    model = SpeechLLM.from_pretrained(out / "final")
    assert set(model.trainable_state_dict()) == {k for k in model.trainable_state_dict() if k.startswith("adapter.")}
    assert (out / "config.yaml").is_file()


def test_metrics_carry_model_flops_and_mfu(data, tmp_path, capsys):
    """tflops in every row equals the counted model FLOPs of the window's batches over its time;
    mfu is null on a CPU (no known peak) and tflops / train.peak_tflops with one; the run's summary
    line names both."""
    from mtbi_fast.flops import step_flops

    out = tmp_path / "run"
    assert cli(["train", str(CONFIG), *overrides(data, out, "train.steps=4", "train.eval_every=0",
                                                 "train.save_every=0", "train.log_every=2")]) == 0
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4] and all(r["tflops"] > 0 and r["mfu"] is None for r in rows)
    assert "MFU not known (unknown: " in capsys.readouterr().out

    out2 = tmp_path / "run2"
    cfg = load_config(CONFIG, overrides(data, out2, "train.steps=2", "train.eval_every=0",
                                        "train.save_every=0", "train.log_every=1", "train.peak_tflops=0.5"))
    trainer = Trainer(cfg)
    seen = []
    real = Trainer._next_batch

    def spy(self, batches, device, window):
        batch, inputs = real(self, batches, device, window)
        seen.append(step_flops(self.model, batch["student"], batch.get("teacher"),
                               [trainer.model.front.length(f) for f in batch["features"]])["total"])
        return batch, inputs

    Trainer._next_batch = spy
    try:
        trainer.train(resume=False)
    finally:
        Trainer._next_batch = real
    rows = [r for r in metrics(out2) if "loss" in r]
    assert len(rows) == 2 and len(seen) == 2
    for r, flops in zip(rows, seen):
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5)
        assert r["tflops"] * 1e12 > flops / 60  # (the window's seconds are under a minute)
    summary = trainer.summary()
    assert summary["steps"] == 2 and summary["peak_source"] == "config"
    assert summary["tflops"] == pytest.approx(sum(seen) / summary["seconds"] / 1e12)


def test_a_non_finite_loss_stops_the_run_before_anything_is_saved(data, tmp_path, monkeypatch):
    """On a GPU the loop keeps its sums on the device: a NaN loss (here: the adapter's weights
    turned to NaN after step 1, the loss's own check off; the GPU path taken on this CPU) is
    caught before the checkpoint of step 4, with a one-line error naming the steps."""
    out = tmp_path / "run"
    cfg = load_config(CONFIG, overrides(data, out, "train.steps=8", "train.eval_every=0", "train.save_every=4",
                                        "train.log_every=5", "model.loss.check_finite=false"))
    trainer = Trainer(cfg)
    real = Trainer._optimizer_step

    def poison(self):
        real(self)
        if self.step == 1:  # (self.step is incremented after the optimizer step)
            with torch.no_grad():
                self.model.adapter.proj[0].weight.fill_(float("nan"))

    monkeypatch.setattr(Trainer, "_optimizer_step", poison)
    monkeypatch.setattr(Trainer, "_reads_are_free", staticmethod(lambda device: False))  # as on a GPU
    with pytest.raises(ValueError, match=r"^steps 1-4: the loss was NaN or inf in 2 micro-batch\(es\) .*"
                                         r"nothing after step 0 was saved"):
        trainer.train(resume=False)
    assert not list((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else True


def test_off_a_gpu_a_non_finite_loss_stops_before_the_weights_change(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(CONFIG, overrides(data, out, "train.steps=6", "train.eval_every=0", "train.save_every=2",
                                        "model.loss.check_finite=false"))
    trainer = Trainer(cfg)
    real_forward = type(trainer.model).forward
    seen = {}

    def nan_at_step_3(self, *a, **k):
        out_ = real_forward(self, *a, **k)
        if trainer.step == 2:  # the forward of step 3
            seen["weights"] = {n: p.detach().clone() for n, p in self.adapter.named_parameters()}
            out_ = {**out_, "loss": out_["loss"] * float("nan")}
        return out_

    monkeypatch.setattr(type(trainer.model), "forward", nan_at_step_3)
    with pytest.raises(ValueError, match=r"^step 3: the loss is NaN or inf .*stopped before the weights were "
                                         r"updated, the last checkpoint is intact"):
        trainer.train(resume=False)
    for n, p in trainer.model.adapter.named_parameters():
        assert torch.equal(p.detach(), seen["weights"][n]), n
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"


@pytest.mark.parametrize("workers", [0, 2])
def test_kill_and_resume_gives_the_same_curve(data, tmp_path, monkeypatch, workers):
    args = ["train.steps=12", "train.save_every=4", "train.eval_every=0", f"data.num_workers={workers}"]
    full = tmp_path / "full"
    train_mod.main(["--config", str(CONFIG), *overrides(data, full, *args)])

    killed = tmp_path / "killed"
    real_log = Trainer._log

    def dying_log(self, *a, **k):
        row = real_log(self, *a, **k)
        if self.step == 6:  # killed after step 6, with the last checkpoint at step 4
            raise KeyboardInterrupt
        return row

    monkeypatch.setattr(Trainer, "_log", dying_log)
    with pytest.raises(KeyboardInterrupt):
        train_mod.main(["--config", str(CONFIG), *overrides(data, killed, *args)])
    monkeypatch.setattr(Trainer, "_log", real_log)
    assert [r["step"] for r in metrics(killed)] == list(range(1, 7))
    train_mod.main(["--config", str(CONFIG), *overrides(data, killed, *args)])
    a, b = metrics(full), metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 13))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), (x, y)
    assert_data_wait(a + b)


def test_missing_manifest_is_named(data, tmp_path):
    cfg = load_config(CONFIG, overrides(data, tmp_path / "o", "data.train_manifest=/nope/train.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"manifest not found: /nope/train.jsonl"):
        Trainer(cfg)


# ---- the input pipeline: DataLoader workers build the batches ----------------------------------


def test_a_slow_input_pipeline_shows_as_data_wait(data, tmp_path, monkeypatch):
    real = MicroBatches.__getitem__

    def slow(self, j):
        time.sleep(0.3)
        return real(self, j)

    monkeypatch.setattr(MicroBatches, "__getitem__", slow)
    out = tmp_path / "slow"
    cfg = load_config(CONFIG, overrides(data, out, "train.steps=2", "train.eval_every=0",
                                        "train.save_every=0", "data.num_workers=0"))
    Trainer(cfg).train(resume=False)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["data_wait_s"] >= 0.3 and 0.2 < r["data_wait_share"] <= 1 for r in rows), rows


# ---- DeepSpeed ZeRO-3, 2 CPU ranks over gloo ------------------------------------------------------

def _zero_worker(rank, world, port, data, out, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cfg = load_config(CONFIG, overrides(data, out, "deepspeed=" + str(ROOT / "configs" / "ds_zero3.json"),
                                        "train.steps=6", "train.save_every=3", "train.eval_every=3"))
    trainer = Trainer(cfg)
    llm_params = list(trainer.model.llm.parameters())
    info = {"data_numel": sum(p.data.numel() for p in llm_params),
            "local": sum(p.ds_tensor.numel() for p in llm_params),
            "full": sum(p.ds_numel for p in llm_params)}
    trainer.train(resume=False)
    torch.save(info, Path(result) / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where gloo threads can abort the process


def test_zero3_two_ranks_match_single_process(data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_zero_worker, args=(2, port, str(data), str(tmp_path / "zero"), str(tmp_path)), nprocs=2)
    infos = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for info in infos:  # the frozen LLM is partitioned: each rank holds half of it
        assert info["data_numel"] == 0
        assert abs(info["local"] - info["full"] / 2) <= 64
    # one process, gradient accumulation over the same two micro-batches
    train_mod.main(["--config", str(CONFIG), *overrides(data, tmp_path / "single", "train.steps=6",
                                                        "train.grad_accum=2", "train.save_every=0",
                                                        "train.eval_every=3")])
    zero, single = metrics(tmp_path / "zero"), metrics(tmp_path / "single")
    assert [r["step"] for r in zero] == [r["step"] for r in single]
    for z, s in zip(zero, single):
        for key in ("loss", "eval_kl"):
            if key in s:
                assert z[key] == pytest.approx(s[key], rel=1e-4, abs=1e-5), (z, s)
    assert (tmp_path / "zero" / "checkpoints" / "step-000006" / "COMPLETE").exists()
    assert SpeechLLM.from_pretrained(tmp_path / "zero" / "final") is not None


def _auto_worker(rank, world, port, data, out, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    cfg = load_config(CONFIG, overrides(data, out, "deepspeed=auto", "train.steps=2", "train.save_every=0",
                                        "train.eval_every=0"))
    trainer = Trainer(cfg)
    llm_params = list(trainer.model.llm.parameters())
    info = {"stage": trainer.ds_config["zero_optimization"]["stage"], "sharding": trainer.sharding,
            "data_numel": sum(p.data.numel() for p in llm_params),
            "partitioned": any(hasattr(p, "ds_id") for p in llm_params)}
    trainer.train(resume=False)
    torch.save(info, Path(result) / f"auto{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)


def test_deepspeed_auto_replicates_a_frozen_llm_that_fits(data, tmp_path, capsys):
    """deepspeed=auto: one process trains without DeepSpeed; two ranks agree on ZeRO-2 for the tiny
    LLM (it fits with room to spare), whose weights then stay whole on each rank."""
    cfg = load_config(CONFIG, overrides(data, tmp_path / "one", "deepspeed=auto", "train.steps=1",
                                        "train.save_every=0", "train.eval_every=0"))
    trainer = Trainer(cfg)
    assert trainer.ds_config is None and "one process: plain PyTorch" in trainer.sharding
    trainer.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_auto_worker, args=(2, port, str(data), str(tmp_path / "auto"), str(tmp_path)), nprocs=2)
    for r in (0, 1):
        info = torch.load(tmp_path / f"auto{r}.pt")
        assert info["stage"] == 2 and not info["partitioned"] and info["data_numel"] > 0, info
        assert info["sharding"].startswith("deepspeed=auto: ZeRO-2: the frozen weights ("), info
    assert [r["step"] for r in metrics(tmp_path / "auto") if "loss" in r] == [1, 2]


def test_baseline_switches(data, tmp_path):
    """Single task (continuation only) and no interleaving (ratio 0 throughout) are config values."""
    cfg = load_config(CONFIG, overrides(data, tmp_path / "b", "data.tasks=[continue]",
                                        "interleave.schedule=constant", "interleave.start=0.0",
                                        "train.steps=2", "train.eval_every=0"))
    trainer = Trainer(cfg)
    assert trainer.data.records and {r["task"] for r in trainer.data.records} == {"continue"}
    assert trainer.schedule(0) == trainer.schedule(10_000) == 0.0
    trainer.train(resume=False)
    cfg = load_config(CONFIG, overrides(data, tmp_path / "c", "data.tasks=[no_such_task]"))
    with pytest.raises(ValueError, match=r"data.tasks=\['no_such_task'\]: .* has no behaviors of these tasks"):
        Trainer(cfg)


def test_spec_augment_masks_training_inputs_only(data, tmp_path):
    """data.spec_augment masks the training log-mels (reproducibly per example and step, with the
    settings given) and never the evaluation inputs."""
    settings = {"freq_masks": 1, "freq_width": 10, "time_masks": 1, "time_width": 0.2}
    cfg = load_config(CONFIG, overrides(data, tmp_path / "sa", "train.steps=1",
                                        "data.spec_augment=" + json.dumps(settings)))
    trainer = Trainer(cfg)
    plain = {u: trainer.data.features(u) for u in trainer.data.utts}
    seen = []
    for salt in (0, 1):
        batch = trainer.data.batch([0, 1], 0.5, salt=salt)
        for i, mel in zip([0, 1], batch["features"]):
            clean = plain[trainer.data.records[i]["utt_id"]]
            changed = mel != clean
            fill = clean.double().mean().float()  # the utterance mean (in float64)
            assert changed.any() and torch.allclose(mel[changed], fill, rtol=1e-6, atol=0)
            # whole mel bands and whole frame spans, no wider than the settings allow
            rows, cols = changed.all(1), changed.all(0)
            assert torch.equal(changed, rows[:, None] | cols[None, :])
            assert int(rows.sum()) <= 10 and int(cols.sum()) <= int(0.2 * clean.shape[1])
            seen.append(mel)
    assert not torch.equal(seen[0], seen[2])  # the same example masked differently at another step
    again = trainer.data.batch([0, 1], 0.5, salt=1)["features"]
    assert all(torch.equal(a, b) for a, b in zip(again, batch["features"]))
    eval_mels = trainer.eval_data.batch([0], 0.0, salt=0)["features"]
    assert torch.equal(eval_mels[0], trainer.eval_data.features(trainer.eval_data.records[0]["utt_id"]))


# ---- checked before anything is built; one-line errors -------------------------------------------

def test_output_dir_and_deepspeed_json_are_checked_before_the_model(data, tmp_path, monkeypatch, capsys):
    def no_model(*a, **k):
        raise AssertionError("the model was built before the check")

    monkeypatch.setattr(SpeechLLM, "from_config", no_model)
    (tmp_path / "file").write_text("x")
    cfg = load_config(CONFIG, overrides(data, tmp_path / "file" / "run"))
    with pytest.raises(ValueError, match=r"output_dir .*file/run is not a writable folder"):
        Trainer(cfg)
    cfg = load_config(CONFIG, overrides(data, tmp_path / "o", f"deepspeed={tmp_path}/nope.json"))
    with pytest.raises(FileNotFoundError, match=r"DeepSpeed config not found: .*nope\.json"):
        Trainer(cfg)
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 2},}')
    cfg = load_config(CONFIG, overrides(data, tmp_path / "o", f"deepspeed={tmp_path}/bad.json"))
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON \(.* at line 1 column"):
        Trainer(cfg)
    # the command line: one line, exit code 2; --debug shows the traceback
    argv = ["--config", str(CONFIG), *overrides(data, tmp_path / "o", f"deepspeed={tmp_path}/bad.json")]
    assert train_mod.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mtbi-fast train: error: ") and "bad.json: not valid JSON" in err[0]
    with pytest.raises(ValueError, match="not valid JSON"):
        train_mod.main([*argv, "--debug"])
    assert train_mod.main(["--config", str(CONFIG), *overrides(data, tmp_path / "o", "train.keep_last=-1")]) == 2
    assert "train.keep_last must be an int >= 1, got -1" in capsys.readouterr().err


# ---- audio: checked up front, and a file that fails mid-run ---------------------------------------

def test_clips_longer_than_the_encoder_are_listed_before_step_0(data, tmp_path):
    import soundfile as sf

    utts = read_manifest(data / "train.jsonl")
    for k, seconds in ((0, 31.0), (1, 40.0)):
        sf.write(tmp_path / f"long{k}.wav", torch.zeros(int(seconds * 16000)).numpy(), 16000)
        utts[k] = dataclasses.replace(utts[k], audio=str(tmp_path / f"long{k}.wav"), duration=seconds)
    write_manifest(tmp_path / "train.jsonl", utts)
    cfg = load_config(CONFIG, overrides(data, tmp_path / "o", f"data.train_manifest={tmp_path}/train.jsonl"))
    with pytest.raises(ValueError, match=r"train\.jsonl: 2 utterances are longer than the speech encoder's "
                                         r"limit of 30 s \(1500 frames\): demo-train-000 \(31\.0 s\), "
                                         r"demo-train-001 \(40\.0 s\)"):
        Trainer(cfg)


@pytest.fixture
def bad_audio(data, tmp_path):
    """The training manifest with one utterance's FLAC cut to a third: its header reads (the
    manifest checks pass), its samples do not decode."""
    utts = read_manifest(data / "train.jsonl")
    raw = Path(utts[3].audio).read_bytes()
    (tmp_path / "cut.flac").write_bytes(raw[:len(raw) // 3])
    utts[3] = dataclasses.replace(utts[3], audio=str(tmp_path / "cut.flac"))
    write_manifest(tmp_path / "train.jsonl", utts)
    return tmp_path / "train.jsonl", utts[3].id


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_audio_mid_run_is_one_line_naming_the_utterance(data, tmp_path, bad_audio, workers, capsys):
    manifest, utt = bad_audio
    argv = ["--config", str(CONFIG), *overrides(data, tmp_path / "o", f"data.train_manifest={manifest}",
                                                "train.steps=6", "train.eval_every=0", "train.save_every=0",
                                                f"data.num_workers={workers}")]
    assert train_mod.main(argv) == 2
    err = capsys.readouterr().err  # (the progress bar writes to stderr too)
    assert "Traceback" not in err and "DataLoader worker" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    assert re.match(rf"mtbi-fast train: error: step \d: utterance '{utt}': bad audio: cannot read audio "
                    rf"file .*cut\.flac: .*set data\.skip_bad_audio: true", lines[0]), lines[0]


def test_skip_bad_audio_leaves_the_example_out_and_counts_it(data, tmp_path, bad_audio):
    manifest, utt = bad_audio
    out = tmp_path / "o"
    cfg = load_config(CONFIG, overrides(data, out, f"data.train_manifest={manifest}", "train.steps=6",
                                        "train.eval_every=0", "train.save_every=0", "data.skip_bad_audio=true"))
    trainer = Trainer(cfg)
    d = trainer.data
    bad = [i for i, r in enumerate(d.records) if r["utt_id"] == utt]
    assert len(bad) == 2
    # batch k stays a pure function of (seed, k): the example is simply absent
    idx = [bad[0], *(i for i in range(4) if i not in bad)]
    with_bad, without = d.batch(idx, 0.3, salt=5), d.batch(idx[1:], 0.3, salt=5)
    assert len(with_bad["skipped_audio"]) == 1 and utt in with_bad["skipped_audio"][0]
    with_bad["skipped_audio"] = without["skipped_audio"]
    assert_same_batch(with_bad, without)
    trainer.train()
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert sum(r["skipped_audio"] for r in rows) == 2  # 24 records, 6 steps of 4: each seen once



def test_teacher_cache_from_another_llm_is_refused(data, tmp_path):
    """Cached teacher states are the LLM's that made the behaviors: a run whose model.llm differs
    (here the tiny LLM without tiny_train's initializer_range) refuses before building anything."""
    cfg = load_config(CONFIG, overrides(data, tmp_path / "other", "data.teacher_cache=true",
                                        "model.llm={tiny: {}}"))
    with pytest.raises(ValueError, match=r"beh was made by another LLM .*teacher\.config_sha256 "):
        Trainer(cfg)
    assert not (tmp_path / "other" / "checkpoints").exists()


def test_one_process_world_retries_a_port_taken_meanwhile(monkeypatch):
    """The free port picked for a launcher-less DeepSpeed world can be taken before the store
    binds it (several runs starting at once): another port is tried. A port the user set is not
    replaced: its error stands."""
    import mtbi_fast.trainer as trainer_mod

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    ports = []

    class FakeDeepSpeed:
        def init_distributed(self, dist_backend):
            ports.append(os.environ["MASTER_PORT"])
            if len(ports) == 1:
                raise torch.distributed.DistNetworkError("EADDRINUSE: address already in use")

    trainer_mod._init_single_process(FakeDeepSpeed(), "gloo")
    assert len(ports) == 2 and os.environ["WORLD_SIZE"] == "1"
    ports.clear()
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(torch.distributed.DistNetworkError, match="EADDRINUSE"):
        trainer_mod._init_single_process(FakeDeepSpeed(), "gloo")
    assert ports == ["29500"]


