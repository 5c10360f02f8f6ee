"""Where behaviors come from: the teacher's fingerprint, the plan record, and the checks on them.

``plan.json`` (written by ``mtbi-fast behaviors``, copied into Shar shard folders) records the
teacher LLM (``teacher_fingerprint``: its source plus sha256 fingerprints of its config, tokenizer
and weights), the generation settings, the task split and the jobs (utterance ids and texts,
prompt wordings). ``plan_diffs`` lists what differs between two plans (a rerun into a folder
made differently is refused with it); ``check_teacher`` tells the trainer whether a folder was
made by the LLM its model config describes. docs/data.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path

from .hub import ASSETS, TINY_LLM, hub_snapshot, parse_source, source_config
from .io import sha256_files

PLAN_FORMAT = 2
TEACHER_IDENTITY = ("config_sha256", "tokenizer_sha256", "weights", "commit")  # what check_teacher compares
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16  # weight files: 64 KiB at 16 evenly spaced offsets + the tail


def teacher_fingerprint(model_config) -> dict:
    """Who the teacher is, from a model config (the run config's ``model`` section, a dict or a
    ``ModelConfig``): ``source`` (its ``llm`` entry; informational, a folder may move) and the
    identity that ``check_teacher`` compares, computed without building the model:

    - ``config_sha256``: the LLM's config (a tiny model: the transformers config arguments; a
      folder: ``config.json`` without ``transformers_version`` and ``_name_or_path``);
    - ``tokenizer_sha256``: the tokenizer files (a tiny model: the bundled tokenizer);
    - ``weights``: ``"random init (seed N)"`` for a tiny model (``init_seed`` decides them);
      ``"sha256:..."`` of a folder's weight files: names, sizes and 17 samples of 64 KiB of
      each, the first, the last and 15 evenly spaced (about 1 MiB read a file: any change of
      shape or dtype and any change of values that touches a sample shows; a full hash of a 7B
      model would take a minute);
    - ``commit``: for a hub source, the commit its revision resolved to (its snapshot's files are
      hashed as a folder's).
    """
    if is_dataclass(model_config):
        model_config = asdict(model_config)
    source = model_config.get("llm") or {"tiny": {}}
    kind, value, revision = parse_source(source, "llm")
    if kind == "tiny":
        return {"source": {"tiny": dict(value or {})},
                "config_sha256": sha_json({**TINY_LLM, **(value or {})}),
                "tokenizer_sha256": sha256_files([ASSETS / "tiny_tokenizer.json"], names=True, digest_each=True),
                "weights": f"random init (seed {int(model_config.get('init_seed', 0))})", "commit": None}
    commit = None
    if kind == "hub":  # its snapshot, as a folder; the commit it resolved to is part of its identity
        folder, commit = hub_snapshot(value, revision)
        kind, value = "path", str(folder)
    if kind == "path" and not Path(value).is_dir():
        raise FileNotFoundError(f"model folder not found: {value}")
    folder, config = source_config(kind, value, "llm")
    for key in ("transformers_version", "_name_or_path"):
        config.pop(key, None)
    weights = sorted(p for p in folder.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".bin", ".pt", ".pth") or p.name.endswith(".index.json")))
    if not weights:
        raise FileNotFoundError(f"model folder {folder} has no weight files (*.safetensors, *.bin)")
    out = {"source": {kind: str(folder.resolve()) if kind == "path" else value},
           "config_sha256": sha_json(config),
           "tokenizer_sha256": sha256_files([folder / n for n in TOKENIZER_FILES if (folder / n).is_file()], names=True,
                                         digest_each=True),
           "weights": "sha256:" + _sha_weights(weights), "commit": commit}
    if commit is not None:
        out["source"] = {"hub": source["hub"], "revision": revision}
    return out


def check_teacher(behaviors_dir: str | os.PathLike, model_config) -> None:
    """Raises ``ValueError`` naming the folder and the differing fields unless the behaviors in
    ``behaviors_dir`` were made by the LLM that ``model_config`` (a run config's ``model``
    section) describes. The trainer calls it when ``data.teacher_cache`` is on: the cached hidden
    states are that LLM's, and another LLM's would be imitated without a word."""
    folder = Path(behaviors_dir)
    recorded = read_plan(folder).get("teacher")
    if recorded is None:
        raise ValueError(f"{folder}/plan.json records no teacher LLM (made by an older mtbi-fast, "
                         "or by a library call without model_config); make the behaviors again "
                         "with `mtbi-fast behaviors --config RUN.yaml ... --overwrite`")
    now = teacher_fingerprint(model_config)
    diffs = diff_fields({f"teacher.{k}": recorded.get(k) for k in TEACHER_IDENTITY},
                  {f"teacher.{k}": now.get(k) for k in TEACHER_IDENTITY})
    if diffs:
        raise ValueError(f"{folder} was made by another LLM ({short(recorded.get('source'))}) than "
                         f"model.llm ({short(now['source'])}) describes: {'; '.join(diffs)}; make "
                         "the behaviors with this model config (`mtbi-fast behaviors --config ...`)")


def read_plan(behaviors_dir: str | os.PathLike) -> dict:
    """The folder's ``plan.json`` (what was asked, with which LLM and settings)."""
    path = Path(behaviors_dir) / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {Path(behaviors_dir)} is not a behaviors folder "
                                "made by `mtbi-fast behaviors`")
    try:
        out = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: not a JSON object")
    return out


def plan_record(jobs, split, library, llm, cfg, model_config, batching: str) -> dict:
    """What plan.json records for ``jobs`` (``behaviors.plan``) answered by ``llm`` with the
    ``BehaviorConfig`` ``cfg`` (module docstring); ``batching``: how the batches were cut."""
    params = next(iter(llm.parameters()), None)
    settings = {"per_utterance": cfg.per_utterance, "split": cfg.split,
                "tasks": list(cfg.tasks) if cfg.tasks is not None else None, "seed": cfg.seed,
                "part_size": cfg.part_size, "batch_size": cfg.batch_size,
                "max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample,
                "temperature": cfg.temperature if cfg.do_sample else None,
                "top_p": cfg.top_p if cfg.do_sample else None,
                "dtype": str(params.dtype).removeprefix("torch.") if params is not None else None,
                "batching": batching}
    asked = [(j["id"], j["text"], library.tasks[j["task"]][j["wording"]]) for j in jobs]
    return {"format": PLAN_FORMAT,
            "teacher": teacher_fingerprint(model_config) if model_config is not None else None,
            "settings": settings, "task_split_sha256": sha_json(split.to_dict()),
            "jobs": len(jobs), "jobs_sha256": sha_json(asked),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}}


def plan_diffs(old: dict, new: dict) -> list[str]:
    """The fields two plan records differ in that matter for a resume (``cache_hidden`` may
    change), each with both values."""
    return diff_fields(_flat(old), _flat(new))


def _flat(record: dict) -> dict:
    """The fields of a plan.json that must match for a resume (cache_hidden may change); the
    parts' size recorded by older folders as ``shard_size`` is ``part_size``."""
    teacher = record.get("teacher")
    out = {f"teacher.{k}": (teacher or {}).get(k) for k in TEACHER_IDENTITY}
    out["teacher"] = "recorded" if teacher is not None else "not recorded"
    settings = dict(record.get("settings") or {})
    if "shard_size" in settings:
        settings["part_size"] = settings.pop("shard_size")
    out.update({f"settings.{k}": v for k, v in settings.items()})
    for key in ("task_split_sha256", "jobs", "jobs_sha256"):
        out[key] = record.get(key)
    return out


def diff_fields(old: dict, new: dict) -> list[str]:
    return [f"{k} (recorded {short(old.get(k))}, now {short(new.get(k))})"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def short(v) -> str:
    if isinstance(v, str) and v.startswith("sha256:"):
        v = v[:19]
    elif isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        v = v[:12]
    return json.dumps(v) if not isinstance(v, str) else repr(v)


def sha_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _sha_weights(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        offsets = {0, max(0, size - _SAMPLE_BYTES)}
        offsets |= {size * i // _SAMPLES for i in range(_SAMPLES)}
        with open(p, "rb") as f:
            for off in sorted(offsets):
                f.seek(off)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()
