"""mtbi_fast/packing.py: packing properties, the packing kernels, and packed attention isolation
on small random Llama and Qwen2 models."""

import random

import pytest
import torch
import transformers

from mtbi_fast.attention import VARLEN_SDPA
from mtbi_fast.embeddings import pack_embeddings
from mtbi_fast.packing import (Example, PackedBatch, Speech, Text, block_causal_mask,
                               first_fit_decreasing, gather_loss_rows, iter_packed, model_inputs,
                               pack, truncate_together)

from helpers import VOCAB, random_examples, run_alone, run_packed, tiny_model

def expected_source(ex, frame_base):
    src = []
    for p in ex.prompt:
        src += list(p.ids) if isinstance(p, Text) else [-(frame_base + j) - 1 for j in range(p.start, p.end)]
    return src + list(ex.response)


def check_batch(batch: PackedBatch, examples, max_tokens):
    assert batch.example_ids == [ex.id for ex in examples]
    # rows within budget; examples never overlap and never straddle rows
    used = torch.zeros(batch.source.numel(), dtype=torch.int64)
    per_row = [0] * batch.rows
    for i, ex in enumerate(examples):
        s = batch.example_starts[i]
        assert s // batch.row_len == batch.example_rows[i]
        assert (s + len(ex) - 1) // batch.row_len == batch.example_rows[i]
        used[s:s + len(ex)] += 1
        per_row[batch.example_rows[i]] += len(ex)
        base = int(batch.frame_offsets[i])
        assert batch.source[s:s + len(ex)].tolist() == expected_source(ex, base)
        assert batch.position_ids.reshape(-1)[s:s + len(ex)].tolist() == list(range(len(ex)))
    assert used.max() <= 1 and int(used.sum()) == batch.n_tokens == sum(map(len, examples))
    assert max(per_row) <= max_tokens and batch.row_len <= max_tokens
    # cu_seqlens agree with position_ids: a sequence starts exactly where positions restart at 0
    flat_pos = batch.position_ids.reshape(-1)
    starts = (flat_pos == 0).nonzero().reshape(-1).tolist()
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens[:-1].tolist() == starts and int(batch.cu_seqlens[-1]) == flat_pos.numel()
    lens = torch.diff(batch.cu_seqlens).tolist()
    assert batch.max_seqlen == max(lens)
    # loss positions predict the (kept) response tokens, in input-example order
    flat_src = batch.source
    assert torch.equal(flat_src[batch.loss_positions + 1], batch.target_ids)
    assert batch.loss_example.tolist() == sorted(batch.loss_example.tolist())
    expected_targets = [t for ex in examples for t, k in
                        zip(ex.response, ex.response_mask or [True] * len(ex.response)) if k]
    assert batch.target_ids.tolist() == expected_targets


def test_packing_properties_seeded_loop():
    for seed in range(60):
        rng = random.Random(seed)
        examples = random_examples(rng.randint(1, 40), seed, mask=seed % 2 == 1)
        max_tokens = max(map(len, examples)) + rng.randint(0, 100)
        batch = pack(examples, max_tokens, row_len=rng.choice(["longest", "max"]))
        check_batch(batch, examples, max_tokens)


def test_first_fit_decreasing_packs_tightly():
    rng = random.Random(0)
    lengths = [rng.randint(50, 500) for _ in range(300)]
    bins = first_fit_decreasing(lengths, 2048)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    lower_bound = -(-sum(lengths) // 2048)
    assert len(bins) <= lower_bound + 1  # FFD is within one bin of optimal on such inputs


def test_iter_packed_keeps_every_example_once():
    examples = random_examples(100, 1)
    seen = []
    for batch in iter_packed(examples, max_tokens=160, rows_per_batch=3, buffer_size=32):
        assert batch.rows <= 3
        by_id = {ex.id: ex for ex in examples}
        check_batch(batch, [by_id[i] for i in batch.example_ids], 160)
        seen += batch.example_ids
    assert sorted(seen) == sorted(ex.id for ex in examples)


def test_overlong_example_error_and_truncation():
    ex = Example("utt-long", [Text(range(10)), Speech(0, 30)], list(range(20)), n_frames=30)
    with pytest.raises(ValueError, match=r"example 'utt-long' has 60 tokens \(prompt 40, response 20\), "
                                         r"more than max_tokens=50"):
        pack([ex], 50)
    batch = pack([ex], 50, overlong="truncate")
    assert batch.n_tokens == 50 and batch.target_ids.tolist() == list(range(10))
    with pytest.raises(ValueError, match="example 'utt-long' has 60 tokens"):
        pack([ex], 30, overlong="truncate")  # the prompt alone does not fit


def test_truncate_together_keeps_the_same_response_tokens():
    """A speech student and its text teacher (shorter prompt): pack() alone cuts each to its own
    prompt; truncate_together cuts both to the prefix that fits the longer prompt (issue 14)."""
    resp = list(range(20))
    student = Example("b1", [Text(range(5)), Speech(0, 30)], resp, [True] * 19 + [False], n_frames=30)
    teacher = Example("b1", [Text(range(5)), Text(range(7))], resp, [True] * 19 + [False])
    alone = [pack([ex], 50, overlong="truncate").target_ids.numel() for ex in (student, teacher)]
    assert alone == [15, 19]  # what went wrong
    s, t = truncate_together([student, teacher], 50)
    assert s.response == t.response == resp[:15] and s.response_mask == t.response_mask == [True] * 15
    assert s.prompt == student.prompt and t.prompt == teacher.prompt and s.n_frames == 30
    assert torch.equal(pack([s], 50).target_ids, pack([t], 50).target_ids)
    assert truncate_together([student, teacher], 100) == [student, teacher]  # fits: unchanged
    with pytest.raises(ValueError, match=r"example 'b1' has 55 tokens \(prompt 35, response 20\), more than "
                                         r"max_tokens=50; set overlong='truncate'"):
        truncate_together([student, teacher], 50, overlong="error")
    with pytest.raises(ValueError, match=r"example 'b1' has 55 tokens"):
        truncate_together([student, teacher], 35)  # the student's prompt alone fills the row
    with pytest.raises(ValueError, match=r"do not have the same response length"):
        truncate_together([student, Example("b2", [Text([1])], [1])], 50)


def test_bad_examples():
    with pytest.raises(ValueError, match=r"example 'e1': speech parts use frame 9 but the example has 5"):
        Example("e1", [Speech(0, 10)], [1], n_frames=5)
    with pytest.raises(ValueError, match=r"example 'e2': response_mask has 1 entries for 2"):
        Example("e2", [Text([1])], [1, 2], [True])
    with pytest.raises(TypeError, match=r"example 'e3': prompt part 0 is list"):
        Example("e3", [[1, 2]], [1])


def test_block_causal_mask():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    m = block_causal_mask(pos)[0, 0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for a, b in ((0, 3), (3, 5), (5, 6)):
        expected[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    assert torch.equal(m, expected)
    additive = block_causal_mask(pos, dtype=torch.bfloat16)[0, 0]
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, expected) and (additive[~expected] == torch.finfo(torch.bfloat16).min).all()


def test_mask_isolates_packed_examples_under_eager_attention():
    """attention="mask" with eager attention (which adds the mask to the scores): two packed
    examples give what each gives alone (issue 14: a bool mask was added as 1/0, error 1.35)."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    examples = [Example("a", [Text([5, 9, 3, 7, 1, 4])], [11, 12, 13]), Example("b", [Text([8, 2, 6])], [14, 15])]
    batch = pack(examples, 64)
    assert batch.rows == 1
    embed = model.get_input_embeddings().weight.detach()
    x = pack_embeddings(batch.source, embed, torch.zeros(0, 32))
    logits = model(**model_inputs(batch, x, attention="mask")).logits.reshape(-1, VOCAB)
    for start, ex in zip(batch.example_starts, examples):
        ids = torch.tensor([[*ex.prompt[0].ids, *ex.response]])
        alone = model(input_ids=ids, use_cache=False).logits[0]
        torch.testing.assert_close(logits[start:start + len(ex)], alone, atol=1e-5, rtol=1e-5)


# ---- packing kernels --------------------------------------------------------------------------

def _pack_inputs(n=203, h=72, v=61, f=150, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(v, h, generator=g).to(dtype)
    frames = torch.randn(f, h, generator=g).to(dtype)
    src = torch.randint(0, v, (n,), generator=g)
    k = min(f, int(0.6 * n))
    src[torch.randperm(n, generator=g)[:k]] = -torch.randperm(f, generator=g)[:k] - 1  # frames used once
    return src, emb, frames


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_embeddings_exact(backend, dtype):
    src, emb, frames = _pack_inputs(dtype=dtype)
    emb.requires_grad_()
    frames.requires_grad_()
    grad = torch.randn(src.numel(), emb.shape[1], generator=torch.Generator().manual_seed(5)).to(dtype)
    results = {}
    for name in ("eager", backend):
        emb.grad = frames.grad = None
        out = pack_embeddings(src, emb, frames, backend=name)
        out.backward(grad)
        results[name] = (out.detach(), emb.grad.clone(), frames.grad.clone())
    # copies are exact; the frame gradients are one term per frame (frames are used once) and
    # exact too; the table gradient sums repeated token rows in fp32 and rounds once at the end
    # (eager accumulates in the table's dtype), so it is judged against float64
    assert torch.equal(results[backend][0], results["eager"][0])
    assert torch.equal(results[backend][2], results["eager"][2])
    text = src >= 0
    exact = torch.zeros(emb.shape, dtype=torch.float64).index_add_(0, src[text], grad[text].double())
    torch.testing.assert_close(results[backend][1].double(), exact, atol=1e-6,
                               rtol=1e-6 if dtype == torch.float32 else 2**-8)
    # rows are what the source says
    speech = src < 0
    assert torch.equal(results[backend][0][speech], frames.detach()[-src[speech] - 1])
    assert torch.equal(results[backend][0][~speech], emb.detach()[src[~speech]])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pack_embeddings_frozen_table_and_repeated_frames(backend):
    src, emb, frames = _pack_inputs(n=50, f=7)
    src[src < 0] = -(torch.arange(int((src < 0).sum())) % 7) - 1  # frames used several times
    frames.requires_grad_()
    g = torch.randn(50, emb.shape[1])
    pack_embeddings(src, emb, frames, backend=backend).backward(g)
    expected = torch.zeros_like(frames).index_add_(0, -src[src < 0] - 1, g[src < 0])
    torch.testing.assert_close(frames.grad, expected, rtol=1e-6, atol=1e-6)
    assert emb.grad is None


def test_pack_embeddings_bad_inputs():
    src, emb, frames = _pack_inputs(n=10, v=20, f=5)
    src[0] = 20
    with pytest.raises(ValueError, match=r"source has token id 20, outside the embedding table \(20 rows\)"):
        pack_embeddings(src, emb, frames)
    src[0] = -6
    with pytest.raises(ValueError, match=r"source refers to speech frame 5, but the frame buffer has 5"):
        pack_embeddings(src, emb, frames)
    with pytest.raises(ValueError, match=r"frames have hidden size 3 but the embedding table has 72"):
        pack_embeddings(src.clamp(min=0), emb, torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"frames dtype torch.float64 differs"):
        pack_embeddings(src.clamp(min=0), emb, frames.double())


# ---- packed attention on real model families ------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attention", ["position_ids", "mask", "varlen"])
def test_packed_forward_matches_each_example_alone(family, attention):
    model = tiny_model(family, attn=VARLEN_SDPA if attention == "varlen" else "sdpa")
    examples = random_examples(9, seed=3)
    batch = pack(examples, max_tokens=max(map(len, examples)) + 30)
    assert batch.rows >= 2 and len(examples) > batch.rows  # rows really hold several examples
    frames = torch.randn(int(batch.frame_offsets[-1]), 64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(batch.source.numel(), VOCAB, generator=torch.Generator().manual_seed(2))

    packed, packed_grad = run_packed(model, batch, examples, frames, weights, attention)
    alone, alone_grad = run_alone(model, batch, examples, frames, weights)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_grad, alone_grad, atol=1e-5, rtol=1e-4)

    if attention == "varlen":  # the custom attention really ran (no silent fallback)
        assert model.config._attn_implementation == VARLEN_SDPA

    # the loss rows line up with the response tokens
    assert gather_loss_rows(weights, batch).shape == (batch.target_ids.numel(), VOCAB)


def test_padding_rows_attend_only_themselves():
    """Rows padded to the longest row: the padding tail is its own sequence, real tokens ignore it."""
    model = tiny_model("llama")
    embed = model.get_input_embeddings().weight.detach()
    examples = random_examples(5, seed=11)
    a = pack(examples, max_tokens=400, row_len="longest")
    b = pack(examples, max_tokens=400, row_len="max")
    frames = torch.randn(int(a.frame_offsets[-1]), 64)
    out = []
    for batch in (a, b):
        logits = model(**model_inputs(batch, pack_embeddings(batch.source, embed, frames))).logits
        out.append(torch.cat([logits.reshape(-1, VOCAB)[s:s + len(ex)]
                              for s, ex in zip(batch.example_starts, examples)]))
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-5)


def test_varlen_sdpa_without_packing_is_plain_causal_attention():
    """No cu_seqlens: one causal sequence per row, and one-token decoding against a cache."""
    varlen, sdpa = tiny_model("llama", attn=VARLEN_SDPA), tiny_model("llama")
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(varlen(inputs_embeds=x, use_cache=False).logits,
                               sdpa(inputs_embeds=x, use_cache=False).logits, atol=1e-5, rtol=1e-5)
    ids = torch.randint(0, VOCAB, (1, 6))
    a = varlen.generate(ids, max_new_tokens=4, do_sample=False)
    b = sdpa.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)
