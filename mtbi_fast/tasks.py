"""The task library (``configs/tasks.yaml``) and its seeded, recorded generalization split.

    lib = TaskLibrary.load("configs/tasks.yaml")
    split = lib.split()          # seeded; split.to_dict() is what gets recorded (split.json)
    split.train                  # {task: [wording index, ...]} used for training
    split.heldout_wordings       # {task: [...]}: seen tasks, unseen wordings (prompt generalization)
    split.heldout_tasks          # [task, ...]: unseen tasks (task generalization)

A wording is a prompt with one ``{transcript}`` placeholder where the utterance goes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from .io import atomic_write_text, derived_seed

PLACEHOLDER = "{transcript}"
SPLITS = ("train", "heldout_wording", "heldout_task")  # the parts of a TaskSplit


@dataclass
class TaskSplit:
    seed: int
    train: dict[str, list[int]]
    heldout_wordings: dict[str, list[int]]
    heldout_tasks: list[str]

    def to_dict(self) -> dict:
        return {"seed": self.seed, "train": self.train, "heldout_wordings": self.heldout_wordings,
                "heldout_tasks": self.heldout_tasks}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSplit":
        return cls(d["seed"], d["train"], d["heldout_wordings"], d["heldout_tasks"])

    def save(self, path: str | Path):
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def kind(self, task: str, wording: int) -> str:
        """"train", "heldout_wording" or "heldout_task" for one (task, wording)."""
        if task in self.heldout_tasks:
            return "heldout_task"
        if wording in self.heldout_wordings.get(task, []):
            return "heldout_wording"
        return "train"


@dataclass
class TaskLibrary:
    tasks: dict[str, list[str]]
    split_config: dict

    @classmethod
    def load(cls, path: str | Path) -> "TaskLibrary":
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"task library not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "tasks") -> "TaskLibrary":
        if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), dict) or not raw["tasks"]:
            raise ValueError(f"{where}: needs a non-empty 'tasks' mapping of task name -> wordings")
        unknown = set(raw) - {"tasks", "split"}
        if unknown:
            raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r} (allowed: tasks, split)")
        tasks = {}
        for name, wordings in raw["tasks"].items():
            if not isinstance(wordings, list) or not wordings:
                raise ValueError(f"{where}: task {name!r} needs a non-empty list of wordings")
            for i, w in enumerate(wordings):
                if not isinstance(w, str) or w.count(PLACEHOLDER) != 1:
                    raise ValueError(f"{where}: task {name!r} wording {i} must contain "
                                     f"{PLACEHOLDER} exactly once: {w!r}")
            tasks[str(name)] = list(wordings)
        split = dict(raw.get("split") or {})
        allowed = {"seed", "heldout_tasks", "heldout_wordings", "heldout_task_names"}
        bad = set(split) - allowed
        if bad:
            raise ValueError(f"{where}: unknown key split.{sorted(bad)[0]} (allowed: {sorted(allowed)})")
        for name in split.get("heldout_task_names") or []:
            if name not in tasks:
                raise ValueError(f"{where}: split.heldout_task_names names unknown task {name!r}")
        return cls(tasks, split)

    def split(self, seed: int | None = None) -> TaskSplit:
        """The seeded split (the library's ``split`` section, ``seed`` overriding its seed)."""
        cfg = self.split_config
        seed = cfg.get("seed", 0) if seed is None else seed
        names = sorted(self.tasks)
        heldout = list(cfg.get("heldout_task_names") or [])
        n_tasks = cfg.get("heldout_tasks", len(heldout))
        # each task's rank and each task's wording shuffle come from the seed and its own name:
        # adding a task moves no other task's wordings, and changes the held-out tasks only if
        # the new one ranks among them
        rest = sorted((t for t in names if t not in heldout), key=lambda t: derived_seed(seed, f"task/{t}"))
        heldout += rest[:max(0, n_tasks - len(heldout))]
        if len(heldout) >= len(names):
            raise ValueError("the split holds out every task: nothing is left to train on")
        n_words = cfg.get("heldout_wordings", 0)
        train, held_w = {}, {}
        for t in names:
            if t in heldout:
                continue
            idx = list(range(len(self.tasks[t])))
            if n_words >= len(idx):
                raise ValueError(f"task {t!r} has {len(idx)} wordings; holding out {n_words} leaves none")
            random.Random(derived_seed(seed, f"wordings/{t}")).shuffle(idx)
            held_w[t] = sorted(idx[:n_words])
            train[t] = sorted(idx[n_words:])
        return TaskSplit(seed, train, held_w, sorted(heldout))

    def prompt(self, task: str, wording: int, transcript: str) -> str:
        """Wording ``wording`` of ``task`` with ``transcript`` in place of ``{transcript}``."""
        return self.tasks[task][wording].replace(PLACEHOLDER, transcript)

    def pool(self, split: TaskSplit, kind: str) -> list[tuple[str, int]]:
        """The (task, wording) pairs of one part of ``split`` (``kind``: one of ``SPLITS``), in a
        fixed order."""
        if kind == "train":
            return [(t, w) for t, ws in sorted(split.train.items()) for w in ws]
        if kind == "heldout_wording":
            return [(t, w) for t, ws in sorted(split.heldout_wordings.items()) for w in ws]
        if kind == "heldout_task":
            return [(t, w) for t in split.heldout_tasks for w in range(len(self.tasks[t]))]
        raise ValueError(f"split must be train, heldout_wording or heldout_task, got {kind!r}")
