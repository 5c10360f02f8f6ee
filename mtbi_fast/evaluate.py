"""``mtbi-fast eval``: does the aligned model follow prompts and tasks it never trained on?

On held-out utterances, for three splits of the recorded task split (seen tasks with seen
wordings, seen tasks with held-out wordings, held-out tasks), the SLLM answers from the speech and
the teacher (the frozen LLM, LoRA off) from the transcript; the SLLM's answer is scored against
the teacher's: ROUGE-L (rouge-score's, stemmed), chrF (sacrebleu) and semantic
similarity (cosine of all-MiniLM-L6-v2 sentence embeddings, from ``mtbi-fast models fetch
minilm``); on the repeat task also the word error rate against the transcript (jiwer; with
mtbi-fast's normalization and with Whisper's English normalizer, ``whisper_wer``); and the
imitation KL on the teacher's answers (teacher-forced, speech only), also with each clip swapped
for another utterance's ("KL, other speech": a model that uses what is said does worse with the
wrong clip; one that has only learned what speech in general sounds like does not). Reference
rows in the same table: the untrained SLLM (lower bound) and the teacher itself (upper bound:
agreement 1 by construction, its own repeat WER).

Every model is also compared with the lower bound (``baseline``, the untrained SLLM) prompt by
prompt: the mean difference per split and metric with a 95% paired-bootstrap confidence interval,
so that a difference can be told from the noise of a few dozen prompts.

Writes ``eval.json``, ``eval.md`` (a summary table per model and split, the differences from the
baseline, then per task) and ``eval.png`` (a bar chart).
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from .audio import load_audio
from .behaviors import BehaviorConfig, answer, job
from .data import Utterance
from .io import atomic_write_text, derived_seed
from .loss import imitation_loss
from .packing import Example, Speech, Text, pack
from .prompts import SPEECH
from .tasks import SPLITS, TaskLibrary, TaskSplit

SPLIT_NAMES = {"train": "seen task, seen wording", "heldout_wording": "seen task, new wording",
               "heldout_task": "new task"}
METRICS = ("rouge_l", "chrf", "similarity", "kl", "kl_other", "wer", "wer_whisper")
DELTA_METRICS = ("rouge_l", "chrf", "similarity", "kl")  # compared with the baseline, per prompt


def rouge_l(hyp: str, ref: str) -> float:
    """ROUGE-L F1 as ``rouge-score`` computes it (the package of Google Research's reference
    implementation): lower-cased alphanumeric tokens, Porter-stemmed. Two empty texts agree (1.0)."""
    if not _rouge_tokens(hyp) and not _rouge_tokens(ref):
        return 1.0
    return float(_rouge_scorer().score(ref, hyp)["rougeL"].fmeasure)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _rouge_tokens(text: str) -> list[str]:
    from rouge_score import tokenize

    return tokenize.tokenize(text, None)


@functools.lru_cache(maxsize=1)
def whisper_normalizer():
    """Whisper's English text normalizer (transformers' ``EnglishTextNormalizer``: numbers spelled
    as digits, contractions and fillers, British spellings to American from the
    ``whisper-normalizer`` package's mapping), as Whisper's and most speech-LLM papers' WERs use."""
    import importlib.resources

    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    mapping = json.loads(importlib.resources.files("whisper_normalizer").joinpath(
        "normalizers", "english.json").read_text(encoding="utf-8"))
    return EnglishTextNormalizer(mapping)


def whisper_wer(transcripts: str | list[str], answers: str | list[str]) -> float | None:
    """The word error rate with both sides through ``whisper_normalizer``, corpus-level over all
    pairs; a pair whose transcript normalizes to nothing is left out (Whisper's evaluation does
    the same), None when every one is. An empty answer misses every word."""
    import jiwer

    if isinstance(transcripts, str):
        transcripts, answers = [transcripts], [answers]
    norm = whisper_normalizer()
    pairs = [(norm(t), norm(a)) for t, a in zip(transcripts, answers)]
    pairs = [(t, a or "-") for t, a in pairs if t.strip()]
    if not pairs:
        return None
    return float(jiwer.wer([t for t, _ in pairs], [a for _, a in pairs]))


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalized), loaded offline."""

    def __init__(self, folder: str | Path):
        import transformers

        self.tok = transformers.AutoTokenizer.from_pretrained(folder)
        self.model = transformers.AutoModel.from_pretrained(folder).eval()

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        enc = self.tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        h = self.model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def plan_eval(utts: list[Utterance], library: TaskLibrary, split: TaskSplit, per_split: int,
              seed: int) -> list[dict]:
    """Per utterance (in id order) and part of the split (``SPLITS``), ``per_split`` seeded
    (task, wording) jobs (``behaviors.job`` with the ``audio``); on seen tasks a repeat prompt
    on top, to always measure WER."""
    jobs = []
    pools = {kind: library.pool(split, kind) for kind in SPLITS}
    for u in sorted(utts, key=lambda u: u.id):
        for kind in SPLITS:
            rng = random.Random(derived_seed(seed, f"eval/{kind}/{u.id}"))
            pool = pools[kind]
            pool_r = [p for p in pool if p[0] == "repeat"]
            if pool_r and kind == "train":  # a repeat prompt on top, to always measure WER
                rest = [p for p in pool if p[0] != "repeat"]
                picks = rng.sample(rest, min(per_split, len(rest))) + rng.sample(pool_r, 1)
            else:
                picks = rng.sample(pool, min(per_split, len(pool)))
            for task, wording in picks:
                jobs.append({**job(u, task, wording, kind), "audio": u.audio})
    return jobs


def evaluate(models: dict, utts: list[Utterance], library: TaskLibrary, split: TaskSplit,
             out_dir: str | Path, *, per_split: int = 2, max_new_tokens: int = 48, seed: int = 0,
             embedder: Embedder | None = None, progress: bool = True, batch_size: int = 8,
             baseline: str | None = "untrained", decoding: dict | None = None) -> dict:
    """Score each SLLM in ``models`` ({"name": SpeechLLM}) against the teacher (the first model's
    LLM with adapters off), and each against ``models[baseline]`` when there is one (paired
    bootstrap). ``decoding`` (``model.decoding_kwargs``) shapes the SLLMs' free-running answers;
    the teacher's stay greedy, as its training behaviors are. Returns the results dict written to
    ``eval.json``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    first = next(iter(models.values()))
    jobs = plan_eval(utts, library, split, per_split, seed)
    t0 = time.time()
    teacher, teacher_hidden = teacher_answers(first, jobs, library, max_new_tokens, batch_size, seed)
    answers = {"teacher": [r["response"] for r in teacher]}
    kls, kls_other = {}, {}
    others = other_speech(jobs)
    for name, model in models.items():
        answers[name] = model_answers(model, jobs, library, max_new_tokens, batch_size,
                                      desc=f"eval {name}", progress=progress, decoding=decoding)
        kls[name] = imitation_kl(model, jobs, teacher, teacher_hidden)
        if others is not None:  # does the model listen? the same prompts with another clip's speech
            kls_other[name] = imitation_kl(model, others, teacher, teacher_hidden)
    rows = score_rows(jobs, answers, kls, kls_other, embedder)
    summary = _summarize(rows)
    repeat = repeat_breakdown(rows, {j["utt_id"]: j["text"] for j in jobs})
    deltas = paired_deltas(rows, baseline, seed=seed) if baseline in models else {}
    result = {"jobs": len(jobs), "seconds": round(time.time() - t0, 1), "summary": summary,
              "deltas": deltas, "baseline": baseline if deltas else None, "rows": rows,
              "split": split.to_dict(), "decoding": dict(decoding or {}), "repeat": repeat}
    _write_results(Path(out_dir), result)
    return result


def teacher_answers(model, jobs: list[dict], library: TaskLibrary, max_new_tokens: int,
                    batch_size: int, seed: int) -> tuple[list[dict], dict]:
    """The teacher's answer records to ``jobs`` (``behaviors.answer``: the LLM of ``model`` with
    its LoRA adapters off, from the transcripts) and the final hidden states that chose them."""
    cfg = BehaviorConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    records, hidden = [], {}
    off = model.llm.disable_adapter() if model.config.lora else contextlib.nullcontext()
    with off:
        for b in range(0, len(jobs), cfg.batch_size):
            records += answer(jobs[b:b + cfg.batch_size], library, model.llm, model.tokenizer, cfg,
                              derived_seed(seed, f"teacher/{b}"), hidden=hidden)
    return records, hidden


def model_answers(model, jobs: list[dict], library: TaskLibrary, max_new_tokens: int,
                  batch_size: int, *, desc: str = "eval", progress: bool = True,
                  decoding: dict | None = None) -> list[str]:
    """The SLLM's answers to ``jobs``, from their speech (``{speech}`` in place of the
    transcript), ``batch_size`` prompts decoded together; greedy unless ``decoding``
    (``model.decoding_kwargs``) says otherwise."""
    model.eval()
    outs = []
    bar = tqdm(total=len(jobs), desc=desc, unit="prompt", disable=not progress)
    for b in range(0, len(jobs), batch_size):
        group = jobs[b:b + batch_size]
        prompts = [library.prompt(j["task"], j["wording"], SPEECH) for j in group]
        outs += [a.strip() for a in model.generate_batch([j["audio"] for j in group], prompts,
                                                         max_new_tokens=max_new_tokens,
                                                         **(decoding or {}))]
        bar.update(len(group))
    bar.close()
    return outs


def score_rows(jobs: list[dict], answers: dict, kls: dict, kls_other: dict,
               embedder: Embedder | None = None) -> list[dict]:
    """One row per job and model (``answers``: {model: [answer per job]}, the teacher's under
    "teacher"): agreement with the teacher's answer (ROUGE-L, chrF, similarity with an
    ``embedder``), the repeat task's WER, and the imitation KLs (``kls``, ``kls_other``: {model:
    [KL or None per job]})."""
    import sacrebleu

    emb = {name: embedder(outs) for name, outs in answers.items()} if embedder is not None else {}
    rows = []
    for i, j in enumerate(jobs):
        ref = answers["teacher"][i]
        for name, outs in answers.items():
            hyp = outs[i]
            row = {"model": name, "split": j["split"], "task": j["task"], "id": j["id"],
                   "answer": hyp, "teacher": ref,
                   "rouge_l": rouge_l(hyp, ref),
                   "chrf": sacrebleu.sentence_chrf(hyp, [ref]).score / 100.0}
            if embedder is not None:
                row["similarity"] = float(emb[name][i] @ emb["teacher"][i])
            if j["task"] == "repeat":
                row["wer"] = repeat_wer(j["text"], hyp)
                wer = whisper_wer(j["text"], hyp)
                if wer is not None:
                    row["wer_whisper"] = wer
            if name in kls and kls[name][i] is not None:  # None: an empty teacher answer
                row["kl"] = kls[name][i]
            if name in kls_other and kls_other[name][i] is not None:
                row["kl_other"] = kls_other[name][i]
            rows.append(row)
    return rows


def imitation_kl(model, jobs, teacher_records, teacher_hidden: dict | None = None,
                 batch_size: int = 8) -> list[float | None]:
    """Per-prompt imitation KL of the SLLM (speech only) on the teacher's answers, packed
    ``batch_size`` prompts at a time (loss rows come back in input order). ``teacher_hidden``:
    the teacher's states at the response positions by job id (else a teacher pass computes them).
    An empty teacher answer has no position to compare: its KL is None (the row gets no "kl" and
    the means and paired differences leave it out), never the NaN mean of nothing."""
    out: list[float | None] = [None] * len(jobs)
    scored = [i for i, r in enumerate(teacher_records[:len(jobs)]) if r["response_ids"]]
    head = model.llm.get_output_embeddings()
    with torch.no_grad():
        for b in range(0, len(scored), batch_size):
            index = scored[b:b + batch_size]
            group = [(jobs[i], teacher_records[i]) for i in index]
            frames = model.speech_frames([model.features(load_audio(j["audio"])) for j, _ in group])
            student = pack([Example(j["id"], [Text(r["prefix_ids"]), Speech(0, f.shape[0]),
                                              Text(r["suffix_ids"])], r["response_ids"],
                                    n_frames=f.shape[0]) for (j, r), f in zip(group, frames)], 4096)
            h_s = model.loss_states(student, torch.cat(frames))
            if teacher_hidden is not None:
                h_t = torch.cat([teacher_hidden[j["id"]] for j, _ in group]).to(h_s)
            else:
                h_t = model.teacher_states(pack([Example(j["id"], [Text(
                    r["prefix_ids"] + r["transcript_ids"] + r["suffix_ids"])], r["response_ids"])
                    for j, r in group], 4096))
            _, parts = imitation_loss(h_s, h_t, head.weight, lm_head_bias=getattr(head, "bias", None),
                                      reduction="none", return_parts=True)
            for i, rows in zip(index, parts["kl"].split([len(r["response_ids"]) for _, r in group])):
                out[i] = float(rows.mean())
    return out


def other_speech(jobs: list[dict]) -> list[dict] | None:
    """The jobs with each clip swapped for the next utterance's (in id order, cyclic); None with
    fewer than two utterances."""
    audio = {j["utt_id"]: j["audio"] for j in jobs}
    ids = sorted(audio)
    if len(ids) < 2:
        return None
    nxt = {u: audio[ids[(k + 1) % len(ids)]] for k, u in enumerate(ids)}
    return [{**j, "audio": nxt[j["utt_id"]]} for j in jobs]


def _write_results(out: Path, result: dict):
    """``eval.json`` (everything), ``eval.md`` (the tables) and ``eval.png`` (the chart)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1))
    text = markdown(result["summary"], result["deltas"], result["baseline"])
    if result["repeat"]:
        text += "\n" + repeat_markdown(result["repeat"])
    if result["decoding"]:
        text = decoding_note(result["decoding"]) + "\n\n" + text
    atomic_write_text(out / "eval.md", text)
    plot(result["summary"], out / "eval.png")


def decoding_note(decoding: dict) -> str:
    """One line saying how the SLLMs' answers were decoded (``evaluate``'s ``decoding``)."""
    settings = ", ".join(f"{k}={v:g}" for k, v in sorted(decoding.items()))
    return f"The SLLMs' answers: greedy with {settings}; the teacher's: greedy."


def _summarize(rows: list[dict]) -> dict:
    acc: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for key in (("all", r["split"]), (r["task"], r["split"])):
            for m in METRICS:
                if m in r:
                    acc[(r["model"],) + key][m].append(r[m])
    summary = defaultdict(dict)
    for (model, task, split), metrics in acc.items():
        summary[model][f"{task}|{split}"] = {m: sum(v) / len(v) for m, v in metrics.items()}
        summary[model][f"{task}|{split}"]["n"] = len(next(iter(metrics.values())))
    return summary


def paired_deltas(rows: list[dict], baseline: str, *, n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> dict:
    """Per model (other than the teacher and ``baseline``), split and metric: the mean over prompts
    of (model - baseline) and its ``level`` percentile-bootstrap confidence interval, resampling
    prompts (paired: both models answered the same prompts). {model: {split: {metric:
    {"mean", "lo", "hi", "n"}}}}."""
    import numpy as np

    by = defaultdict(dict)
    for r in rows:
        by[r["model"]][r["id"]] = r
    base = by.get(baseline, {})
    rng = np.random.default_rng(seed)
    out: dict = {}
    for model, answers in by.items():
        if model in ("teacher", baseline):
            continue
        for kind in SPLITS:
            for m in DELTA_METRICS:
                d = np.array([a[m] - base[k][m] for k, a in answers.items()
                              if a["split"] == kind and m in a and m in base.get(k, {})])
                if d.size == 0:
                    continue
                means = d[rng.integers(0, d.size, (n_boot, d.size))].mean(axis=1)
                lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
                out.setdefault(model, {}).setdefault(kind, {})[m] = {
                    "mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(d.size)}
    return out


def delta_markdown(deltas: dict, baseline: str) -> str:
    """The differences from the baseline as a table: mean [95% CI]; marked when the interval
    excludes 0 (better: higher agreement, lower KL)."""
    if not deltas:
        return ""
    lines = [f"Difference from the {baseline} model, prompt by prompt (mean [95% bootstrap CI]; "
             "+ better / - worse where the interval excludes 0):", "",
             "| model | split | ROUGE-L | chrF | similarity | imitation KL | n |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for model, splits in deltas.items():
        for kind in SPLITS:
            if kind not in splits:
                continue
            cells, n = [], 0
            for m in DELTA_METRICS:
                d = splits[kind].get(m)
                if d is None:
                    cells.append("-")
                    continue
                n = d["n"]
                sign = -1 if m == "kl" else 1  # a lower KL is better
                lo, hi = sorted((sign * d["lo"], sign * d["hi"]))  # the interval of the gain
                mark = " (+)" if lo > 0 else " (-)" if hi < 0 else ""
                cells.append(f"{_signed(d['mean'])} [{_signed(d['lo'])}, {_signed(d['hi'])}]{mark}")
            lines.append(f"| {model} | {SPLIT_NAMES[kind]} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines) + "\n"


def markdown(summary: dict, deltas: dict | None = None, baseline: str | None = None,
             per_task: bool = True) -> str:
    """The summary table per model and split, the differences from ``baseline`` when given, then
    (``per_task``) ROUGE-L / chrF per task."""
    lines = ["| model | split | ROUGE-L | chrF | similarity | imitation KL | KL, other speech | repeat WER "
             "| repeat WER (Whisper norm.) | n |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model in summary:
        for split in SPLITS:
            s = summary[model].get(f"all|{split}")
            if s is None:
                continue
            cells = [_f(s.get(m)) for m in ("rouge_l", "chrf", "similarity", "kl", "kl_other")]
            repeat = summary[model].get(f"repeat|{split}", {})
            lines.append(f"| {model} | {SPLIT_NAMES[split]} | " + " | ".join(cells)
                         + f" | {_f(repeat.get('wer'))} | {_f(repeat.get('wer_whisper'))} | {s['n']} |")
    if deltas:
        lines += ["", delta_markdown(deltas, baseline).rstrip("\n")]
    if not per_task:
        return "\n".join(lines) + "\n"
    tasks = ["", "Per task (ROUGE-L / chrF):", "",
                "| model | task | split | ROUGE-L | chrF |", "|---|---|---|---:|---:|"]
    for model in summary:
        for key, s in sorted(summary[model].items()):
            task, split = key.split("|")
            if task != "all":
                tasks.append(f"| {model} | {task} | {split} | {_f(s.get('rouge_l'))} | {_f(s.get('chrf'))} |")
    return "\n".join(lines + tasks) + "\n"


def plot(summary: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the teacher scores 1 by construction: leave it out so that the SLLMs' differences show
    models = [x for x in summary if x != "teacher"]
    titles = {"rouge_l": "ROUGE-L (higher is better)", "chrf": "chrF (higher is better)",
              "similarity": "similarity (higher is better)", "kl": "imitation KL (lower is better)"}
    metrics = [m for m in titles if any(m in summary[x].get(f"all|{s}", {})
                                        for x in models for s in SPLITS)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    width = 0.8 / max(len(models), 1)
    for ax, m in zip(axes[0], metrics):
        for k, model in enumerate(models):
            vals = [summary[model].get(f"all|{s}", {}).get(m, 0.0) for s in SPLITS]
            bars = ax.bar([i + k * width for i in range(len(SPLITS))], vals, width, label=model)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(SPLITS))])
        ax.set_xticklabels(["seen", "new wording", "new task"])
        ax.set_title(titles[m], fontsize=10)
        ax.margins(y=0.15)
    # one legend under the panels, where it cannot cover a bar or its label
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(len(models), 1), fontsize=8,
               frameon=False)
    fig.suptitle("SLLM vs the teacher's answers on held-out utterances (the teacher scores 1)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def repeat_wer(transcript: str | list[str], answer: str | list[str]) -> float:
    """The word error rate of ``answer`` against ``transcript`` (jiwer), both normalized with
    ``wer_words``; an empty answer scores 1.0, as if every word were missed. Lists of transcripts and
    answers give the corpus-level rate (all edits over all transcript words)."""
    import jiwer

    if isinstance(transcript, str):
        return jiwer.wer(wer_words(transcript), wer_words(answer) or "-")
    return jiwer.wer([wer_words(t) for t in transcript], [wer_words(a) or "-" for a in answer])


def repeat_wer_parts(transcripts: list[str], answers: list[str]) -> dict:
    """The corpus-level ``repeat_wer`` split into its edits, each over all transcript words:
    ``sub`` (substitutions), ``del`` (transcript words the answers leave out), ``ins`` (answer words
    beyond the transcript's), and the ``hits``; ``sub + del + ins`` is ``repeat_wer`` of the same
    lists. An empty answer leaves out every word."""
    import jiwer

    if len(transcripts) != len(answers):
        raise ValueError(f"{len(transcripts)} transcripts but {len(answers)} answers")
    words = sub = dele = ins = hits = 0
    for transcript, reply in zip(transcripts, answers):
        ref, hyp = wer_words(transcript), wer_words(reply)
        words += len(ref.split())
        if not hyp:
            dele += len(ref.split())
            continue
        o = jiwer.process_words(ref, hyp)
        sub, dele, ins, hits = sub + o.substitutions, dele + o.deletions, ins + o.insertions, hits + o.hits
    return {"sub": sub / words, "del": dele / words, "ins": ins / words, "hits": hits / words}


def repeat_breakdown(rows: list[dict], transcripts: dict[str, str]) -> dict:
    """{model: {split: ...}}: the corpus-level repeat WER of ``rows``' repeat answers (``wer``) with
    its parts (``repeat_wer_parts``) and the number of prompts (``n``). ``transcripts``: utterance
    id -> transcript (a row's id is ``behaviors.job``'s, "utterance/task/wording")."""
    groups: dict = defaultdict(lambda: ([], []))
    for r in rows:
        if r["task"] == "repeat":
            refs, hyps = groups[r["model"], r["split"]]
            refs.append(transcripts[r["id"].rsplit("/", 2)[0]])
            hyps.append(r["answer"])
    out: dict = defaultdict(dict)
    for (model, split), (refs, hyps) in groups.items():
        parts = repeat_wer_parts(refs, hyps)
        out[model][split] = {"wer": parts["sub"] + parts["del"] + parts["ins"], **parts, "n": len(refs)}
    return dict(out)


def repeat_markdown(breakdown: dict) -> str:
    """``repeat_breakdown`` as a table: what the repeat answers get wrong, per transcript word."""
    lines = ["Repeat WER over all words, and its parts per transcript word:", "",
             "| model | split | WER | substitutions | deletions | insertions | words right | n |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for model, by_split in breakdown.items():
        for split in SPLITS:
            if split in by_split:
                b = by_split[split]
                lines.append(f"| {model} | {SPLIT_NAMES[split]} | " + " | ".join(
                    _f(b[k]) for k in ("wer", "sub", "del", "ins", "hits")) + f" | {b['n']} |")
    return "\n".join(lines) + "\n"


def wer_words(s: str) -> str:
    """``s`` lower-cased, without punctuation but apostrophes, single-spaced (for WER)."""
    return " ".join("".join(c for c in s.lower() if c.isalnum() or c in " '").split())


def _signed(x: float) -> str:
    return f"{round(x, 3) + 0.0:+.3f}"  # + 0.0: no "-0.000"


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def run_task_split(run: str | Path, library: TaskLibrary, split_file: str | Path | None = None) -> TaskSplit:
    """The task split to evaluate a run on: ``split_file`` when given; else the ``split.json`` its
    training data carries (``data.behaviors`` in memory, ``data.train_shards`` when streaming: the
    shard folder keeps its behaviors' copy), read from the run's recorded ``config.yaml``; else, for
    a folder that is no run (a ``save_pretrained`` folder), the task library's own split."""
    import yaml

    if split_file is None:
        config = Path(run) / "config.yaml"
        if not config.is_file():
            return library.split()
        try:
            data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
        except (yaml.YAMLError, AttributeError) as exc:
            raise ValueError(f"{config}: not a run config ({exc})") from None
        folder = data.get("train_shards") if data.get("reader") == "streaming" else data.get("behaviors")
        folder = folder or data.get("behaviors") or data.get("train_shards")
        if not folder:
            raise ValueError(f"{config} names no behaviors folder or shards to take the task split from; "
                             f"pass --split")
        split_file = Path(folder) / "split.json"
    split_file = Path(split_file)
    if not split_file.is_file():
        raise FileNotFoundError(f"the task split {split_file} is not there (the run's data moved?); pass --split")
    try:
        return TaskSplit.from_dict(json.loads(split_file.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{split_file}: not a task split ({exc})") from None


def asr_prompt(library: TaskLibrary) -> str:
    """The plain-transcription prompt of ``mtbi-fast eval --asr``: the task config's first
    ``repeat`` wording, with ``{speech}`` where the transcript went."""
    if "repeat" not in library.tasks:
        raise ValueError("the task config has no repeat task to take the transcription prompt from; "
                         "pass --asr-prompt")
    from .tasks import PLACEHOLDER

    return library.tasks["repeat"][0].replace(PLACEHOLDER, SPEECH)


def evaluate_asr(model, utts: list[Utterance], prompt: str, out: str | Path, *, batch_size: int = 8,
                 max_new_tokens: int = 128, decoding: dict | None = None, progress: bool = True) -> dict:
    """Plain transcription of ``utts`` (a LibriSpeech-style test set) by ``model`` with ``prompt``:
    the corpus WER with mtbi-fast's normalization (``wer_words``) and with Whisper's English
    normalizer (``whisper_wer``, the figure papers report), substitutions / deletions /
    insertions, and every hypothesis. Writes ``asr.json`` and ``asr.md`` into ``out``."""
    if SPEECH not in prompt:
        raise ValueError(f"the ASR prompt has no {SPEECH}: {prompt!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out = Path(out)
    start = time.time()
    hyps: list[str] = []
    bar = tqdm(total=len(utts), desc="asr", unit="utt", disable=not progress)
    for b in range(0, len(utts), batch_size):
        chunk = utts[b:b + batch_size]
        waves = [load_audio(u.audio, max_seconds=model.max_seconds) for u in chunk]
        hyps += [h.strip() for h in model.generate_batch(waves, [prompt] * len(chunk),
                                                         max_new_tokens=max_new_tokens, **(decoding or {}))]
        bar.update(len(chunk))
    bar.close()
    refs = [u.text for u in utts]
    seconds = time.time() - start
    audio_s = sum(u.duration or 0.0 for u in utts)
    result = {"prompt": prompt, "utterances": len(utts), "wer": repeat_wer(refs, hyps),
              "wer_whisper": whisper_wer(refs, hyps), "parts": repeat_wer_parts(refs, hyps),
              "seconds": round(seconds, 1), "audio_seconds": round(audio_s, 1),
              "rows": [{"id": u.id, "reference": u.text, "hypothesis": h} for u, h in zip(utts, hyps)]}
    atomic_write_text(out / "asr.json", json.dumps(result, indent=1))
    atomic_write_text(out / "asr.md", asr_markdown(result))
    return result


def asr_markdown(result: dict) -> str:
    p = result["parts"]
    return ("| utterances | WER (Whisper norm.) | WER (mtbi-fast norm.) | sub | del | ins |\n"
            "|---:|---:|---:|---:|---:|---:|\n"
            f"| {result['utterances']} | {_f(result['wer_whisper'])} | {_f(result['wer'])} | "
            f"{_f(p['sub'])} | {_f(p['del'])} | {_f(p['ins'])} |\n\n"
            f"Prompt: `{result['prompt']!r}`. Greedy decoding.\n")
