"""``mtbi-fast behaviors``: the frozen LLM's answers to task prompts about each transcript.

For every utterance of a manifest, ``per_utterance`` (task, wording) pairs are drawn from the
split's training part (or a held-out part, for evaluation) with a generator seeded by the run seed
and the utterance id, so the plan does not depend on what ran before. The LLM answers each prompt,
with the transcript in place of ``{transcript}``, through its chat template: batched generation
with left padding, greedy or seeded sampling. The prompt tokens are exactly what training uses:
``prefix_ids + transcript_ids + suffix_ids`` (the template split at the transcript).

Output folder: ``split.json`` (the recorded task split), ``plan.json`` (what was asked), and
``shard-00000.jsonl``, ... one record a line (``id``, ``utt_id``, ``task``, ``wording``, ``split``,
``prompt``, ``prefix_ids``, ``transcript_ids``, ``suffix_ids``, ``response``, ``response_ids``).
Each shard is written to a temporary name and renamed when complete, so a killed run resumes
where it stopped with nothing duplicated or lost, and gives the same files as an uninterrupted
run. With ``cache_hidden`` each shard also gets ``shard-NNNNN.safetensors``: the teacher's final
hidden states at the response positions (bf16, one tensor per record id).

Provenance (docs/data.md): ``plan.json`` records the teacher LLM (``teacher_fingerprint``: its
source plus sha256 fingerprints of its config, tokenizer and weights), the generation settings,
the task split and the jobs (utterance ids and texts, prompt wordings). A rerun into a folder made
with anything different is refused with the differing fields listed; with ``overwrite=True`` the
old files are moved aside to ``<folder>.replaced-<time>`` first. A rerun with identical settings
resumes. Only ``cache_hidden`` may change between runs (it adds the missing hidden-state shards,
which are the same with or without it). ``check_teacher`` tells the trainer whether a folder was
made by the LLM its model config describes. One writer at a time: the folder is locked
(``FolderLock``) while a run writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .attention import padded_attention
from .data import Utterance
from .hub import ASSETS, TINY_LLM, source_config
from .io import atomic_write_text
from .lock import LOCK_NAME, FolderLock
from .prompts import left_pad, template_halves
from .tasks import TaskLibrary, TaskSplit


@dataclass
class BehaviorConfig:
    per_utterance: int = 4          # prompts per utterance
    split: str = "train"            # train | heldout_wording | heldout_task
    seed: int = 0
    max_new_tokens: int = 64
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    shard_size: int = 64            # records per shard
    cache_hidden: bool = False
    tasks: tuple | None = None      # only these tasks (e.g. ("continue",) for a BLSP-style baseline)


def plan(utterances: list[Utterance], split: TaskSplit, library: TaskLibrary,
         cfg: BehaviorConfig) -> list[dict]:
    """The (utterance, task, wording) jobs, in a fixed order."""
    pool = library.pool(split, cfg.split)
    if cfg.tasks is not None:
        pool = [(t, w) for t, w in pool if t in cfg.tasks]
        if not pool:
            raise ValueError(f"no {cfg.split} prompts of tasks {list(cfg.tasks)} in the split")
    jobs = []
    for u in sorted(utterances, key=lambda u: u.id):
        rng = random.Random(derived_seed(cfg.seed, u.id))
        for task, wording in rng.sample(pool, min(cfg.per_utterance, len(pool))):
            jobs.append(job(u, task, wording, cfg.split))
    return jobs


def job(utterance: Utterance, task: str, wording: int, split: str) -> dict:
    """One prompt to answer: wording ``wording`` of ``task`` about ``utterance``'s transcript."""
    return {"id": f"{utterance.id}/{task}/{wording}", "utt_id": utterance.id, "task": task,
            "wording": wording, "split": split, "text": utterance.text}


def generate_behaviors(utterances: list[Utterance], library: TaskLibrary, llm, tokenizer,
                       out_dir: str | os.PathLike, cfg: BehaviorConfig, *,
                       split: TaskSplit | None = None, progress: bool = True,
                       model_config: dict | None = None, overwrite: bool = False) -> dict:
    """Run (or resume) behavior generation into ``out_dir``; returns a summary.

    ``model_config``: the model section that ``llm`` and ``tokenizer`` were loaded from (its
    ``llm`` source and ``init_seed``), recorded as the teacher's fingerprint; without it the
    folder records no teacher and ``check_teacher`` refuses it. A folder made with other settings
    is refused, or with ``overwrite`` moved aside first (module docstring)."""
    out = Path(out_dir)
    split = split or library.split()
    with FolderLock(out, "behaviors"):
        jobs = plan(utterances, split, library, cfg)
        record = _provenance(jobs, split, library, llm, cfg, model_config)
        replaced = _check_folder(out, record, split, overwrite)
        # plan.json first: a run killed before split.json is written still resumes
        atomic_write_text(out / "plan.json", json.dumps(record, indent=2))
        split.save(out / "split.json")
        summary = _generate(jobs, library, llm, tokenizer, out, cfg, progress)
    if replaced is not None:
        summary["replaced"] = str(replaced)
    return summary


def _generate(jobs, library, llm, tokenizer, out: Path, cfg: BehaviorConfig, progress: bool) -> dict:
    shards = [jobs[i:i + cfg.shard_size] for i in range(0, len(jobs), cfg.shard_size)]
    todo = [k for k in range(len(shards)) if not (out / f"shard-{k:05d}.jsonl").exists()
            or (cfg.cache_hidden and not (out / f"shard-{k:05d}.safetensors").exists())]
    t0, n_tokens, n_done = time.time(), 0, 0
    bar = tqdm(total=len(jobs), initial=len(jobs) - sum(len(shards[k]) for k in todo),
               desc="behaviors", unit="prompt", disable=not progress)
    for k in todo:
        records, hidden = [], {}
        for b in range(0, len(shards[k]), cfg.batch_size):
            batch = shards[k][b:b + cfg.batch_size]
            records += answer(batch, library, llm, tokenizer, cfg, derived_seed(cfg.seed, f"{k}/{b}"),
                              hidden=hidden if cfg.cache_hidden else None)
            n_tokens += sum(len(r["response_ids"]) for r in records[-len(batch):])
            n_done += len(batch)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{n_tokens / max(time.time() - t0, 1e-9):.0f}")
        if cfg.cache_hidden:
            _write_hidden(out / f"shard-{k:05d}.safetensors", hidden)
        atomic_write_text(out / f"shard-{k:05d}.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    bar.close()
    elapsed = time.time() - t0
    summary = {"prompts": len(jobs), "generated": n_done, "shards": len(shards),
               "new_tokens": n_tokens, "seconds": round(elapsed, 2),
               "tokens_per_s": round(n_tokens / elapsed, 1) if elapsed > 0 else None}
    if progress:
        print(f"behaviors: {n_done} generated now, {len(jobs)} in all, {n_tokens} tokens in "
              f"{elapsed:.1f} s ({summary['tokens_per_s']} tokens/s) -> {out}")
    return summary


def answer(batch: list[dict], library: TaskLibrary, llm, tokenizer, cfg: BehaviorConfig, seed: int,
           hidden: dict | None = None) -> list[dict]:
    """The LLM's answers to a batch of jobs (``plan``), one record each (module docstring), in
    one left-padded batch: greedy, or sampled with ``seed``. With ``hidden`` (a dict), also the
    final hidden states that predicted each response token, taken from the generation itself (no
    second pass): ``hidden[id]`` [len(response_ids), H]."""
    prompts, inputs = [], []
    for j in batch:
        prefix, suffix = template_halves(tokenizer, library.tasks[j["task"]][j["wording"]])
        transcript_ids = tokenizer(j["text"], add_special_tokens=False)["input_ids"]
        prompts.append((library.prompt(j["task"], j["wording"], j["text"]), prefix, transcript_ids,
                        suffix))
        inputs.append(prefix + transcript_ids + suffix)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad([torch.tensor(x, dtype=torch.long) for x in inputs], pad)
    width = ids.shape[1]
    device = llm.get_input_embeddings().weight.device
    kw = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, pad_token_id=pad)
    if cfg.do_sample:
        kw.update(temperature=cfg.temperature, top_p=cfg.top_p)
    steps = []  # the LM head's input at the last position, one [B, H] per decoding step
    hook = llm.get_output_embeddings().register_forward_pre_hook(
        lambda _m, args: steps.append(args[0][:, -1].detach())) if hidden is not None else None
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), padded_attention(llm):
            torch.manual_seed(seed)
            out = llm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)
    finally:
        if hook is not None:
            hook.remove()
    if hidden is not None:  # step k's final state predicted response token k
        states = torch.stack(steps, 1)
    eos = tokenizer.eos_token_id
    records = []
    for i, (j, (prompt, prefix, transcript_ids, suffix), row) in enumerate(
            zip(batch, prompts, out[:, width:].tolist())):
        resp = []
        for tok in row:
            resp.append(tok)
            if tok == eos:
                break
        while resp and resp[-1] == pad and pad != eos:
            resp.pop()
        records.append({"id": j["id"], "utt_id": j["utt_id"], "task": j["task"],
                        "wording": j["wording"], "split": j["split"], "prompt": prompt,
                        "prefix_ids": prefix, "transcript_ids": transcript_ids, "suffix_ids": suffix,
                        "response": tokenizer.decode(resp, skip_special_tokens=True).strip(),
                        "response_ids": resp})
        if hidden is not None:
            hidden[j["id"]] = states[i, :len(resp)].cpu()
    return records


def read_behaviors(out_dir: str | os.PathLike) -> list[dict]:
    """All records of a behaviors folder, in plan order."""
    out = Path(out_dir)
    files = sorted(out.glob("shard-*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no behavior shards in {out} (run `mtbi-fast behaviors`)")
    records = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{f}:{lineno}: not valid JSON ({exc.msg})") from None
    return records


# ---------------------------------------------------------------------------------------------
# provenance

PLAN_FORMAT = 2
TEACHER_IDENTITY = ("config_sha256", "tokenizer_sha256", "weights")  # what check_teacher compares
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
      model would take a minute); ``"hub:ID"`` for a hub id (no local files to read).
    """
    if is_dataclass(model_config):
        model_config = asdict(model_config)
    source = model_config.get("llm") or {"tiny": {}}
    if not isinstance(source, dict) or len(source) != 1:
        raise ValueError(f"model.llm must be a one-key mapping (tiny, path, name or hub), got {source!r}")
    kind, value = next(iter(source.items()))
    if kind == "tiny":
        return {"source": {"tiny": dict(value or {})},
                "config_sha256": _sha_json({**TINY_LLM, **(value or {})}),
                "tokenizer_sha256": _sha_files([ASSETS / "tiny_tokenizer.json"]),
                "weights": f"random init (seed {int(model_config.get('init_seed', 0))})"}
    if kind == "hub":
        return {"source": {"hub": value}, "config_sha256": None, "tokenizer_sha256": None,
                "weights": f"hub:{value}"}
    if kind == "path" and not Path(value).is_dir():
        raise FileNotFoundError(f"model folder not found: {value}")
    folder, config = source_config(kind, value, "llm")
    for key in ("transformers_version", "_name_or_path"):
        config.pop(key, None)
    weights = sorted(p for p in folder.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".bin", ".pt", ".pth") or p.name.endswith(".index.json")))
    if not weights:
        raise FileNotFoundError(f"model folder {folder} has no weight files (*.safetensors, *.bin)")
    return {"source": {kind: str(folder.resolve()) if kind == "path" else value},
            "config_sha256": _sha_json(config),
            "tokenizer_sha256": _sha_files([folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]),
            "weights": "sha256:" + _sha_weights(weights)}


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
    diffs = _diff({f"teacher.{k}": recorded.get(k) for k in TEACHER_IDENTITY},
                  {f"teacher.{k}": now.get(k) for k in TEACHER_IDENTITY})
    if diffs:
        raise ValueError(f"{folder} was made by another LLM ({_short(recorded.get('source'))}) than "
                         f"model.llm ({_short(now['source'])}) describes: {'; '.join(diffs)}; make "
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


def _provenance(jobs, split: TaskSplit, library: TaskLibrary, llm, cfg: BehaviorConfig,
                model_config) -> dict:
    """What plan.json records (module docstring)."""
    params = next(iter(llm.parameters()), None)
    settings = {"per_utterance": cfg.per_utterance, "split": cfg.split,
                "tasks": list(cfg.tasks) if cfg.tasks is not None else None, "seed": cfg.seed,
                "shard_size": cfg.shard_size, "batch_size": cfg.batch_size,
                "max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample,
                "temperature": cfg.temperature if cfg.do_sample else None,
                "top_p": cfg.top_p if cfg.do_sample else None,
                "dtype": str(params.dtype).removeprefix("torch.") if params is not None else None}
    asked = [(j["id"], j["text"], library.tasks[j["task"]][j["wording"]]) for j in jobs]
    return {"format": PLAN_FORMAT,
            "teacher": teacher_fingerprint(model_config) if model_config is not None else None,
            "settings": settings, "task_split_sha256": _sha_json(split.to_dict()),
            "jobs": len(jobs), "jobs_sha256": _sha_json(asked),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}}


def _check_folder(out: Path, record: dict, split: TaskSplit, overwrite: bool) -> Path | None:
    """Refuse (or with ``overwrite`` move aside) what ``out`` holds unless it was made with the
    same teacher, settings, split and jobs as ``record``; returns where old files went."""
    present = [p for p in out.iterdir() if p.name != LOCK_NAME]
    if not any(p.name in ("plan.json", "split.json") or p.name.startswith("shard-") for p in present):
        return None  # nothing of a behaviors run here
    plan_path, diffs = out / "plan.json", []
    if not plan_path.is_file():
        diffs = ["plan.json is missing (these files record no teacher or settings)"]
    else:
        try:
            old = read_plan(out)
        except ValueError as exc:
            old, diffs = {}, [str(exc)]
        if not diffs and old.get("format") != PLAN_FORMAT:
            diffs = ["plan.json is from an older mtbi-fast and records no teacher or settings"]
        elif not diffs:
            diffs = _diff(_flat(old), _flat(record))
    split_path = out / "split.json"
    if not diffs and split_path.is_file():
        try:
            same = json.loads(split_path.read_text()) == split.to_dict()
        except json.JSONDecodeError:
            same = False
        if not same:
            diffs = [f"{split_path} records a different task split"]
    if not diffs:
        return None
    if not overwrite:
        raise ValueError(f"{out} holds behaviors made differently: {'; '.join(diffs)}; use another "
                         "output folder, or --overwrite (overwrite=True) to move the old files aside")
    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        n += 1
        aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    aside.mkdir()
    # plan.json first: a move cut short leaves shards without a plan, which is refused again
    for p in sorted(present, key=lambda p: p.name != "plan.json"):
        shutil.move(str(p), str(aside / p.name))
    print(f"behaviors: {out} was made differently ({'; '.join(diffs)}); its files were moved to "
          f"{aside}")
    return aside


def _flat(record: dict) -> dict:
    """The fields of a plan.json that must match for a resume (cache_hidden may change)."""
    teacher = record.get("teacher")
    out = {f"teacher.{k}": (teacher or {}).get(k) for k in TEACHER_IDENTITY}
    out["teacher"] = "recorded" if teacher is not None else "not recorded"
    out.update({f"settings.{k}": v for k, v in (record.get("settings") or {}).items()})
    for key in ("task_split_sha256", "jobs", "jobs_sha256"):
        out[key] = record.get(key)
    return out


def _diff(old: dict, new: dict) -> list[str]:
    return [f"{k} (recorded {_short(old.get(k))}, now {_short(new.get(k))})"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _short(v) -> str:
    if isinstance(v, str) and v.startswith("sha256:"):
        v = v[:19]
    elif isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        v = v[:12]
    return json.dumps(v) if not isinstance(v, str) else repr(v)


def _sha_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _sha_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{Path(p).name}\0".encode())
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return h.hexdigest()


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


def _write_hidden(path: Path, states: dict[str, torch.Tensor]):
    """Teacher final hidden states at the response positions, bf16, one tensor per record."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in states.items()}, tmp)
    os.replace(tmp, path)


def derived_seed(seed: int, key: str) -> int:
    """A 64-bit seed of its own for ``key`` under the run seed ``seed`` (independent of what ran
    before: plans and sampling are the same whichever part runs first)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
