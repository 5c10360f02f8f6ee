"""``mtbi-fast behaviors``: the frozen LLM's answers to task prompts about each transcript.

For every utterance of a manifest, ``per_utterance`` (task, wording) pairs are drawn from the
split's training part (or a held-out part) with a generator seeded by the run seed and the
utterance id (``plan``). The LLM answers each prompt, the transcript in place of
``{transcript}``, through its chat template: batched generation with left padding, greedy or
seeded sampling, the longest prompts first. The prompt tokens are exactly what training uses:
``prefix_ids + transcript_ids + suffix_ids``.

The folder's format is ``behaviors_folder.BehaviorsFolder``'s, what ``plan.json`` records and
compares is ``provenance``'s. Parts are written whole and renamed, so a killed run resumes with
nothing duplicated; under a launcher rank r of W writes the parts k with k % W == r, and a part's
bytes depend on neither W nor what ran before; one run at a time holds the folder (``lock``).
The format, the batching, ranks, provenance and locks: docs/data.md#behaviors.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .attention import padded_attention
from .data import Utterance
from .behaviors_folder import INDEX_NAME, PLAN_NAME, SPLIT_NAME, BehaviorsFolder
from .io import atomic_write_text, derived_seed, move_aside
from .lock import LOCK_NAME, RANKS_LOCK, FolderLock, RanksLock, rank_lock_name
from .prompts import left_pad, template_halves
from .provenance import PLAN_FORMAT, plan_diffs, plan_record, read_plan
from .tasks import TaskLibrary, TaskSplit

PLAN_TIMEOUT_S = 600.0  # how long a rank > 0 waits for rank 0's plan.json
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
    part_size: int = 64             # records per part file
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
    this process writes parts ``k % world == rank`` (default: ``rank_world()``, from the
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
        record = plan_record(jobs, split, library, llm, cfg, model_config, BATCHING)
        if rank == 0:
            with contextlib.ExitStack() as moving:
                def before_move():  # ranks of another launch may still write the old files
                    if not ranks_held:
                        moving.enter_context(RanksLock(out, fcntl.LOCK_EX))

                replaced = _check_folder(out, record, split, overwrite, before_move)
                # plan.json first: a run killed before split.json is written still resumes
                atomic_write_text(out / PLAN_NAME, json.dumps(record, indent=2))
                split.save(out / SPLIT_NAME)
        else:
            _wait_for_plan(out, record, split, overwrite, plan_timeout, rank)
            held.enter_context(FolderLock(out, f"behaviors, rank {rank} of {world}", name=rank_lock_name(rank)))
            held.enter_context(RanksLock(out, fcntl.LOCK_SH))
            _check_folder(out, record, split, False)  # still the plan it waited for
        summary = _generate(jobs, library, llm, tokenizer, out, cfg, progress, rank, world)
        n_parts, folder = summary["parts"], BehaviorsFolder(out)
        if folder.all_parts_there(n_parts, cfg.cache_hidden):  # this rank finished last
            index = folder.write_index(n_parts)
            summary["index"] = str(out / INDEX_NAME)
            if progress and world > 1:
                print(f"behaviors (rank {rank} of {world}): all {n_parts} parts are there; wrote "
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


def rank_parts(n_parts: int, rank: int, world: int) -> list[int]:
    """The parts rank ``rank`` of ``world`` writes: ``k % world == rank``."""
    return list(range(rank, n_parts, world))


def batches(jobs: list[dict], library: TaskLibrary, tokenizer, batch_size: int) -> list[list[int]]:
    """The positions of ``jobs`` (one part) in batches of ``batch_size``: longest prompt first
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
    parts = [jobs[i:i + cfg.part_size] for i in range(0, len(jobs), cfg.part_size)]
    folder = BehaviorsFolder(out)
    mine = rank_parts(len(parts), rank, world)
    todo = [k for k in mine if not folder.part(k).exists()
            or (cfg.cache_hidden and not folder.part(k, "safetensors").exists())]
    n_mine = sum(len(parts[k]) for k in mine)
    t0, n_tokens, n_done = time.time(), 0, 0
    bar = tqdm(total=n_mine, initial=n_mine - sum(len(parts[k]) for k in todo),
               desc="behaviors" if world == 1 else f"behaviors {rank}/{world}", unit="prompt",
               disable=not progress)
    for k in todo:
        part, by_pos, hidden = parts[k], {}, {}
        for b, positions in enumerate(batches(part, library, tokenizer, cfg.batch_size)):
            batch = [part[i] for i in positions]
            # the seed key is the batch's position in the part (its first job's index)
            records = answer(batch, library, llm, tokenizer, cfg,
                             derived_seed(cfg.seed, f"{k}/{b * cfg.batch_size}"),
                             hidden=hidden if cfg.cache_hidden else None)
            by_pos.update(zip(positions, records))
            n_tokens += sum(len(r["response_ids"]) for r in records)
            n_done += len(batch)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{n_tokens / max(time.time() - t0, 1e-9):.0f}")
        if cfg.cache_hidden:
            _write_hidden(folder.part(k, "safetensors"), {j["id"]: hidden[j["id"]] for j in part})
        atomic_write_text(folder.part(k), "".join(
            json.dumps(by_pos[i], ensure_ascii=False) + "\n" for i in range(len(part))))
    bar.close()
    elapsed = time.time() - t0
    summary = {"prompts": len(jobs), "generated": n_done, "parts": len(parts),
               "new_tokens": n_tokens, "seconds": round(elapsed, 2),
               "tokens_per_s": round(n_tokens / elapsed, 1) if elapsed > 0 else None,
               "rank": rank, "world": world, "rank_parts": len(mine), "rank_prompts": n_mine}
    if progress and world == 1:
        print(f"behaviors: {n_done} generated now, {len(jobs)} in all, {n_tokens} tokens in "
              f"{elapsed:.1f} s ({summary['tokens_per_s']} tokens/s) -> {out}")
    elif progress:
        print(f"behaviors (rank {rank} of {world}): {n_done} generated now, {n_mine} of "
              f"{len(jobs)} prompts ({len(mine)} of {len(parts)} parts) are this rank's, "
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
        if (out / PLAN_NAME).is_file() and (out / SPLIT_NAME).is_file():
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
                f"rank {rank}: {out / PLAN_NAME} (rank 0 writes it) did not appear within "
                f"{timeout:g} s{why}; did rank 0 fail? Its error comes first")
        time.sleep(min(0.2, max(timeout / 10, 0.01)))


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


def _check_folder(out: Path, record: dict, split: TaskSplit, overwrite: bool,
                  before_move=None) -> Path | None:
    """Refuse (or with ``overwrite`` move aside) what ``out`` holds unless it was made with the
    same teacher, settings, split and jobs as ``record``; returns where old files went.
    ``before_move()`` runs before anything is moved (rank 0: no other launch's ranks write)."""
    if not out.is_dir():
        return None
    if not BehaviorsFolder(out).holds_behaviors():
        return None  # nothing of a behaviors run here
    plan_path, diffs = out / PLAN_NAME, []
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
            diffs = plan_diffs(old, record)
    split_path = out / SPLIT_NAME
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
    # plan.json first: a move cut short leaves parts without a plan, which is refused again
    aside = move_aside(out, first=PLAN_NAME,
                       keep=lambda p: p.name == LOCK_NAME or p.name.startswith(LOCK_NAME + "."))
    print(f"behaviors: {out} was made differently ({'; '.join(diffs)}); its files were moved to "
          f"{aside}")
    return aside


def _write_hidden(path: Path, states: dict[str, torch.Tensor]):
    """Teacher final hidden states at the response positions, bf16, one tensor per record."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in states.items()}, tmp)
    os.replace(tmp, path)


