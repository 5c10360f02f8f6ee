"""mtbi_fast/evaluate.py on the tiny config: every metric, the split bookkeeping, the outputs."""

import json
from pathlib import Path

import pytest
import yaml

from mtbi_fast.behaviors import BehaviorConfig, generate_behaviors
from mtbi_fast.behaviors_folder import read_behaviors
from mtbi_fast.data import read_manifest
from mtbi_fast.evaluate import (Embedder, asr_prompt, evaluate, evaluate_asr, repeat_wer, repeat_wer_parts,
                                rouge_l, whisper_normalizer, whisper_wer)
from mtbi_fast.model import ModelConfig, SpeechLLM, decoding_kwargs
from mtbi_fast.tasks import TaskLibrary

ROOT = Path(__file__).parents[1]


def test_rouge_l():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("a b c d", "x y") == 0.0
    # LCS "the cat mat" = 3 of 4 and 3 of 6 words
    assert rouge_l("the cat the mat", "the cat sat on a mat") == pytest.approx(2 * 0.75 * 0.5 / 1.25)


def test_rouge_l_is_rouge_scores_stemmed_lcs_f1():
    # tokens lower-cased, punctuation dropped, Porter-stemmed: cats -> cat, running/runs -> run;
    # LCS "cat run" = 2 of 4 and 2 of 3 tokens: F1 = 2 (1/2)(2/3) / (1/2 + 2/3) = 4/7
    assert rouge_l("The cats are running!", "a cat runs") == pytest.approx(4 / 7)
    assert rouge_l("Hello, world.", "hello world") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("", "a word") == 0.0


def test_whisper_normalized_wer_matches_a_hand_count():
    norm = whisper_normalizer()
    assert norm("Mr. Smith's colour is twenty-five, um, OK?") == "mister smith is color is 25 ok"
    # spelled-out numbers, British spellings and fillers are not errors after Whisper's normalizer...
    refs = ["I have twenty-five apples.", "The colour of the sea.", "the cat sat"]
    hyps = ["i have 25 apples", "uh the color of the sea", "the dog sat"]
    assert whisper_wer(refs, hyps) == pytest.approx(1 / (4 + 5 + 3))  # one substitution in 12 words
    # ...while mtbi-fast's own normalization counts them: 25 for "twentyfive" (1 sub), colour/color
    # (1 sub), "uh" (1 ins), dog (1 sub) over the same 4 + 5 + 3 words
    assert repeat_wer(refs, hyps) == pytest.approx(4 / 12)
    assert whisper_wer(["um"], ["anything"]) is None  # a transcript that normalizes to nothing is left out
    assert whisper_wer("one two", "") == 1.0


def test_asr_evaluation_scores_every_utterance(tmp_path):
    from mtbi_fast.data import Utterance

    utts = [Utterance(f"u{i}", str(ROOT / "tests" / "data" / "clip1.flac"), text, 1.0)
            for i, text in enumerate(["I have twenty-five apples.", "the cat sat"])]

    class Model:  # answers fixed transcripts: the scoring is what is checked here
        max_seconds = 30.0

        def __init__(self):
            self.prompts = []

        def generate_batch(self, waves, prompts, max_new_tokens, **kw):
            self.prompts += prompts
            return [" i have 25 apples ", "the dog sat"][len(self.prompts) - len(prompts):len(self.prompts)]

    model = Model()
    lib = TaskLibrary.load(ROOT / "configs" / "tasks.yaml")
    prompt = asr_prompt(lib)
    assert prompt == lib.tasks["repeat"][0].replace("{transcript}", "{speech}")
    result = evaluate_asr(model, utts, prompt, tmp_path, batch_size=1, progress=False)
    assert model.prompts == [prompt, prompt]
    assert result["wer_whisper"] == pytest.approx(1 / 7)
    assert result["wer"] == pytest.approx(2 / 7)  # 25 for "twentyfive" (1), dog (1) over 4 + 3 words
    assert [r["hypothesis"] for r in result["rows"]] == ["i have 25 apples", "the dog sat"]
    assert json.loads((tmp_path / "asr.json").read_text())["wer_whisper"] == result["wer_whisper"]
    assert "| 2 | 0.143 | 0.286 |" in (tmp_path / "asr.md").read_text()
    with pytest.raises(ValueError, match="no {speech}"):
        evaluate_asr(model, utts, "Transcribe.", tmp_path)


def test_sentence_similarity_is_semantic():
    from mtbi_fast.fetch import fetch

    emb = Embedder(fetch("minilm", quiet=True))
    v = emb(["The weather is sunny today.", "It is a bright and sunny day.", "I sold my old car."])
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.3


def test_evaluate_tiny(tmp_path):
    cfg = ModelConfig.from_dict(yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"])
    model = SpeechLLM.from_config(cfg)
    lib = TaskLibrary.load(ROOT / "configs" / "tasks.yaml")
    split = lib.split()
    train_utts = read_manifest(ROOT / "data" / "demo" / "train.jsonl")[:4]
    test_utts = read_manifest(ROOT / "data" / "demo" / "test.jsonl")[:2]
    generate_behaviors(train_utts, lib, model.llm, model.tokenizer, tmp_path / "beh",
                       BehaviorConfig(per_utterance=20, max_new_tokens=2), split=split, progress=False)
    result = evaluate({"mtbi": model, "untrained": SpeechLLM.from_config(cfg)}, test_utts, lib, split,
                      tmp_path / "eval", per_split=2, max_new_tokens=4, progress=False)
    for name in ("eval.json", "eval.md", "eval.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 100
    rows = result["rows"]
    assert {r["model"] for r in rows} == {"teacher", "mtbi", "untrained"}
    # split bookkeeping: nothing held out was trained on, and the held-out splits are really new
    trained_on = {(r["task"], r["wording"]) for r in read_behaviors(tmp_path / "beh")}
    for r in rows:
        task, wording = r["id"].split("/")[1], int(r["id"].split("/")[2])
        assert split.kind(task, wording) == r["split"]
        if r["split"] != "train":
            assert (task, wording) not in trained_on
    assert {r["split"] for r in rows} == {"train", "heldout_wording", "heldout_task"}
    for r in rows:
        assert 0.0 <= r["rouge_l"] <= 1.0 and 0.0 <= r["chrf"] <= 1.0
        if r["model"] == "teacher":
            assert r["rouge_l"] == 1.0 and r["chrf"] == pytest.approx(1.0)
        else:
            assert r["kl"] >= 0.0 and r["kl_other"] >= 0.0
    assert any("wer" in r for r in rows)  # the repeat task is always among the seen prompts
    # the repeat WER over all words: the same edits as the per-prompt figures, pooled
    text = {u.id: u.text for u in test_utts}
    for name in ("mtbi", "untrained"):
        rep = [r for r in rows if r["model"] == name and r["task"] == "repeat" and r["split"] == "train"]
        got = result["repeat"][name]["train"]
        assert got["n"] == len(rep) == 2
        assert got["wer"] == pytest.approx(repeat_wer([text[r["id"].split("/")[0]] for r in rep],
                                                      [r["answer"] for r in rep]))
        assert got["sub"] + got["del"] + got["ins"] == pytest.approx(got["wer"])
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "seen task, new wording" in md and "new task" in md and "KL, other speech" in md
    assert "| mtbi | seen task, seen wording | " + f"{result['repeat']['mtbi']['train']['wer']:.3f}" in md
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["jobs"] == 2 * (3 * 2 + 1)  # + a repeat prompt
    # the differences from the untrained model are paired by prompt
    assert saved["baseline"] == "untrained" and set(saved["deltas"]) == {"mtbi"}
    by = {(r["model"], r["id"]): r for r in rows}
    for kind, metrics in saved["deltas"]["mtbi"].items():
        ids = [r["id"] for r in rows if r["model"] == "mtbi" and r["split"] == kind]
        for m, d in metrics.items():
            diffs = [by["mtbi", i][m] - by["untrained", i][m] for i in ids]
            assert d["n"] == len(ids) and d["mean"] == pytest.approx(sum(diffs) / len(diffs))
            assert min(diffs) - 1e-12 <= d["lo"] <= d["mean"] <= d["hi"] <= max(diffs) + 1e-12
    assert "Difference from the untrained model" in md


def _rows(diffs, metric="rouge_l", split="heldout_task"):
    rows = []
    for i, d in enumerate(diffs):
        rows.append({"model": "untrained", "id": f"p{i}", "split": split, metric: 0.5})
        rows.append({"model": "mtbi", "id": f"p{i}", "split": split, metric: 0.5 + d})
    return rows


def test_paired_bootstrap_matches_the_normal_interval():
    """With many prompts the percentile bootstrap of the mean difference agrees with the CLT's
    mean +- 1.96 sd / sqrt(n) (float64 numpy reference); a constant difference has a zero-width
    interval; the models' own levels cancel (paired)."""
    import numpy as np

    from mtbi_fast.evaluate import paired_deltas

    d = np.random.default_rng(1).normal(0.1, 0.3, 800)
    got = paired_deltas(_rows(d.tolist()), "untrained", n_boot=4000)["mtbi"]["heldout_task"]["rouge_l"]
    half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)
    assert got["mean"] == pytest.approx(d.mean())
    assert got["lo"] == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert got["hi"] == pytest.approx(d.mean() + half, abs=0.1 * half)
    const = paired_deltas(_rows([0.2] * 10), "untrained")["mtbi"]["heldout_task"]["rouge_l"]
    assert const["lo"] == pytest.approx(0.2) and const["hi"] == pytest.approx(0.2)


def test_delta_table_marks_only_intervals_that_exclude_zero():
    from mtbi_fast.evaluate import delta_markdown, paired_deltas

    better = paired_deltas(_rows([0.1, 0.12, 0.09, 0.11] * 5), "untrained")
    worse_kl = paired_deltas(_rows([0.3, 0.25, 0.35] * 5, metric="kl"), "untrained")  # higher KL
    noise = paired_deltas(_rows([0.2, -0.2] * 10), "untrained")
    assert "(+)" in delta_markdown(better, "untrained")
    assert "(-)" in delta_markdown(worse_kl, "untrained")
    lower_kl = paired_deltas(_rows([-0.3, -0.25, -0.35] * 5, metric="kl"), "untrained")
    assert "(+)" in delta_markdown(lower_kl, "untrained")
    table = delta_markdown(noise, "untrained")
    assert "(+)" not in table and "(-)" not in table and "+0.000" in table


def test_imitation_kl_batched_matches_direct_forward(tmp_path):
    """The packed, batched per-prompt KL equals a plain unpacked forward of each prompt through
    the LLM (inputs_embeds for the speech side, input_ids for the teacher) with float64 KL; so
    does the KL against the teacher states kept from generation."""
    import torch

    from mtbi_fast.audio import load_audio
    from mtbi_fast.evaluate import imitation_kl, plan_eval
    from mtbi_fast.behaviors import answer

    cfg = ModelConfig.from_dict(yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"])
    model = SpeechLLM.from_config(cfg).eval()
    lib = TaskLibrary.load(ROOT / "configs" / "tasks.yaml")
    utts = read_manifest(ROOT / "data" / "demo" / "test.jsonl")[:2]
    jobs = plan_eval(utts, lib, lib.split(), per_split=1, seed=0)
    hidden = {}
    records = answer(jobs, lib, model.llm, model.tokenizer, BehaviorConfig(max_new_tokens=5), 0,
                      hidden=hidden)
    got = imitation_kl(model, jobs, records, batch_size=4)
    assert len(got) == len(jobs) == 8  # 2 utterances x (3 splits + a repeat prompt)
    # the teacher states kept from its own generation give the same KL as a teacher pass
    assert imitation_kl(model, jobs, records, hidden, batch_size=5) == pytest.approx(got, rel=1e-4, abs=1e-6)
    emb = model.llm.get_input_embeddings()
    with torch.no_grad():
        for job, rec, kl in zip(jobs, records, got):
            frames = model.speech_frames([model.features(load_audio(job["audio"]))])[0]
            resp = rec["response_ids"]
            ids = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
            x = torch.cat([emb(ids(rec["prefix_ids"])), frames, emb(ids(rec["suffix_ids"] + resp))])[None]
            z_s = model.llm(inputs_embeds=x).logits[0, -len(resp) - 1:-1].double()
            t_ids = rec["prefix_ids"] + rec["transcript_ids"] + rec["suffix_ids"] + resp
            z_t = model.llm(input_ids=ids(t_ids)[None]).logits[0, -len(resp) - 1:-1].double()
            p_t = z_t.log_softmax(-1)
            ref = (p_t.exp() * (p_t - z_s.log_softmax(-1))).sum(-1).mean().item()
            assert kl == pytest.approx(ref, rel=1e-3, abs=1e-5)


def test_other_speech_swaps_every_clip():
    from mtbi_fast.evaluate import other_speech

    jobs = [{"id": f"{u}/t/{k}", "utt_id": u, "audio": f"{u}.flac"} for u in "cab" for k in range(2)]
    swapped = other_speech(jobs)
    assert [j["id"] for j in swapped] == [j["id"] for j in jobs]
    assert all(s["audio"] != f"{j['utt_id']}.flac" for s, j in zip(swapped, jobs))
    assert {s["audio"] for s in swapped} == {"a.flac", "b.flac", "c.flac"}
    assert other_speech(jobs[:2]) is None  # one utterance: nothing to swap with


def test_evaluate_batch_size_must_be_positive(tmp_path):
    lib = TaskLibrary.load(ROOT / "configs" / "tasks.yaml")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        evaluate({}, [], lib, lib.split(), tmp_path, batch_size=0)
    assert not any(tmp_path.iterdir())


def test_an_empty_teacher_answer_has_no_kl_not_nan(tmp_path, monkeypatch):
    """An empty response has no position to compare: its per-prompt KL is left out (no "kl" in
    its rows; the means and the paired differences count the other prompts), never NaN."""
    import math

    import torch

    import mtbi_fast.evaluate as ev
    from mtbi_fast.evaluate import imitation_kl, plan_eval
    from mtbi_fast.behaviors import answer

    cfg = ModelConfig.from_dict(yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"])
    model = SpeechLLM.from_config(cfg).eval()
    lib = TaskLibrary.load(ROOT / "configs" / "tasks.yaml")
    utts = read_manifest(ROOT / "data" / "demo" / "test.jsonl")[:2]
    jobs = plan_eval(utts, lib, lib.split(), per_split=1, seed=0)[:4]
    hidden = {}
    records = answer(jobs, lib, model.llm, model.tokenizer, BehaviorConfig(max_new_tokens=3), 0,
                      hidden=hidden)
    full = imitation_kl(model, jobs, records, hidden, batch_size=2)
    records[1] = {**records[1], "response_ids": [], "response": ""}
    hidden[jobs[1]["id"]] = hidden[jobs[1]["id"]][:0]
    got = imitation_kl(model, jobs, records, hidden, batch_size=2)
    # The other prompts' KLs come from batches of another composition, so the CPU's matmul kernels
    # see other shapes (oneDNN picks its blocking by shape: AVX512 machines differ from others).
    # A KL is a sum of differences of float32 log-probabilities of a 512-token vocabulary, each
    # rounded to ~1e-7 * |log p| ~ 1e-6: an absolute tolerance, not a relative one (the KLs here
    # are ~5e-3, so 1e-6 relative would be 5e-9, below float32's resolution of the terms).
    assert got[1] is None
    assert got[0] == pytest.approx(full[0], rel=1e-6, abs=2e-6)
    assert got[2:] == pytest.approx(full[2:], rel=1e-6, abs=2e-6)
    assert imitation_kl(model, jobs[1:2], records[1:2], hidden) == [None]  # a batch of only empties

    real = ev.answer

    def emptied(batch, *a, **k):  # the teacher answers its first prompt with nothing
        out = real(batch, *a, **k)
        if batch[0]["id"] == first:
            out[0] = {**out[0], "response_ids": [], "response": ""}
            k["hidden"][first] = k["hidden"][first][:0]
        return out

    first = plan_eval(utts[:1], lib, lib.split(), 1, 0)[0]["id"]
    monkeypatch.setattr(ev, "answer", emptied)
    seen_kwargs = []
    real_generate = SpeechLLM.generate_batch

    def spy(self, *a, **k):
        seen_kwargs.append(k)
        return real_generate(self, *a, **k)

    monkeypatch.setattr(SpeechLLM, "generate_batch", spy)
    result = evaluate({"mtbi": model, "untrained": SpeechLLM.from_config(cfg)}, utts[:1], lib,
                      lib.split(), tmp_path, per_split=1, max_new_tokens=2, progress=False,
                      decoding=decoding_kwargs(no_repeat_ngram=3))
    # the SLLMs' answers are decoded as asked, and the report says so
    assert seen_kwargs and all(k == {"max_new_tokens": 2, "no_repeat_ngram_size": 3} for k in seen_kwargs)
    assert result["decoding"] == {"no_repeat_ngram_size": 3}
    assert (tmp_path / "eval.md").read_text().startswith(
        "The SLLMs' answers: greedy with no_repeat_ngram_size=3; the teacher's: greedy.\n")
    rows = [r for r in result["rows"] if r["model"] != "teacher"]
    assert all(("kl" in r) == (r["id"] != first) for r in rows)
    for split in result["summary"]["mtbi"].values():
        assert all(not (isinstance(v, float) and math.isnan(v)) for v in split.values())
    assert not torch.isnan(torch.tensor([d["mean"] for s in result["deltas"]["mtbi"].values()
                                         for d in s.values()])).any()
    assert "nan" not in (tmp_path / "eval.md").read_text().lower()


def test_repeat_wer_parts_add_up_to_the_corpus_wer():
    # hand-counted: "a b c" -> "a x c y": 2 hits, b->x, +y; "d e" -> "": both left out; 5 words
    parts = repeat_wer_parts(["A b c.", "d e"], ["a x c y", ""])
    assert parts == pytest.approx({"sub": 1 / 5, "del": 2 / 5, "ins": 1 / 5, "hits": 2 / 5})
    assert parts["sub"] + parts["del"] + parts["ins"] == pytest.approx(
        repeat_wer(["A b c.", "d e"], ["a x c y", ""]))
    with pytest.raises(ValueError, match="^2 transcripts but 1 answers$"):
        repeat_wer_parts(["a", "b"], ["a"])


def test_repeat_wer_counts_edits_over_transcript_words():
    # hand-counted: case and punctuation do not count, apostrophes stay part of the word
    assert repeat_wer("The cat, sat.", "the cat sat on") == pytest.approx(1 / 3)  # 1 insertion
    assert repeat_wer("It's late", "its late") == pytest.approx(1 / 2)            # 1 substitution
    assert repeat_wer("one two three", "") == 1.0                                  # nothing said
    assert repeat_wer("one two three", "?!") == 1.0
    # corpus level: all edits over all words (1 of 6), not the mean of 1/2 and 0/4
    assert repeat_wer(["a b", "c d e f"], ["a x", "C, d e f"]) == pytest.approx(1 / 6)


def test_eval_asr_command_writes_the_wer_of_the_test_set(tmp_path, capsys):
    from mtbi_fast.cli import main as cli
    from mtbi_fast.data import write_manifest

    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]
    SpeechLLM.from_config(ModelConfig.from_dict(cfg)).save_pretrained(tmp_path / "model")
    utts = read_manifest(ROOT / "data" / "demo" / "test.jsonl")[:3]
    write_manifest(tmp_path / "test.jsonl", utts)
    assert cli(["eval", "--model", str(tmp_path / "model"), "--asr", str(tmp_path / "test.jsonl"),
                "-o", str(tmp_path / "asr"), "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "| utterances | WER (Whisper norm.) |" in out and "x real time" in out
    result = json.loads((tmp_path / "asr" / "asr.json").read_text())
    assert [r["id"] for r in result["rows"]] == [u.id for u in utts]
    assert result["wer_whisper"] == pytest.approx(whisper_wer([u.text for u in utts],
                                                              [r["hypothesis"] for r in result["rows"]]))
    assert cli(["eval", "--model", str(tmp_path / "model"), "-o", str(tmp_path / "x")]) == 2
    assert "pass --manifest (prompt and task generalization) or --asr" in capsys.readouterr().err


def test_the_eval_split_comes_from_the_runs_data_also_when_streaming(tmp_path):
    from mtbi_fast.evaluate import run_task_split

    lib = TaskLibrary.load(ROOT / "configs" / "tasks.yaml")
    split = lib.split(seed=7)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "split.json").write_text(json.dumps(split.to_dict()))
    run = tmp_path / "run"
    run.mkdir()
    # a streaming run: data.behaviors is null, the shard folder keeps the behaviors' split
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"reader": "streaming", "behaviors": None,
                                                              "train_shards": str(shards)}}))
    assert run_task_split(run, lib).to_dict() == split.to_dict()
    assert run_task_split(tmp_path / "not-a-run", lib).to_dict() == lib.split().to_dict()
    (shards / "split.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"the task split .*split.json is not there .*pass --split"):
        run_task_split(run, lib)
