"""mtbi_fast/behaviors.py with the tiny config: resume equality, determinism, hidden-state cache,
ranks (the files of one process from any world size), prompt-length batches, index.json."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import mtbi_fast.behaviors as beh
import mtbi_fast.provenance as prov
from mtbi_fast.behaviors import BehaviorConfig, generate_behaviors, plan
from mtbi_fast.behaviors_folder import read_behaviors
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
    return {p.name: p.read_bytes() for p in sorted(Path(d).glob("part-*"))}


@pytest.mark.parametrize("sample", [False, True])
def test_resume_after_kill_gives_the_same_files(tmp_path, setup, monkeypatch, sample):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=5, max_new_tokens=6, batch_size=2, part_size=4, do_sample=sample)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path / "full", cfg, progress=False)

    real, calls = beh.answer, []

    def dying(*a, **k):  # killed during the third part
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(beh, "answer", dying)
    with pytest.raises(KeyboardInterrupt):
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path / "resumed", cfg, progress=False)
    assert len(files(tmp_path / "resumed")) == 2  # two complete parts, nothing half written
    monkeypatch.setattr(beh, "answer", real)
    summary = generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path / "resumed", cfg,
                                 progress=False)
    assert summary["generated"] == 15 - 8
    assert files(tmp_path / "resumed") == files(tmp_path / "full")
    records = read_behaviors(tmp_path / "full")
    assert len(records) == 15 and len({r["id"] for r in records}) == 15


def test_records_use_only_the_training_split(tmp_path, setup):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=30, max_new_tokens=3, batch_size=16, part_size=64)
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
    states = load_file(str(tmp_path / "part-00000.safetensors"))
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
    # one absent or unknown task among present ones is named too, not dropped in silence
    with pytest.raises(ValueError, match=r"no train prompts of tasks \['give_title'\] in the split \(its tasks: "):
        plan(utts, lib.split(), lib, BehaviorConfig(tasks=("repeat", "give_title")))
    with pytest.raises(ValueError, match=r"^unknown task 'recite' \(the library's tasks: "):
        plan(utts, lib.split(), lib, BehaviorConfig(tasks=("repeat", "recite")))


# ---------------------------------------------------------------------------------------------
# provenance: who made a folder, with which settings; refused, resumed or moved aside


def everything(d):
    """Every file of a folder but the lock files (.lock, and the ranks' .lock.*)."""
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if not p.name.startswith(".lock")}


def test_plan_records_the_teacher_settings_and_jobs(tmp_path, setup):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=2, max_new_tokens=3, do_sample=True, seed=3)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False,
                       model_config=MODEL)
    rec = json.loads((tmp_path / "plan.json").read_text())
    assert rec["teacher"] == prov.teacher_fingerprint(MODEL)
    assert rec["teacher"]["weights"] == "random init (seed 0)" and rec["teacher"]["source"] == {"tiny": {}}
    assert len(rec["teacher"]["config_sha256"]) == len(rec["teacher"]["tokenizer_sha256"]) == 64
    assert rec["settings"] == dict(per_utterance=2, split="train", tasks=None, seed=3, part_size=64,
                                   batch_size=8, max_new_tokens=3, do_sample=True, temperature=0.7,
                                   top_p=0.9, dtype="float32", batching="prompt_length")
    assert rec["jobs"] == 6 and len(rec["jobs_sha256"]) == 64
    assert json.loads((tmp_path / ".lock").read_text())["job"] == "behaviors"  # who held it last
    prov.check_teacher(tmp_path, MODEL)  # the same LLM: accepted
    prov.check_teacher(tmp_path, ModelConfig.from_dict(MODEL))


def test_rerun_with_another_llm_or_settings_is_refused_and_nothing_changes(tmp_path, setup):
    from mtbi_fast.hub import load_llm

    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=3, max_new_tokens=3, part_size=4)
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
                           BehaviorConfig(per_utterance=3, max_new_tokens=4, part_size=4),
                           progress=False, model_config=MODEL)
    with pytest.raises(ValueError, match=r"jobs \(recorded 9, now 6\); jobs_sha256"):  # another manifest
        generate_behaviors(utts[:2], lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False,
                           model_config=MODEL)
    with pytest.raises(ValueError, match=r"settings.part_size \(recorded 4, now 2\)"):
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path,
                           BehaviorConfig(per_utterance=3, max_new_tokens=3, part_size=2),
                           progress=False, model_config=MODEL)
    with pytest.raises(ValueError, match=r"teacher \(recorded 'recorded', now 'not recorded'\)"):
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False)
    assert everything(tmp_path) == before  # nothing mixed, nothing rewritten
    # identical settings resume (nothing to do); cache_hidden may be added later
    again = generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path,
                               BehaviorConfig(per_utterance=3, max_new_tokens=3, part_size=4,
                                              cache_hidden=True), progress=False, model_config=MODEL)
    assert again["generated"] == 9 and len(list(tmp_path.glob("part-*.safetensors"))) == 3
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
    assert json.loads((out / "plan.json").read_text())["teacher"] == prov.teacher_fingerprint(other)
    assert summary["generated"] == 6
    prov.check_teacher(out, other)
    with pytest.raises(ValueError, match="was made by another LLM"):
        prov.check_teacher(out, MODEL)
    # overwrite with identical settings resumes: nothing moved, nothing regenerated
    assert generate_behaviors(utts, lib, llm2, tok2, out, cfg, progress=False, model_config=other,
                              overwrite=True)["generated"] == 0
    assert len(list(tmp_path.glob("beh.replaced-*"))) == 1


def test_folders_without_provenance_are_refused(tmp_path, setup):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=1, max_new_tokens=2)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False)
    with pytest.raises(ValueError, match=rf"^{tmp_path}/plan.json records no teacher LLM"):
        prov.check_teacher(tmp_path, MODEL)
    (tmp_path / "plan.json").unlink()  # parts of unknown origin
    with pytest.raises(ValueError, match=r"plan.json is missing \(these files record no teacher"):
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False,
                           model_config=MODEL)
    with pytest.raises(FileNotFoundError, match="plan.json not found"):
        prov.check_teacher(tmp_path, MODEL)
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
        prov.check_teacher(tmp_path, train_model)
    assert str(err.value).startswith(
        f"{tmp_path} was made by another LLM ({{\"tiny\": {{}}}}) than model.llm "
        f"({{\"tiny\": {{\"initializer_range\": 0.3}}}}) describes: teacher.config_sha256 (recorded '")
    with pytest.raises(ValueError, match=r": teacher.weights \(recorded 'random init \(seed 0\)', now "
                                         r"'random init \(seed 7\)'\); make the behaviors"):
        prov.check_teacher(tmp_path, {**MODEL, "init_seed": 7})


def test_fingerprint_of_a_checkpoint_folder(tmp_path):
    """A folder's fingerprint reads files, not the model: config, tokenizer and sampled weights;
    it follows the folder's content, not its place."""
    import shutil

    from mtbi_fast.hub import load_llm

    llm, tok = load_llm({"tiny": {}})
    llm.save_pretrained(tmp_path / "a")
    tok.save_pretrained(tmp_path / "a")
    fp = prov.teacher_fingerprint({"llm": {"path": str(tmp_path / "a")}})
    assert fp["source"] == {"path": str((tmp_path / "a").resolve())} and fp["weights"].startswith("sha256:")
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    moved = prov.teacher_fingerprint({"llm": {"path": str(tmp_path / "moved")}})
    assert {k: moved[k] for k in prov.TEACHER_IDENTITY} == {k: fp[k] for k in prov.TEACHER_IDENTITY}
    llm2, _ = load_llm({"tiny": {}}, seed=1)  # same shapes, other values
    llm2.save_pretrained(tmp_path / "moved")
    other = prov.teacher_fingerprint({"llm": {"path": str(tmp_path / "moved")}})
    assert other["weights"] != fp["weights"] and other["config_sha256"] == fp["config_sha256"]
    cfg = json.loads((tmp_path / "moved" / "config.json").read_text())
    (tmp_path / "moved" / "config.json").write_text(json.dumps({**cfg, "rope_theta": 1.0}))
    assert prov.teacher_fingerprint({"llm": {"path": str(tmp_path / "moved")}})["config_sha256"] != fp["config_sha256"]
    with pytest.raises(FileNotFoundError, match="model folder not found: /nonexistent"):
        prov.teacher_fingerprint({"llm": {"path": "/nonexistent"}})


def test_a_folder_in_use_is_refused(tmp_path, setup):
    from mtbi_fast.lock import FolderLock, FolderLockedError

    model, utts, lib = setup
    with FolderLock(tmp_path, "behaviors"):
        with pytest.raises(FolderLockedError, match=rf"{tmp_path} is in use by process \d+ on .* \(behaviors"):
            generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path,
                               BehaviorConfig(per_utterance=1, max_new_tokens=2), progress=False)
    assert not list(tmp_path.glob("part-*")) and not (tmp_path / "plan.json").exists()


# ---------------------------------------------------------------------------------------------
# ranks: each writes every world-th part; the files are a single process's


def run_ranks(utts, lib, model, out, cfg, world, order=None, **kw):
    """Rank 0, 1, ... (or ``order``) of ``world``, one after the other, in this process."""
    return [generate_behaviors(utts, lib, model.llm, model.tokenizer, out, cfg, progress=False,
                               rank=r, world=world, model_config=MODEL, **kw)
            for r in (order or range(world))]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_write_the_files_of_a_single_process(tmp_path, setup, world):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=5, max_new_tokens=5, batch_size=3, part_size=4,
                         do_sample=True, cache_hidden=True)
    one = generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path / "one", cfg,
                             progress=False, model_config=MODEL)
    assert one["index"] == str(tmp_path / "one" / "index.json")
    summaries = run_ranks(utts, lib, model, tmp_path / "ranks", cfg, world)
    assert [s["generated"] for s in summaries] == [
        sum(min(4, 15 - 4 * k) for k in beh.rank_parts(4, r, world)) for r in range(world)]
    assert "index" not in summaries[0] and "index" in summaries[-1]  # the last rank sees all parts
    want = everything(tmp_path / "one")
    assert sorted(want) == sorted(["index.json", "plan.json", "split.json"] + [
        f"part-{k:05d}.{ext}" for k in range(4) for ext in ("jsonl", "safetensors")])
    assert everything(tmp_path / "ranks") == want  # byte for byte: jsonl, safetensors, index, plan
    index = json.loads(want["index.json"])
    assert index["parts"] == 4 and index["records"] == 15 and index["hidden_states"] is True
    assert [f["name"] for f in index["files"]] == sorted(n for n in want if n.startswith("part-"))
    assert [f["records"] for f in index["files"]] == [4, 4, 4, 4, 4, 4, 3, 3]
    for f in index["files"]:
        assert f["sha256"] == __import__("hashlib").sha256(want[f["name"]]).hexdigest()
    assert read_behaviors(tmp_path / "ranks") == read_behaviors(tmp_path / "one")


def test_rank_slices_are_disjoint_and_cover_every_part():
    for n in (0, 1, 5, 17):
        for world in (1, 2, 3, 8):
            slices = [beh.rank_parts(n, r, world) for r in range(world)]
            assert sorted(itertools.chain(*slices)) == list(range(n))  # every part once
            assert all(k % world == r for r, ks in enumerate(slices) for k in ks)
    assert beh.rank_world({}) == (0, 1, 0)
    assert beh.rank_world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ValueError, match=r"rank 4 of world 4: need 0 <= rank < world"):
        beh.rank_world({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match=r"RANK=.0., WORLD_SIZE=None, LOCAL_RANK=None: whole numbers expected"):
        beh.rank_world({"RANK": "0"})


def test_a_killed_rank_reruns_only_its_missing_parts(tmp_path, setup):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=5, max_new_tokens=4, batch_size=2, part_size=4, do_sample=True)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path / "one", cfg, progress=False,
                       model_config=MODEL)
    out = tmp_path / "ranks"
    run_ranks(utts, lib, model, out, cfg, 2)
    (out / "part-00003.jsonl").unlink()  # rank 1 was killed before its last part
    with pytest.raises(FileNotFoundError, match=rf"^{out}/part-00003.jsonl is missing: {out}/index.json "
                                                r"lists 4 files and 1 of them are not there"):
        read_behaviors(out)
    real, asked = beh.answer, []
    beh.answer = lambda batch, *a, **k: asked.append([j["id"] for j in batch]) or real(batch, *a, **k)
    try:
        rank0, rank1 = run_ranks(utts, lib, model, out, cfg, 2)
    finally:
        beh.answer = real
    assert rank0["generated"] == 0 and "index" not in rank0  # rank 0 has nothing to do; 3 is missing
    assert rank1["generated"] == 3 and rank1["index"]  # part 3 only (15 jobs: 4 + 4 + 4 + 3)
    assert sorted(itertools.chain(*asked)) == sorted(j["id"] for j in plan(utts, lib.split(), lib, cfg)[12:])
    assert everything(out) == everything(tmp_path / "one")


def test_batches_follow_prompt_length_and_records_keep_plan_order(tmp_path, setup):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=6, max_new_tokens=3, batch_size=4, part_size=10)
    jobs = plan(utts, lib.split(), lib, cfg)
    lengths = beh.prompt_lengths(jobs, lib, model.tokenizer)
    assert len(set(lengths)) > 3  # the test means something: prompts of several lengths
    cut = beh.batches(jobs, lib, model.tokenizer, 4)
    flat = list(itertools.chain(*cut))
    assert sorted(flat) == list(range(len(jobs))) and [len(b) for b in cut[:-1]] == [4] * (len(cut) - 1)
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    for a, b in itertools.pairwise(flat):  # equal lengths keep plan order
        assert lengths[a] > lengths[b] or a < b
    # answer() builds exactly the prompts whose lengths were sorted
    one = beh.answer([jobs[0]], lib, model.llm, model.tokenizer, cfg, 0)[0]
    assert len(one["prefix_ids"] + one["transcript_ids"] + one["suffix_ids"]) == lengths[0]
    # the records come back in plan order, batches cut per part by length
    seen = []
    real = beh.answer
    beh.answer = lambda batch, *a, **k: seen.append([j["id"] for j in batch]) or real(batch, *a, **k)
    try:
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False)
    finally:
        beh.answer = real
    assert [r["id"] for r in read_behaviors(tmp_path)] == [j["id"] for j in jobs]
    by_id = dict(zip((j["id"] for j in jobs), lengths))
    for k in range(0, len(jobs), 10):
        shard = [j["id"] for j in jobs[k:k + 10]]
        want = [[shard[i] for i in b] for b in beh.batches(jobs[k:k + 10], lib, model.tokenizer, 4)]
        assert seen[:len(want)] == want
        got = [by_id[i] for b in seen[:len(want)] for i in b]
        assert got == sorted(got, reverse=True)
        seen = seen[len(want):]
    assert seen == []


def test_index_names_a_missing_or_extra_part(tmp_path, setup):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=5, max_new_tokens=2, part_size=4)
    generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["hidden_states"] is False and index["records"] == 15
    assert [f["name"] for f in index["files"]] == [f"part-{k:05d}.jsonl" for k in range(4)]
    records = read_behaviors(tmp_path)
    shard1 = (tmp_path / "part-00001.jsonl").read_bytes()
    (tmp_path / "part-00001.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path}/part-00001.jsonl is missing: "
                                                rf"{tmp_path}/index.json lists 4 files"):
        read_behaviors(tmp_path)
    (tmp_path / "part-00001.jsonl").write_bytes(shard1)
    (tmp_path / "part-00004.jsonl").write_bytes(shard1)
    with pytest.raises(ValueError, match=rf"^{tmp_path}/part-00004.jsonl is not in {tmp_path}/index.json"):
        read_behaviors(tmp_path)
    (tmp_path / "part-00004.jsonl").unlink()
    (tmp_path / "part-00001.jsonl").write_bytes(shard1.split(b"\n", 1)[1])  # one record fewer
    with pytest.raises(ValueError, match=rf"part-00001.jsonl has 3 records, {tmp_path}/index.json lists 4"):
        read_behaviors(tmp_path)
    (tmp_path / "part-00001.jsonl").write_bytes(shard1)
    (tmp_path / "index.json").unlink()  # a folder from before index.json: read as it is
    assert read_behaviors(tmp_path) == records


def test_ranks_wait_for_rank_0s_plan_and_refuse_another(tmp_path, setup):
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=1, max_new_tokens=2, part_size=2)
    with pytest.raises(beh.PlanTimeoutError, match=rf"^rank 1: {tmp_path}/plan.json \(rank 0 writes it\) "
                                                   r"did not appear within 0.3 s; did rank 0 fail"):
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False,
                           rank=1, world=2, plan_timeout=0.3)
    assert isinstance(beh.PlanTimeoutError("x"), ValueError)  # one line on the command line
    run_ranks(utts, lib, model, tmp_path, cfg, 2, order=[0])
    with pytest.raises(ValueError, match=r"made differently: settings.max_new_tokens \(recorded 2, now 3\)"):
        generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path,
                           BehaviorConfig(per_utterance=1, max_new_tokens=3, part_size=2),
                           progress=False, rank=1, world=2, model_config=MODEL, plan_timeout=60)
    assert not (tmp_path / "part-00001.jsonl").exists()


def test_ranks_refuse_a_second_run(tmp_path, setup, monkeypatch):
    import fcntl

    import mtbi_fast.lock as lock_mod
    from mtbi_fast.lock import FolderLock, FolderLockedError, RanksLock, rank_lock_name

    monkeypatch.setattr(lock_mod, "RANKS_LOCK_PATIENCE_S", 0.2)
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=1, max_new_tokens=2, part_size=1)
    run_ranks(utts, lib, model, tmp_path, cfg, 2, order=[0])
    # rank 1 of a launch at work: its own lock, and its share of .lock.ranks
    live = FolderLock(tmp_path, "behaviors, rank 1 of 2", name=rank_lock_name(1))
    assert live.path == tmp_path / ".lock.rank-00001"
    with live, RanksLock(tmp_path, fcntl.LOCK_SH):
        with pytest.raises(FolderLockedError, match=rf"{tmp_path} is in use by the ranks of a launch: "
                                                    r"process \d+ on .* \(behaviors, rank 1 of 2"):
            generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False)
        with pytest.raises(FolderLockedError, match=r"is in use by process \d+ .*rank 1 of 2.*\.lock\.rank-00001"):
            run_ranks(utts, lib, model, tmp_path, cfg, 2, order=[1])  # a second rank 1
        with pytest.raises(FolderLockedError, match="is in use by the ranks of a launch"):
            run_ranks(utts, lib, model, tmp_path, BehaviorConfig(per_utterance=1, max_new_tokens=3),
                      2, order=[0], overwrite=True)  # would move the files rank 1 writes
        before = everything(tmp_path)
        assert run_ranks(utts, lib, model, tmp_path, cfg, 2, order=[0])[0]["generated"] == 0  # a sibling
        assert everything(tmp_path) == before
    with FolderLock(tmp_path, "behaviors"):  # a single process at work: ranks 0 and 1 refused
        with pytest.raises(FolderLockedError, match=r"is in use by process \d+ on .* \(behaviors, since"):
            run_ranks(utts, lib, model, tmp_path, cfg, 2, order=[0])
        with RanksLock(tmp_path, fcntl.LOCK_EX), pytest.raises(
                FolderLockedError, match=r"is in use by process \d+ on .* \(behaviors, since"):
            generate_behaviors(utts, lib, model.llm, model.tokenizer, tmp_path, cfg, progress=False,
                               rank=1, world=2, model_config=MODEL)
    run_ranks(utts, lib, model, tmp_path, cfg, 2, order=[1])
    assert (tmp_path / "index.json").exists()


def test_ranks_launched_as_processes_at_once(tmp_path, setup):
    """Two `mtbi-fast behaviors` processes with a launcher's RANK / WORLD_SIZE / LOCAL_RANK,
    running at the same time, write the files of one in-process run."""
    from mtbi_fast.hub import load_teacher
    from mtbi_fast.model import ModelConfig

    _, utts, lib = setup
    model_cfg = ModelConfig.from_dict(MODEL)
    llm, tok = load_teacher(model_cfg.llm, seed=model_cfg.init_seed, dtype=model_cfg.dtype)
    cfg = BehaviorConfig(per_utterance=5, max_new_tokens=4, batch_size=3, part_size=2,
                         cache_hidden=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the rank processes (OMP_NUM_THREADS=1): bf16 GEMMs split by thread count
    try:
        generate_behaviors(utts, lib, llm, tok, tmp_path / "one", cfg, progress=False,
                           model_config=model_cfg.to_dict())
    finally:
        torch.set_num_threads(threads)
    args = [sys.executable, "-m", "mtbi_fast.cli", "behaviors", "--manifest",
            ROOT / "tests" / "data" / "clips.jsonl", "--config", ROOT / "configs" / "tiny.yaml",
            "-o", tmp_path / "ranks", "--per-utterance", 5, "--max-new-tokens", 4, "--batch-size", 3,
            "--part-size", 2, "--cache-hidden"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [subprocess.Popen([str(a) for a in args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env={**env, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
             for r in (1, 0)]  # rank 1 first: it waits for rank 0's plan
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for r, text in zip((1, 0), outs):
        assert f"behaviors (rank {r} of 2): " in text and " tokens/s) -> " in text, text
    assert everything(tmp_path / "ranks") == everything(tmp_path / "one")


def test_a_folder_from_before_the_rename_reads_and_resumes_under_its_own_names(tmp_path, setup):
    """Behaviors folders made before 2026-12-03 hold shard-NNNNN.* files and record
    settings.shard_size: they are read as they are, a rerun resumes them writing the missing
    files under the old names, and a folder with both kinds is refused."""
    model, utts, lib = setup
    cfg = BehaviorConfig(per_utterance=5, max_new_tokens=2, part_size=4)
    out = tmp_path / "old"
    generate_behaviors(utts, lib, model.llm, model.tokenizer, out, cfg, progress=False)
    records = read_behaviors(out)
    for p in out.glob("part-*"):  # what an older mtbi-fast wrote
        p.rename(out / p.name.replace("part-", "shard-"))
    index = json.loads((out / "index.json").read_text())
    for f in index["files"]:
        f["name"] = f["name"].replace("part-", "shard-")
    (out / "index.json").write_text(json.dumps(index))
    plan_ = json.loads((out / "plan.json").read_text())
    plan_["settings"]["shard_size"] = plan_["settings"].pop("part_size")
    (out / "plan.json").write_text(json.dumps(plan_))
    assert read_behaviors(out) == records
    old_bytes = (out / "shard-00003.jsonl").read_bytes()
    (out / "shard-00003.jsonl").unlink()
    (out / "index.json").unlink()
    again = generate_behaviors(utts, lib, model.llm, model.tokenizer, out, cfg, progress=False)
    assert again["generated"] == 3  # the last part only, under its old name
    assert (out / "shard-00003.jsonl").read_bytes() == old_bytes and not list(out.glob("part-*"))
    assert [f["name"] for f in json.loads((out / "index.json").read_text())["files"]] == [
        f"shard-{k:05d}.jsonl" for k in range(4)]
    (out / "part-00000.jsonl").write_bytes(old_bytes)
    with pytest.raises(ValueError, match=rf"^{out} holds both part-\*.jsonl and shard-\*.jsonl behavior files"):
        read_behaviors(out)
