"""mtbi_fast/tasks.py and configs/tasks.yaml: the library and its disjoint, seeded split."""

from pathlib import Path

import pytest

from mtbi_fast.tasks import TaskLibrary, TaskSplit

ROOT = Path(__file__).parents[1]

LIB = Path(__file__).parents[1] / "configs" / "tasks.yaml"


def test_bundled_library_size():
    lib = TaskLibrary.load(LIB)
    assert len(lib.tasks) >= 12
    assert all(len(w) >= 8 for w in lib.tasks.values())
    assert len({w for ws in lib.tasks.values() for w in ws}) == sum(map(len, lib.tasks.values()))


def test_split_is_disjoint_seeded_and_recorded(tmp_path):
    lib = TaskLibrary.load(LIB)
    split = lib.split()
    assert set(split.heldout_tasks) >= {"give_title", "judge_sentiment"} and len(split.heldout_tasks) == 2
    assert not set(split.heldout_tasks) & set(split.train)
    for task, idx in split.train.items():
        held = split.heldout_wordings[task]
        assert len(held) == 2 and not set(held) & set(idx)
        assert sorted(held + idx) == list(range(len(lib.tasks[task])))
        assert split.kind(task, held[0]) == "heldout_wording" and split.kind(task, idx[0]) == "train"
    assert split.kind("give_title", 0) == "heldout_task"
    assert lib.split().to_dict() == split.to_dict()           # seeded
    assert lib.split(seed=1).to_dict() != split.to_dict()
    split.save(tmp_path / "split.json")
    assert TaskSplit.from_dict(__import__("json").loads((tmp_path / "split.json").read_text())) == split


@pytest.mark.parametrize("raw, message", [
    ({"tasks": {"a": ["no placeholder"]}}, r"task 'a' wording 0 must contain \{transcript\} exactly once"),
    ({"tasks": {"a": []}}, r"task 'a' needs a non-empty list"),
    ({}, r"needs a non-empty 'tasks' mapping"),
    ({"tasks": {"a": ["x {transcript}"]}, "splits": {}}, r"unknown key 'splits'"),
    ({"tasks": {"a": ["x {transcript}"]}, "split": {"heldout_task_names": ["b"]}},
     r"split.heldout_task_names names unknown task 'b'"),
])
def test_library_errors(raw, message):
    with pytest.raises(ValueError, match=message):
        TaskLibrary.from_dict(raw, "lib.yaml")


def test_split_cannot_hold_out_everything():
    lib = TaskLibrary.from_dict({"tasks": {"a": ["{transcript}", "x {transcript}"]},
                                 "split": {"heldout_tasks": 1}})
    with pytest.raises(ValueError, match="holds out every task"):
        lib.split()


def test_adding_a_task_changes_no_other_tasks_wordings():
    """Each task's wording shuffle and held-out rank come from the seed and its own name: a new
    task leaves every other task's held-out wordings as they were (and the held-out tasks, unless
    it ranks among them)."""
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "tasks.yaml").read_text())
    before = TaskLibrary.from_dict(raw).split()
    grown = dict(raw, tasks={**raw["tasks"], "zz_new_task": [f"wording {i}: {{transcript}}" for i in range(6)]})
    after = TaskLibrary.from_dict(grown).split()
    for task, held in before.heldout_wordings.items():
        if task in after.heldout_wordings:
            assert after.heldout_wordings[task] == held and after.train[task] == before.train[task], task
    kept = set(before.heldout_tasks) & set(after.heldout_tasks)
    assert len(kept) >= len(before.heldout_tasks) - 1  # at most the one the new task displaced
    assert set(after.heldout_tasks) <= set(before.heldout_tasks) | {"zz_new_task"}
