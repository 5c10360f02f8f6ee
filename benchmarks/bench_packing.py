"""Packed rows vs padded batches: tokens/s and padding waste, same tiny LLM, same run.

    python -m pytest benchmarks/bench_packing.py

Examples follow a LibriSpeech-like length distribution: utterances of 1-35 s (log-normal, mean
about 12 s) given as speech frames at 12.5 Hz after the adapter, a 10-30 token prompt around them,
and a 10-100 token response. Each variant runs forward + backward of the same random Llama over
the same examples (the LLM frozen, gradients flowing into the speech frames, as in MTBI), and
the table gives real tokens per second and the share of computed positions that were padding.
Packed variants: "packed" lets transformers build the block-causal mask from the restarting
position_ids (SDPA then scores every row's full L x L), "packed-varlen" runs attention per
sequence (flash-attention-2 when installed on CUDA, else mtbi_fast's VARLEN_SDPA).
Results: benchmarks/results/packing_<device>.json and .md.
"""

from __future__ import annotations

import math
import random

import pytest
import results_table
import torch
import transformers

from mtbi_fast.attention import resolve_attn
from mtbi_fast.embeddings import pack_embeddings
from mtbi_fast.packing import Example, Speech, Text, iter_packed, model_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # the varlen kernels are half-only
N_EXAMPLES = 64 if DEVICE == "cpu" else 512
HIDDEN = 256
BATCH = 8           # padded: examples per batch
MAX_TOKENS = 640    # packed: row budget (the longest example is about 570 tokens)
ROWS = 3            # packed: rows per batch (about the same tokens per step as BATCH examples)


def librispeech_like(n, seed=0, frame_rate=12.5):
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        dur = min(35.0, max(1.0, rng.lognormvariate(math.log(10.5), 0.55)))
        frames = math.ceil(dur * frame_rate)
        pre, post = rng.randint(5, 15), rng.randint(5, 15)
        prompt = [Text(rng.randrange(1000) for _ in range(pre)), Speech(0, frames),
                  Text(rng.randrange(1000) for _ in range(post))]
        resp = [rng.randrange(1000) for _ in range(rng.randint(10, 100))]
        examples.append(Example(f"utt{i}", prompt, resp, n_frames=frames))
    return examples


@pytest.fixture(scope="module")
def setup():
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=1024,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).model.to(DEVICE, DTYPE).eval().requires_grad_(False)
    cfg_varlen = transformers.LlamaConfig(**{**cfg.to_dict(),
                                             "attn_implementation": resolve_attn("auto")})
    varlen = transformers.LlamaForCausalLM(cfg_varlen).model.to(DEVICE, DTYPE).eval().requires_grad_(False)
    varlen.load_state_dict(model.state_dict())
    examples = librispeech_like(N_EXAMPLES)
    g = torch.Generator().manual_seed(1)
    frames = [torch.randn(ex.n_frames, HIDDEN, generator=g).to(DEVICE, DTYPE) for ex in examples]
    return {"sdpa": model, "varlen": varlen}, examples, frames


@pytest.fixture(scope="module")
def packing_rows():
    rows: list[dict] = []
    yield rows
    if rows:
        columns = [("case", "case", ""), ("variant", "variant", ""), ("seconds", "time (s)", ".2f"),
                   ("tokens_per_s", "tokens/s", ".0f"), ("tokens_per_s_vs_padded", "tokens/s vs padded", ".2f"),
                   ("waste", "padding waste", ".1%"), ("steps", "steps", "d")]
        table = results_table.write(
            f"packing_{DEVICE}", "Packed rows vs padded batches, forward + backward "
            "(`python -m pytest benchmarks/bench_packing.py`)", rows, columns,
            baseline="padded", ratios=("tokens_per_s",))
        print("\n" + table)


def _embeds(ex, embed, frames):
    pieces = []
    for p in ex.prompt:
        pieces.append(embed[torch.tensor(p.ids, device=embed.device)] if isinstance(p, Text)
                      else frames[p.start:p.end])
    pieces.append(embed[torch.tensor(ex.response, device=embed.device)])
    return torch.cat(pieces)


def run_padded(model, examples, frames):
    """One epoch in batches of BATCH examples, right-padded to the longest, attention mask."""
    embed = model.embed_tokens.weight
    slots = 0
    for b in range(0, len(examples), BATCH):
        group = list(range(b, min(b + BATCH, len(examples))))
        leaves = [frames[i].detach().requires_grad_() for i in group]
        seqs = [_embeds(examples[i], embed, f) for i, f in zip(group, leaves)]
        width = max(len(s) for s in seqs)
        x = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        mask = torch.zeros(len(seqs), width, dtype=torch.long, device=x.device)
        for j, s in enumerate(seqs):
            mask[j, :len(s)] = 1
        h = model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
        loss = sum(h[j, examples[i].prompt_len - 1:len(seqs[j]) - 1].square().mean()
                   for j, i in enumerate(group))
        loss.backward()
        slots += x.shape[0] * width
    return slots, math.ceil(len(examples) / BATCH)


def run_packed(model, examples, frames):
    """One epoch of packed batches: ROWS rows of at most MAX_TOKENS, first-fit-decreasing."""
    embed = model.embed_tokens.weight
    by_id = {ex.id: i for i, ex in enumerate(examples)}
    slots = steps = 0
    for batch in iter_packed(examples, MAX_TOKENS, rows_per_batch=ROWS, buffer_size=64):
        batch = batch.to(embed.device)
        buf = torch.cat([frames[by_id[e]] for e in batch.example_ids]).requires_grad_()
        x = pack_embeddings(batch.source, embed, buf)
        kw = model_inputs(batch, x, attn_implementation=model.config._attn_implementation)
        h = model(**kw).last_hidden_state.reshape(-1, HIDDEN)
        rows = h.index_select(0, batch.loss_positions).float().square()
        # the same per-example mean as the padded variant (summed in float32: the model may be
        # bf16 on a GPU)
        per_ex = torch.zeros(len(batch.example_ids), device=h.device).index_add_(
            0, batch.loss_example, rows.mean(1))
        counts = torch.bincount(batch.loss_example, minlength=len(batch.example_ids))
        (per_ex / counts).sum().backward()
        slots += batch.source.numel()
        steps += 1
    return slots, steps


@pytest.mark.parametrize("variant", ["padded", "packed", "packed-varlen"])
def test_packing_throughput(benchmark, setup, packing_rows, variant):
    models, examples, frames = setup
    model = models["varlen" if variant == "packed-varlen" else "sdpa"]
    fn = run_padded if variant == "padded" else run_packed
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    result = {}

    def epoch():
        result["slots"], result["steps"] = fn(model, examples, frames)
        sync()

    benchmark.pedantic(epoch, rounds=3, warmup_rounds=1, iterations=1)
    real = sum(len(ex) for ex in examples)
    seconds = benchmark.stats.stats.median
    row = dict(case=f"{N_EXAMPLES} utterances, Llama h{HIDDEN}", variant=variant, device=DEVICE,
               seconds=seconds, tokens_per_s=real / seconds, waste=1 - real / result["slots"],
               steps=result["steps"], real_tokens=real, slots=result["slots"])
    benchmark.extra_info.update(row)
    packing_rows.append(row)


@pytest.fixture(scope="module")
def kernel_rows():
    rows: list[dict] = []
    yield rows
    if rows:
        columns = [("case", "case", ""), ("variant", "backend", ""), ("seconds", "fwd+bwd (ms)", ".3f"),
                   ("seconds_vs_eager", "time / eager", ".2f"), ("gbps", "GB/s moved", ".0f")]
        for r in rows:
            r["seconds"] *= 1e3
        print("\n" + results_table.write(
            f"pack_kernel_{DEVICE}", "Packed inputs_embeds build + backward "
            "(`python -m pytest benchmarks/bench_packing.py -k kernel`)", rows, columns,
            baseline="eager", ratios=("seconds",)))


@pytest.mark.skipif(DEVICE != "cuda", reason="the Triton packing kernel is timed on a GPU only")
@pytest.mark.parametrize("backend", ["eager", "torch", "triton"])
def test_pack_kernel(benchmark, kernel_rows, backend):
    """64k packed positions (60% speech frames), H=4096 bf16, frozen 152k-row embedding table."""
    n, h, v, f = 65536, 4096, 151936, 40000
    g = torch.Generator(device="cuda").manual_seed(0)
    emb = torch.randn(v, h, device="cuda", dtype=torch.bfloat16)
    frames = torch.randn(f, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    src = torch.randint(0, v, (n,), device="cuda", generator=g)
    pos = torch.randperm(n, device="cuda", generator=g)[:f]
    src[pos] = -torch.arange(f, device="cuda") - 1
    grad = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)

    def step():
        frames.grad = None
        pack_embeddings(src, emb, frames, backend=backend).backward(grad)
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)
    sec = benchmark.stats.stats.median
    moved = 2 * (2 * n * h * 2)  # read rows + write out, read grad + write frame grads (bf16)
    kernel_rows.append(dict(case=f"N={n} H={h} bf16", variant=backend, device=DEVICE,
                            seconds=sec, gbps=moved / sec / 1e9))
