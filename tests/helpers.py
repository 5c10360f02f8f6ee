"""Helpers shared by the tests: input makers, float64 references, tiny models, packed-vs-alone
runners. Imported as ``from helpers import ...`` (tests/ is on the path under pytest)."""

import dataclasses
import json
import random
from pathlib import Path

import torch
import transformers

from mtbi_fast.behaviors import BehaviorConfig, generate_behaviors
from mtbi_fast.config import load_config
from mtbi_fast.data import read_manifest, write_manifest
from mtbi_fast.embeddings import pack_embeddings
from mtbi_fast.hub import load_llm
from mtbi_fast.model import ModelConfig
from mtbi_fast.packing import Example, Speech, Text, model_inputs
from mtbi_fast.reference import eager_row_losses
from mtbi_fast.tasks import TaskLibrary

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "tiny_train.yaml"

VOCAB = 97  # the tiny packing models' vocabulary
SHARD_SIZE = 3  # the shards fixture (conftest.py): 12 training utterances, 4 shards


# --- the imitation loss ---------------------------------------------------------------------

def make_inputs(n=37, h=40, v=203, h_t=None, dtype=torch.float64, bias=False, ignore=(), scale=0.3,
                seed=0, lead=None):
    """Random loss inputs. ``h_t`` set: a separate teacher head of that width. ``ignore``: rows
    whose target is -100. ``lead``: reshape the rows to this leading shape (e.g. (B, T))."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * scale
    out = dict(student_hidden=hs, lm_head_weight=w)
    if h_t is None:
        # the teacher is a perturbed student, as in MTBI (same head)
        out["teacher_hidden"] = hs + 0.7 * torch.randn(n, h, generator=g, dtype=torch.float64)
    else:
        out["teacher_hidden"] = torch.randn(n, h_t, generator=g, dtype=torch.float64)
        out["teacher_lm_head_weight"] = torch.randn(v, h_t, generator=g, dtype=torch.float64) * scale
    if bias:
        out["lm_head_bias"] = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    target = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        target[i] = -100
    out["target_ids"] = target
    out = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in out.items()}
    if lead is not None:
        for k in ("student_hidden", "teacher_hidden"):
            out[k] = out[k].reshape(*lead, -1)
        out["target_ids"] = out["target_ids"].reshape(lead)
    return out


def float64_reference(x, row_scale, **opts):
    hs = x["student_hidden"].double().requires_grad_()
    w = x["lm_head_weight"].double().requires_grad_()
    b = x["lm_head_bias"].double().requires_grad_() if "lm_head_bias" in x else None
    w_t = x.get("teacher_lm_head_weight")
    w_t = w.detach() if w_t is None else w_t.double()
    b_t = b.detach() if (b is not None and "teacher_lm_head_weight" not in x) else None
    rows = eager_row_losses(hs, x["teacher_hidden"].double(), w, w_t, b, b_t, x.get("target_ids"),
                            **opts)
    (rows * row_scale.double()).sum().backward()
    return rows.detach(), hs.grad, w.grad, b.grad if b is not None else None


# --- packed batches and tiny models ---------------------------------------------------------

def random_examples(n, seed=0, max_frames=40, max_text=12, max_resp=15, mask=False):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        n_frames = rng.randint(1, max_frames)
        prompt, f = [Text(rng.randrange(VOCAB) for _ in range(rng.randint(1, max_text)))], 0
        while f < n_frames:  # interleave speech runs and text runs over the example's frames
            step = rng.randint(1, n_frames - f)
            prompt.append(Speech(f, f + step))
            f += step
            if rng.random() < 0.5:
                prompt.append(Text(rng.randrange(VOCAB) for _ in range(rng.randint(1, 4))))
        resp = [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_resp))]
        m = [rng.random() < 0.8 for _ in resp] if mask else None
        out.append(Example(f"ex{i}", prompt, resp, m, n_frames))
    return out


def tiny_model(family, attn="sdpa"):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  attn_implementation=attn)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    return cls(cfg).eval()


def single_embeds(ex, embed, frames, base):
    pieces = []
    for p in ex.prompt:
        if isinstance(p, Text):
            pieces.append(embed[torch.tensor(p.ids, dtype=torch.long, device=embed.device)])
        else:
            pieces.append(frames[base + p.start: base + p.end])
    pieces.append(embed[torch.tensor(ex.response, dtype=torch.long, device=embed.device)])
    return torch.cat(pieces)


def run_packed(model, batch, examples, frames, weights, attention="auto"):
    """The examples' logits [N, V] (input order) from one forward over the packed batch, and the
    gradient of sum(logits * weights) over all packed positions with respect to ``frames``."""
    frames = frames.detach().requires_grad_()
    embed = model.get_input_embeddings().weight.detach()
    embeds = pack_embeddings(batch.source, embed, frames, backend="torch")
    kw = model_inputs(batch, embeds, attention=attention,
                      attn_implementation=model.config._attn_implementation)
    logits = model(**kw).logits.reshape(-1, VOCAB)
    (logits.float() * weights).sum().backward()
    mine = torch.cat([logits[s:s + len(ex)] for s, ex in zip(batch.example_starts, examples)])
    return mine.detach(), frames.grad


def run_alone(model, batch, examples, frames, weights):
    """``run_packed``'s outputs with each example run on its own (no padding, no packing)."""
    frames = frames.detach().requires_grad_()
    embed = model.get_input_embeddings().weight.detach()
    out, total = [], 0
    for i, ex in enumerate(examples):
        x = single_embeds(ex, embed, frames, int(batch.frame_offsets[i]))
        alone = model(inputs_embeds=x[None], use_cache=False).logits[0]
        s = batch.example_starts[i]
        total = total + (alone.float() * weights[s:s + len(ex)]).sum()
        out.append(alone.detach())
    total.backward()
    return torch.cat(out), frames.grad


# --- training runs ----------------------------------------------------------------------------

def make_training_corpus(d: Path, n_train: int = 12, n_test: int = 4) -> Path:
    """Demo utterances (``n_train`` training, ``n_test`` held out) in ``d`` with behaviors from the
    tiny_train LLM (the training behaviors with cached teacher states): train.jsonl, test.jsonl,
    beh/, beh-eval/."""
    train = read_manifest(ROOT / "data" / "demo" / "train.jsonl")[:n_train]
    test = read_manifest(ROOT / "data" / "demo" / "test.jsonl")[:n_test]
    write_manifest(d / "train.jsonl", train)
    write_manifest(d / "test.jsonl", test)
    cfg = load_config(CONFIG, ["data.train_manifest=x", "data.behaviors=x", f"output_dir={d}/unused"])
    llm, tok = load_llm(ModelConfig.from_dict(cfg["model"]).llm)
    lib = TaskLibrary.load(ROOT / "configs" / "tasks.yaml")
    bc = BehaviorConfig(per_utterance=2, max_new_tokens=12)
    generate_behaviors(train, lib, llm, tok, d / "beh", dataclasses.replace(bc, cache_hidden=True),
                       progress=False, model_config=cfg["model"])
    if n_test:
        generate_behaviors(test, lib, llm, tok, d / "beh-eval", bc, progress=False,
                           model_config=cfg["model"])
    return d


def overrides(data, out, *extra):
    """tiny_train.yaml overrides for a run on ``make_training_corpus``'s folder into ``out``."""
    return [f"data.train_manifest={data}/train.jsonl", f"data.behaviors={data}/beh",
            f"data.eval_manifest={data}/test.jsonl", f"data.eval_behaviors={data}/beh-eval",
            f"output_dir={out}", *extra]


def metrics(out):
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_batch(a, b):
    """Two built micro-batches are equal, tensor for tensor and field for field."""
    assert a.keys() == b.keys()
    assert len(a["features"]) == len(b["features"]) and all(torch.equal(x, y) for x, y in zip(a["features"], b["features"]))
    for key in ("student", "teacher"):
        for field in dataclasses.fields(a[key]):
            x, y = getattr(a[key], field.name), getattr(b[key], field.name)
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, (key, field.name)
    if "teacher_hidden" in a:
        assert torch.equal(a["teacher_hidden"], b["teacher_hidden"])
