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

Batches: a shard's jobs are ordered by prompt length in tokens, longest first (a stable sort: ties
keep plan order; the longest batch runs first, so a batch too big for memory fails at once), and
cut into ``batch_size`` batches, so left padding wastes little; the records are written back in
plan order. Batch ``b`` of shard ``k`` samples with a seed derived from the run seed and
``(k, b)``, so a shard's bytes depend on the plan and settings alone.

Ranks: under a launcher (``torchrun --nproc_per_node N``, ``deepspeed --num_gpus N``: the
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` variables; ``rank_world``) rank ``r`` of ``W`` writes
the shards ``k`` with ``k % W == r``, and a shard's bytes do not depend on ``W``: any world size
writes the files a single process writes. No process group: the ranks meet through the folder
(a shared file system across machines). Rank 0 checks the folder and writes ``plan.json`` and
``split.json``; the other ranks wait for them (``plan_timeout``) and refuse a plan that differs
from their own. A killed rank's rerun (or the whole launch's) redoes only its missing shards.
A world of one (no ``RANK``, or ``WORLD_SIZE=1``) is the plain single-process run.

``index.json``: written once every shard is present (by whichever rank sees that last, or by the
single process; identical content, so two ranks writing it at once is harmless): each shard file
with its record count and sha256, the total records, and whether hidden states are present.
``read_behaviors`` checks a folder's shard names and record counts against it when it is there
(older folders have none).

Provenance (docs/data.md): ``plan.json`` records the teacher LLM (``teacher_fingerprint``: its
source plus sha256 fingerprints of its config, tokenizer and weights), the generation settings,
the task split and the jobs (utterance ids and texts, prompt wordings). A rerun into a folder made
with anything different is refused with the differing fields listed; with ``overwrite=True`` the
old files are moved aside to ``<folder>.replaced-<time>`` first. A rerun with identical settings
resumes. Only ``cache_hidden`` may change between runs (it adds the missing hidden-state shards,
which are the same with or without it). ``check_teacher`` tells the trainer whether a folder was
made by the LLM its model config describes.

One run at a time: the single process, or rank 0, holds ``.lock`` (``FolderLock``); rank ``r > 0``
holds ``.lock.rank-NNNNN`` (``r``) and a shared lock on ``.lock.ranks`` once the plan is there. A
second run into the folder is refused naming the holder: its rank 0 (or single process) at
``.lock``, its rank ``r`` at ``.lock.rank-r``; a single process while ranks of a launch still
write (``.lock.ranks``), and ``overwrite`` before it moves anything while they do.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .attention import padded_attention
from .data import Utterance
from .hub import ASSETS, TINY_LLM, hub_snapshot, parse_source, source_config
from .io import atomic_write_text, derived_seed, move_aside, sha256_and_lines, sha256_files
from .lock import LOCK_NAME, RANKS_LOCK, FolderLock, RanksLock, rank_lock_name
from .prompts import left_pad, template_halves
from .tasks import TaskLibrary, TaskSplit

PLAN_TIMEOUT_S = 600.0  # how long a rank > 0 waits for rank 0's plan.json
INDEX_NAME = "index.json"
INDEX_FORMAT = 1
BATCHING = "prompt_length"  # plan.json settings.batching: batches cut by prompt length (module docstring)


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


def task_pool(library: TaskLibrary, split: TaskSplit, kind: str,
              tasks: tuple | None = None) -> list[tuple[str, int]]:
    """The (task, wording) pairs of part ``kind`` of ``split`` (``TaskLibrary.pool``), only those
    of ``tasks`` when given. A task the library lacks, or one with no prompt in that part, is
    refused by name, never dropped in silence."""
    pool = library.pool(split, kind)
    if tasks is None:
        return pool
    unknown = [t for t in tasks if t not in library.tasks]
    if unknown or not tasks:
        what = f"unknown task {unknown[0]!r}" if unknown else "no task named"
        raise ValueError(f"{what} (the library's tasks: {', '.join(sorted(library.tasks))})")
    present = {t for t, _ in pool}
    absent = [t for t in tasks if t not in present]
    if absent:
        raise ValueError(f"no {kind} prompts of tasks {absent} in the split "
                         f"(its tasks: {', '.join(sorted(present))})")
    return [(t, w) for t, w in pool if t in tasks]


def plan(utterances: list[Utterance], split: TaskSplit, library: TaskLibrary,
         cfg: BehaviorConfig) -> list[dict]:
    """The (utterance, task, wording) jobs, in a fixed order."""
    pool = task_pool(library, split, cfg.split, cfg.tasks)
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
                       model_config: dict | None = None, overwrite: bool = False,
                       rank: int | None = None, world: int | None = None,
                       plan_timeout: float = PLAN_TIMEOUT_S) -> dict:
    """Run (or resume) behavior generation into ``out_dir``; returns a summary.

    ``model_config``: the model section that ``llm`` and ``tokenizer`` were loaded from (its
    ``llm`` source and ``init_seed``), recorded as the teacher's fingerprint; without it the
    folder records no teacher and ``check_teacher`` refuses it. A folder made with other settings
    is refused, or with ``overwrite`` moved aside first (module docstring). ``rank`` of ``world``:
    this process writes shards ``k % world == rank`` (default: ``rank_world()``, from the
    launcher's environment); a rank other than 0 waits up to ``plan_timeout`` seconds for rank 0's
    ``plan.json``."""
    out = Path(out_dir)
    split = split or library.split()
    if rank is None and world is None:
        rank, world, _ = rank_world()
    elif rank is None or world is None:
        raise ValueError("give both rank and world, or neither (then RANK and WORLD_SIZE are read)")
    _check_rank(rank, world)
    replaced = None
    with contextlib.ExitStack() as held:
        if rank == 0:
            held.enter_context(FolderLock(out, "behaviors" if world == 1
                                          else f"behaviors, rank 0 of {world}"))
            ranks_held = world == 1 and (out / RANKS_LOCK).exists()
            if ranks_held:  # no ranks of a launch write meanwhile
                held.enter_context(RanksLock(out, fcntl.LOCK_EX))
        jobs = plan(utterances, split, library, cfg)
        record = _provenance(jobs, split, library, llm, cfg, model_config)
        if rank == 0:
            with contextlib.ExitStack() as moving:
                def before_move():  # ranks of another launch may still write the old files
                    if not ranks_held:
                        moving.enter_context(RanksLock(out, fcntl.LOCK_EX))

                replaced = _check_folder(out, record, split, overwrite, before_move)
                # plan.json first: a run killed before split.json is written still resumes
                atomic_write_text(out / "plan.json", json.dumps(record, indent=2))
                split.save(out / "split.json")
        else:
            _wait_for_plan(out, record, split, overwrite, plan_timeout, rank)
            held.enter_context(FolderLock(out, f"behaviors, rank {rank} of {world}", name=rank_lock_name(rank)))
            held.enter_context(RanksLock(out, fcntl.LOCK_SH))
            _check_folder(out, record, split, False)  # still the plan it waited for
        summary = _generate(jobs, library, llm, tokenizer, out, cfg, progress, rank, world)
        n_shards = summary["shards"]
        if _all_shards_there(out, n_shards, cfg.cache_hidden):  # this rank finished last
            index = write_index(out, n_shards)
            summary["index"] = str(out / INDEX_NAME)
            if progress and world > 1:
                print(f"behaviors (rank {rank} of {world}): all {n_shards} shards are there; wrote "
                      f"{out / INDEX_NAME} ({index['records']} records)")
    if replaced is not None:
        summary["replaced"] = str(replaced)
    return summary


def rank_world(environ=None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from a launcher's ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK`` (torchrun and the deepspeed launcher set all three); ``(0, 1, 0)`` without
    ``RANK``. ``LOCAL_RANK`` defaults to ``RANK`` (one machine)."""
    env = os.environ if environ is None else environ
    if env.get("RANK", "") == "":
        return 0, 1, 0
    try:
        rank = int(env["RANK"])
        world = int(env.get("WORLD_SIZE", ""))
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError(f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, "
                         f"LOCAL_RANK={env.get('LOCAL_RANK')!r}: whole numbers expected (set by "
                         "torchrun or deepspeed)") from None
    _check_rank(rank, world)
    return rank, world, local


def _check_rank(rank: int, world: int) -> None:
    if not (isinstance(rank, int) and isinstance(world, int) and world >= 1 and 0 <= rank < world):
        raise ValueError(f"rank {rank!r} of world {world!r}: need 0 <= rank < world")


def rank_shards(n_shards: int, rank: int, world: int) -> list[int]:
    """The shards rank ``rank`` of ``world`` writes: ``k % world == rank``."""
    return list(range(rank, n_shards, world))


def shard_name(k: int, ext: str = "jsonl") -> str:
    return f"shard-{k:05d}.{ext}"


def batches(jobs: list[dict], library: TaskLibrary, tokenizer, batch_size: int) -> list[list[int]]:
    """The positions of ``jobs`` (one shard) in batches of ``batch_size``: longest prompt first
    (tokens, as ``answer`` builds them), equal lengths in plan order."""
    lengths = prompt_lengths(jobs, library, tokenizer)
    order = sorted(range(len(jobs)), key=lambda i: -lengths[i])
    return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]


def prompt_lengths(jobs: list[dict], library: TaskLibrary, tokenizer) -> list[int]:
    """Each job's prompt length in tokens: ``prefix_ids + transcript_ids + suffix_ids``."""
    halves, out = {}, []
    for j in jobs:
        key = (j["task"], j["wording"])
        if key not in halves:
            prefix, suffix = template_halves(tokenizer, library.tasks[j["task"]][j["wording"]])
            halves[key] = len(prefix) + len(suffix)
        out.append(halves[key] + len(tokenizer(j["text"], add_special_tokens=False)["input_ids"]))
    return out


def _generate(jobs, library, llm, tokenizer, out: Path, cfg: BehaviorConfig, progress: bool,
              rank: int = 0, world: int = 1) -> dict:
    shards = [jobs[i:i + cfg.shard_size] for i in range(0, len(jobs), cfg.shard_size)]
    mine = rank_shards(len(shards), rank, world)
    todo = [k for k in mine if not (out / shard_name(k)).exists()
            or (cfg.cache_hidden and not (out / shard_name(k, "safetensors")).exists())]
    n_mine = sum(len(shards[k]) for k in mine)
    t0, n_tokens, n_done = time.time(), 0, 0
    bar = tqdm(total=n_mine, initial=n_mine - sum(len(shards[k]) for k in todo),
               desc="behaviors" if world == 1 else f"behaviors {rank}/{world}", unit="prompt",
               disable=not progress)
    for k in todo:
        shard, by_pos, hidden = shards[k], {}, {}
        for b, positions in enumerate(batches(shard, library, tokenizer, cfg.batch_size)):
            batch = [shard[i] for i in positions]
            # the seed key is the batch's position in the shard (its first job's index)
            records = answer(batch, library, llm, tokenizer, cfg,
                             derived_seed(cfg.seed, f"{k}/{b * cfg.batch_size}"),
                             hidden=hidden if cfg.cache_hidden else None)
            by_pos.update(zip(positions, records))
            n_tokens += sum(len(r["response_ids"]) for r in records)
            n_done += len(batch)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{n_tokens / max(time.time() - t0, 1e-9):.0f}")
        if cfg.cache_hidden:
            _write_hidden(out / shard_name(k, "safetensors"), {j["id"]: hidden[j["id"]] for j in shard})
        atomic_write_text(out / shard_name(k), "".join(
            json.dumps(by_pos[i], ensure_ascii=False) + "\n" for i in range(len(shard))))
    bar.close()
    elapsed = time.time() - t0
    summary = {"prompts": len(jobs), "generated": n_done, "shards": len(shards),
               "new_tokens": n_tokens, "seconds": round(elapsed, 2),
               "tokens_per_s": round(n_tokens / elapsed, 1) if elapsed > 0 else None,
               "rank": rank, "world": world, "rank_shards": len(mine), "rank_prompts": n_mine}
    if progress and world == 1:
        print(f"behaviors: {n_done} generated now, {len(jobs)} in all, {n_tokens} tokens in "
              f"{elapsed:.1f} s ({summary['tokens_per_s']} tokens/s) -> {out}")
    elif progress:
        print(f"behaviors (rank {rank} of {world}): {n_done} generated now, {n_mine} of "
              f"{len(jobs)} prompts ({len(mine)} of {len(shards)} shards) are this rank's, "
              f"{n_tokens} tokens in {elapsed:.1f} s ({summary['tokens_per_s']} tokens/s) -> {out}")
    return summary


# ---------------------------------------------------------------------------------------------
# ranks: the plan they wait for, their locks, the index at the end

class PlanTimeoutError(TimeoutError, ValueError):
    """Rank 0's plan.json did not appear in time (a ``ValueError`` too: the command line prints
    it as one line)."""


def _wait_for_plan(out: Path, record: dict, split: TaskSplit, overwrite: bool, timeout: float,
                   rank: int) -> None:
    """Wait for rank 0's ``plan.json`` and ``split.json`` and check that they are this rank's;
    a plan that differs is refused at once, or with ``overwrite`` waited out (rank 0 moves it
    aside)."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        if (out / "plan.json").is_file() and (out / "split.json").is_file():
            try:
                _check_folder(out, record, split, False)
                return
            except (ValueError, OSError) as exc:  # OSError: rank 0 is moving the files
                if not overwrite and not isinstance(exc, OSError):
                    raise
                last = exc
        if time.monotonic() >= deadline:
            why = f" (last seen: {last})" if last is not None else ""
            raise PlanTimeoutError(
                f"rank {rank}: {out / 'plan.json'} (rank 0 writes it) did not appear within "
                f"{timeout:g} s{why}; did rank 0 fail? Its error comes first")
        time.sleep(min(0.2, max(timeout / 10, 0.01)))


def _all_shards_there(out: Path, n_shards: int, hidden: bool) -> bool:
    exts = ("jsonl", "safetensors") if hidden else ("jsonl",)
    return all((out / shard_name(k, ext)).exists() for k in range(n_shards) for ext in exts)


def write_index(out_dir: str | os.PathLike, n_shards: int) -> dict:
    """Write ``index.json`` for a folder whose ``n_shards`` shards are all there (module
    docstring), atomically; returns it. Hidden states count when every shard has them."""
    out = Path(out_dir)
    hidden = all((out / shard_name(k, "safetensors")).exists() for k in range(n_shards))
    files, total = [], 0
    for k in range(n_shards):
        sha, lines = sha256_and_lines(out / shard_name(k))
        files.append({"name": shard_name(k), "records": lines, "sha256": sha})
        total += lines
        if hidden:
            path = out / shard_name(k, "safetensors")
            files.append({"name": path.name, "records": _safetensors_count(path),
                          "sha256": sha256_and_lines(path)[0]})
    index = {"format": INDEX_FORMAT, "shards": n_shards, "records": total, "hidden_states": hidden,
             "files": files}
    atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    return index


def _safetensors_count(path: Path) -> int:
    """Tensors in a safetensors file, from its header."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return sum(k != "__metadata__" for k in header)


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


ID_FIELDS = ("prefix_ids", "transcript_ids", "suffix_ids", "response_ids")


def check_record_ids(record: dict, vocab: int, where: str) -> None:
    """Every token id of a behavior record is an int in ``[0, vocab)`` (a negative id would be
    read as a speech-frame reference, one past the table fails only in the step): else a
    ValueError naming ``where`` (file and line, or shard and cut), the record and the field."""
    for field in ID_FIELDS:
        ids = record.get(field)
        if not isinstance(ids, list):
            raise ValueError(f"{where}: record {record.get('id')!r}: {field} must be a list of token ids, "
                             f"got {type(ids).__name__}")
        for k, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"{where}: record {record.get('id')!r}: {field}[{k}] = {t!r} is not a "
                                 f"token id of the LLM's vocabulary [0, {vocab})")


def read_behaviors(out_dir: str | os.PathLike, vocab: int | None = None) -> list[dict]:
    """All records of a behaviors folder, in plan order. With an ``index.json`` (module
    docstring) the shard names and record counts must be the ones it lists. With ``vocab``, every
    token id is checked to be in ``[0, vocab)`` (``check_record_ids``, naming file and line)."""
    out = Path(out_dir)
    files = sorted(out.glob("shard-*.jsonl"))
    listed = _indexed_shards(out, files)
    if not files:
        raise FileNotFoundError(f"no behavior shards in {out} (run `mtbi-fast behaviors`)")
    records = []
    for f in files:
        n = len(records)
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{f}:{lineno}: not valid JSON ({exc.msg})") from None
                if vocab is not None:
                    if not isinstance(record, dict):
                        raise ValueError(f"{f}:{lineno}: a behavior record is a JSON object")
                    check_record_ids(record, vocab, f"{f}:{lineno}")
                records.append(record)
        if listed is not None and len(records) - n != listed[f.name]:
            raise ValueError(f"{f} has {len(records) - n} records, {out / INDEX_NAME} lists "
                             f"{listed[f.name]}: the shard changed after the index was written")
    return records


def _indexed_shards(out: Path, files: list[Path]) -> dict | None:
    """{shard name: records} from ``index.json`` (None without one), after checking that the
    folder's ``shard-*.jsonl`` are exactly the ones it lists."""
    path = out / INDEX_NAME
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
        listed = {f["name"]: f["records"] for f in index["files"] if f["name"].endswith(".jsonl")}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a behaviors index ({exc})") from None
    present = {f.name for f in files}
    missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
    if missing:
        raise FileNotFoundError(
            f"{out / missing[0]} is missing: {path} lists {len(listed)} shards and "
            f"{len(missing)} of them are not there ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); rerun `mtbi-fast behaviors` into {out}")
    if extra:
        raise ValueError(f"{out / extra[0]} is not in {path} ({len(extra)} shard file"
                         f"{'s' if len(extra) > 1 else ''} it does not list: "
                         f"{', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''})")
    return listed


# ---------------------------------------------------------------------------------------------
# provenance

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
                "config_sha256": _sha_json({**TINY_LLM, **(value or {})}),
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
           "config_sha256": _sha_json(config),
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
                "dtype": str(params.dtype).removeprefix("torch.") if params is not None else None,
                "batching": BATCHING}
    asked = [(j["id"], j["text"], library.tasks[j["task"]][j["wording"]]) for j in jobs]
    return {"format": PLAN_FORMAT,
            "teacher": teacher_fingerprint(model_config) if model_config is not None else None,
            "settings": settings, "task_split_sha256": _sha_json(split.to_dict()),
            "jobs": len(jobs), "jobs_sha256": _sha_json(asked),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}}


def _check_folder(out: Path, record: dict, split: TaskSplit, overwrite: bool,
                  before_move=None) -> Path | None:
    """Refuse (or with ``overwrite`` move aside) what ``out`` holds unless it was made with the
    same teacher, settings, split and jobs as ``record``; returns where old files went.
    ``before_move()`` runs before anything is moved (rank 0: no other launch's ranks write)."""
    if not out.is_dir():
        return None
    present = [p for p in out.iterdir() if not (p.name == LOCK_NAME or p.name.startswith(LOCK_NAME + "."))]
    if not any(p.name in ("plan.json", "split.json", INDEX_NAME) or p.name.startswith("shard-")
               for p in present):
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
    if before_move is not None:
        before_move()
    # plan.json first: a move cut short leaves shards without a plan, which is refused again
    aside = move_aside(out, first="plan.json",
                       keep=lambda p: p.name == LOCK_NAME or p.name.startswith(LOCK_NAME + "."))
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


