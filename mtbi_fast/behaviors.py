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
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .data import Utterance
from .io import atomic_write_text
from .tasks import PLACEHOLDER, TaskLibrary, TaskSplit


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
    if cfg.split == "train":
        pool = [(t, w) for t, ws in sorted(split.train.items()) for w in ws]
    elif cfg.split == "heldout_wording":
        pool = [(t, w) for t, ws in sorted(split.heldout_wordings.items()) for w in ws]
    elif cfg.split == "heldout_task":
        pool = [(t, w) for t in split.heldout_tasks for w in range(len(library.tasks[t]))]
    else:
        raise ValueError(f"split must be train, heldout_wording or heldout_task, got {cfg.split!r}")
    if cfg.tasks is not None:
        pool = [(t, w) for t, w in pool if t in cfg.tasks]
        if not pool:
            raise ValueError(f"no {cfg.split} prompts of tasks {list(cfg.tasks)} in the split")
    jobs = []
    for u in sorted(utterances, key=lambda u: u.id):
        rng = random.Random(_seed(cfg.seed, u.id))
        for task, wording in rng.sample(pool, min(cfg.per_utterance, len(pool))):
            jobs.append({"id": f"{u.id}/{task}/{wording}", "utt_id": u.id, "task": task,
                         "wording": wording, "split": cfg.split, "text": u.text})
    return jobs


def generate_behaviors(utterances: list[Utterance], library: TaskLibrary, llm, tokenizer,
                       out_dir: str | os.PathLike, cfg: BehaviorConfig, *,
                       split: TaskSplit | None = None, progress: bool = True) -> dict:
    """Run (or resume) behavior generation into ``out_dir``; returns a summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = split or library.split()
    split_path = out / "split.json"
    if split_path.exists() and json.loads(split_path.read_text()) != split.to_dict():
        raise ValueError(f"{split_path} records a different task split; use another output folder")
    split.save(split_path)
    jobs = plan(utterances, split, library, cfg)
    atomic_write_text(out / "plan.json", json.dumps({"config": {k: (list(v) if isinstance(v, tuple) else v)
                                                       for k, v in cfg.__dict__.items()},
                                            "jobs": len(jobs)}, indent=2))
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
            records += _answer(batch, library, llm, tokenizer, cfg, _seed(cfg.seed, f"{k}/{b}"),
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


def template_halves(tokenizer, prompt: str, marker: str = PLACEHOLDER) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted ``prompt`` before and after ``marker``."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = f"User: {prompt}\nAssistant:"
    if marker not in text:
        raise ValueError(f"the prompt has no {marker} to put the utterance in: {prompt!r}")
    a, b = text.split(marker, 1)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(a), enc(b)


def _answer(batch, library, llm, tokenizer, cfg, seed, hidden: dict | None = None) -> list[dict]:
    """The LLM's answers to a batch of jobs. With ``hidden`` (a dict), also the final hidden
    states that predicted each response token, taken from the generation itself (no second pass):
    ``hidden[id]`` [len(response_ids), H]."""
    prompts, inputs = [], []
    for job in batch:
        wording = library.tasks[job["task"]][job["wording"]]
        prefix, suffix = template_halves(tokenizer, wording)
        transcript_ids = tokenizer(job["text"], add_special_tokens=False)["input_ids"]
        prompts.append((wording.replace(PLACEHOLDER, job["text"]), prefix, transcript_ids, suffix))
        inputs.append(prefix + transcript_ids + suffix)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, inputs))
    device = llm.get_input_embeddings().weight.device
    ids = torch.full((len(inputs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    for i, x in enumerate(inputs):  # left padding
        ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    kw = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, pad_token_id=pad)
    if cfg.do_sample:
        kw.update(temperature=cfg.temperature, top_p=cfg.top_p)
    from .hub import padded_attention

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
    if hidden is not None:  # step j's final state predicted response token j
        states = torch.stack(steps, 1)
    eos = tokenizer.eos_token_id
    records = []
    for i, (job, (prompt, prefix, transcript_ids, suffix), row) in enumerate(
            zip(batch, prompts, out[:, width:].tolist())):
        resp = []
        for tok in row:
            resp.append(tok)
            if tok == eos:
                break
        while resp and resp[-1] == pad and pad != eos:
            resp.pop()
        records.append({"id": job["id"], "utt_id": job["utt_id"], "task": job["task"],
                        "wording": job["wording"], "split": job["split"], "prompt": prompt,
                        "prefix_ids": prefix, "transcript_ids": transcript_ids, "suffix_ids": suffix,
                        "response": tokenizer.decode(resp, skip_special_tokens=True).strip(),
                        "response_ids": resp})
        if hidden is not None:
            hidden[job["id"]] = states[i, :len(resp)].cpu()
    return records


def _write_hidden(path: Path, states: dict[str, torch.Tensor]):
    """Teacher final hidden states at the response positions, bf16, one tensor per record."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in states.items()}, tmp)
    os.replace(tmp, path)


def _seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
