"""mtbi_fast/behaviors.py with the tiny config: resume equality, determinism, hidden-state cache."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import mtbi_fast.behaviors as beh
from mtbi_fast.behaviors import BehaviorConfig, generate_behaviors, plan, read_behaviors
from mtbi_fast.data import read_manifest
from mtbi_fast.model import ModelConfig, SpeechLLM
from mtbi_fast.packing import Example, Text, pack
from mtbi_fast.tasks import TaskLibrary

ROOT = Path(__file__).parents[1]


MODEL = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig.from_dict(MODEL)
    model = SpeechLLM.from_config(cfg)
    utts = read_manifest(ROOT / "tests" / "data" / "clips.jsonl")
    return model, utts, TaskLibrary.load(ROOT / "configs" / "tasks.yaml")


def files(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).glob("shard-*"))}


@pytest.mark.parametrize("sample", [False, True])
def test_resume_after_kill_gives_the_same_files(tmp_path, setup, monkeypatch, sample):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=5, max_new_tokens=6, batch_size=2, shard_size=4, do_sample=sample)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path / "full", cfg, progress=False)

    real, calls = beh.answer, []

    def dying(*a, **k):  # killed during the third shard
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(beh, "answer", dying)
    with pytest.raises(KeyboardInterrupt):
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path / "resumed", cfg, progress=False)
    assert len(files(tmp_path / "resumed")) == 2  # two complete shards, nothing half written
    monkeypatch.setattr(beh, "answer", real)
    summary = generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path / "resumed", cfg,
                                 progress=False)
    assert summary["generated"] == 15 - 8
    assert files(tmp_path / "resumed") == files(tmp_path / "full")
    records = read_behaviors(tmp_path / "full")
    assert len(records) == 15 and len({r["id"] for r in records}) == 15


def test_records_use_only_the_training_split(tmp_path, setup):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=30, max_new_tokens=3, batch_size=16, shard_size=64)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False)
    split = json.loads((tmp_path / "split.json").read_text())
    for r in read_behaviors(tmp_path):
        assert r["task"] not in split["heldout_tasks"]
        assert r["wording"] in split["train"][r["task"]]
        assert r["prompt"] == lib.prompt(r["task"], r["wording"], next(u.text for u in utts if u.id == r["utt_id"]))
        assert r["response_ids"] and r["transcript_ids"]
    held = plan(utts, lib.split(), lib, BehaviorConfig(per_utterance=3, split="heldout_task"))
    assert {j["task"] for j in held} <= set(split["heldout_tasks"])


def test_greedy_answer_matches_plain_generation(tmp_path, setup):
    """Left-padded batched generation gives each prompt what it gets alone."""
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=2, max_new_tokens=5, batch_size=6)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False)
    for r in read_behaviors(tmp_path)[:3]:
        ids = torch.tensor([r["prefix_ids"] + r["transcript_ids"] + r["suffix_ids"]])
        out = model.llm.generate(ids, max_new_tokens=5, do_sample=False,
                                 pad_token_id=model.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        assert r["response_ids"] == out[:len(r["response_ids"])]


def test_hidden_cache_equals_teacher_states(tmp_path, setup):
    from safetensors.torch import load_file

    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=2, max_new_tokens=4, cache_hidden=True)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False)
    states = load_file(str(tmp_path / "shard-00000.safetensors"))
    records = read_behaviors(tmp_path)
    assert set(states) == {r["id"] for r in records}
    examples = [Example(r["id"], [Text(r["prefix_ids"] + r["transcript_ids"] + r["suffix_ids"])],
                        r["response_ids"]) for r in records]
    expected = model.teacher_states(pack(examples, 512))
    got = torch.cat([states[r["id"]] for r in records]).float()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)  # bf16 storage


def test_split_mismatch_is_refused(tmp_path, setup):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=1, max_new_tokens=2)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False)
    with pytest.raises(ValueError, match=r"task_split_sha256 \(recorded '[0-9a-f]{12}', now"):
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg,
                           split=lib.split(seed=5), progress=False)


def test_bad_plan_options_are_named(setup):
    model, utts, lib = setup
    with pytest.raises(ValueError, match=r"split must be train, heldout_wording or heldout_task, got 'dev'"):
        plan(utts, lib.split(), lib, BehaviorConfig(split="dev"))
    with pytest.raises(ValueError, match=r"no train prompts of tasks \['give_title'\] in the split"):
        plan(utts, lib.split(), lib, BehaviorConfig(tasks=("give_title",)))


# ---------------------------------------------------------------------------------------------
# provenance: who made a folder, with which settings; refused, resumed or moved aside


def everything(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.name != ".lock"}


def test_plan_records_the_teacher_settings_and_jobs(tmp_path, setup):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=2, max_new_tokens=3, do_sample=True, seed=3)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False,
                       model_config=MODEL)
    rec = json.loads((tmp_path / "plan.json").read_text())
    assert rec["teacher"] == beh.teacher_fingerprint(MODEL)
    assert rec["teacher"]["weights"] == "random init (seed 0)" and rec["teacher"]["source"] == {"tiny": {}}
    assert len(rec["teacher"]["config_sha256"]) == len(rec["teacher"]["tokenizer_sha256"]) == 64
    assert rec["settings"] == dict(per_utterance=2, split="train", tasks=None, seed=3, shard_size=64,
                                   batch_size=8, max_new_tokens=3, do_sample=True, temperature=0.7,
                                   top_p=0.9, dtype="float32")
    assert rec["jobs"] == 6 and len(rec["jobs_sha256"]) == 64
    assert json.loads((tmp_path / ".lock").read_text())["job"] == "behaviors"  # who held it last
    beh.check_teacher(tmp_path, MODEL)  # the same LLM: accepted
    beh.check_teacher(tmp_path, ModelConfig.from_dict(MODEL))


def test_rerun_with_another_llm_or_settings_is_refused_and_nothing_changes(tmp_path, setup):
    from mtbi_fast.hub import load_llm

    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=3, max_new_tokens=3, shard_size=4)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False,
                       model_config=MODEL)
    before = everything(tmp_path)
    other = {**MODEL, "llm": {"tiny": {"initializer_range": 0.3}}}
    llm2, tok2 = load_llm(other["llm"])
    with pytest.raises(ValueError) as err:
        generate_behaviors(utts, lib, llm2, tok2, tmp_path, cfg, progress=False, model_config=other)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path} holds behaviors made differently: teacher.config_sha256 (recorded '")
    assert "teacher.weights" not in msg and "teacher.tokenizer_sha256" not in msg
    assert msg.endswith("use another output folder, or --overwrite (overwrite=True) to move the old files aside")
    with pytest.raises(ValueError, match=r"teacher.weights \(recorded 'random init \(seed 0\)', now "
                                         r"'random init \(seed 1\)'\)"):
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False,
                           model_config={**MODEL, "init_seed": 1})
    with pytest.raises(ValueError, match=r"made differently: settings.max_new_tokens \(recorded 3, now 4\)$"
                                         r"|settings.max_new_tokens \(recorded 3, now 4\); use another"):
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path,
                           BehaviorConfig(per_utterance=3, max_new_tokens=4, shard_size=4),
                           progress=False, model_config=MODEL)
    with pytest.raises(ValueError, match=r"jobs \(recorded 9, now 6\); jobs_sha256"):  # another manifest
        generate_behaviors(utts[:2], lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False,
                           model_config=MODEL)
    with pytest.raises(ValueError, match=r"settings.shard_size \(recorded 4, now 2\)"):
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path,
                           BehaviorConfig(per_utterance=3, max_new_tokens=3, shard_size=2),
                           progress=False, model_config=MODEL)
    with pytest.raises(ValueError, match=r"teacher \(recorded 'recorded', now 'not recorded'\)"):
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False)
    assert everything(tmp_path) == before  # nothing mixed, nothing rewritten
    # identical settings resume (nothing to do); cache_hidden may be added later
    again = generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path,
                               BehaviorConfig(per_utterance=3, max_new_tokens=3, shard_size=4,
                                              cache_hidden=True), progress=False, model_config=MODEL)
    assert again["generated"] == 9 and len(list(tmp_path.glob("shard-*.safetensors"))) == 3
    assert files(tmp_path).items() >= {k: v for k, v in before.items() if k.endswith(".jsonl")}.items()


def test_overwrite_moves_the_old_folder_aside(tmp_path, setup, capsys):
    from mtbi_fast.hub import load_llm

    model, utts, lib = setup
    out = tmp_path / "beh"
    cfg = BehaviorConfig(per_utterance=2, max_new_tokens=3)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, out, cfg, progress=False, model_config=MODEL)
    before = everything(out)
    other = {**MODEL, "llm": {"tiny": {"initializer_range": 0.3}}}
    llm2, tok2 = load_llm(other["llm"])
    summary = generate_behaviors(utts, lib, llm2, tok2, out, cfg, progress=False, model_config=other,
                                 overwrite=True)
    aside = Path(summary["replaced"])
    assert aside.parent == tmp_path and aside.name.startswith("beh.replaced-")
    assert everything(aside) == before  # the old run, untouched
    assert "its files were moved to" in capsys.readouterr().out
    assert json.loads((out / "plan.json").read_text())["teacher"] == beh.teacher_fingerprint(other)
    assert summary["generated"] == 6
    beh.check_teacher(out, other)
    with pytest.raises(ValueError, match="was made by another LLM"):
        beh.check_teacher(out, MODEL)
    # overwrite with identical settings resumes: nothing moved, nothing regenerated
    assert generate_behaviors(utts, lib, llm2, tok2, out, cfg, progress=False, model_config=other,
                              overwrite=True)["generated"] == 0
    assert len(list(tmp_path.glob("beh.replaced-*"))) == 1


def test_folders_without_provenance_are_refused(tmp_path, setup):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=1, max_new_tokens=2)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False)
    with pytest.raises(ValueError, match=rf"^{tmp_path}/plan.json records no teacher LLM"):
        beh.check_teacher(tmp_path, MODEL)
    (tmp_path / "plan.json").unlink()  # shards of unknown origin
    with pytest.raises(ValueError, match=r"plan.json is missing \(these files record no teacher"):
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False,
                           model_config=MODEL)
    with pytest.raises(FileNotFoundError, match="plan.json not found"):
        beh.check_teacher(tmp_path, MODEL)
    old = {"config": {"per_utterance": 1}, "jobs": 3}  # what earlier versions wrote
    (tmp_path / "plan.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="plan.json is from an older mtbi-fast"):
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False,
                           model_config=MODEL)


def test_check_teacher_names_the_differing_fields(tmp_path, setup):
    model, utts, lib = setup
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path,
                       BehaviorConfig(per_utterance=1, max_new_tokens=2), progress=False,
                       model_config=MODEL)
    train_model = yaml.safe_load((ROOT / "configs" / "tiny_train.yaml").read_text())["model"]
    with pytest.raises(ValueError) as err:
        beh.check_teacher(tmp_path, train_model)
    assert str(err.value).startswith(
        f"{tmp_path} was made by another LLM ({{\"tiny\": {{}}}}) than model.llm "
        f"({{\"tiny\": {{\"initializer_range\": 0.3}}}}) describes: teacher.config_sha256 (recorded '")
    with pytest.raises(ValueError, match=r": teacher.weights \(recorded 'random init \(seed 0\)', now "
                                         r"'random init \(seed 7\)'\); make the behaviors"):
        beh.check_teacher(tmp_path, {**MODEL, "init_seed": 7})


def test_fingerprint_of_a_checkpoint_folder(tmp_path):
    """A folder's fingerprint reads files, not the model: config, tokenizer and sampled weights;
    it follows the folder's content, not its place."""
    import shutil

    from mtbi_fast.hub import load_llm

    llm, tok = load_llm({"tiny": {}})
    llm.save_pretrained(tmp_path / "a")
    tok.save_pretrained(tmp_path / "a")
    fp = beh.teacher_fingerprint({"llm": {"path": str(tmp_path / "a")}})
    assert fp["source"] == {"path": str((tmp_path / "a").resolve())} and fp["weights"].startswith("sha256:")
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    moved = beh.teacher_fingerprint({"llm": {"path": str(tmp_path / "moved")}})
    assert {k: moved[k] for k in beh.TEACHER_IDENTITY} == {k: fp[k] for k in beh.TEACHER_IDENTITY}
    llm2, _ = load_llm({"tiny": {}}, seed=1)  # same shapes, other values
    llm2.save_pretrained(tmp_path / "moved")
    other = beh.teacher_fingerprint({"llm": {"path": str(tmp_path / "moved")}})
    assert other["weights"] != fp["weights"] and other["config_sha256"] == fp["config_sha256"]
    cfg = json.loads((tmp_path / "moved" / "config.json").read_text())
    (tmp_path / "moved" / "config.json").write_text(json.dumps({**cfg, "rope_theta": 1.0}))
    assert beh.teacher_fingerprint({"llm": {"path": str(tmp_path / "moved")}})["config_sha256"] != fp["config_sha256"]
    with pytest.raises(FileNotFoundError, match="model folder not found: /nonexistent"):
        beh.teacher_fingerprint({"llm": {"path": "/nonexistent"}})


def test_a_folder_in_use_is_refused(tmp_path, setup):
    from mtbi_fast.lock import FolderLock, FolderLockedError

    model, utts, lib = setup
    with FolderLock(tmp_path, "behaviors"):
        with pytest.raises(FolderLockedError, match=rf"{tmp_path} is in use by process \d+ on .* \(behaviors"):
            generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path,
                               BehaviorConfig(per_utterance=1, max_new_tokens=2), progress=False)
    assert not list(tmp_path.glob("shard-*")) and not (tmp_path / "plan.json").exists()
