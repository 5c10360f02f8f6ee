"""mtbi_fast/flops.py against independent references: torch's FlopCounterMode around the real
forward and backward of configs/tiny.yaml models, and hand counts.

FlopCounterMode counts matmul/addmm/bmm/convolution FLOPs as they run. It is run with SDPA on its
math path, so that attention shows as the bmm's it is (the CPU's fused SDPA kernel has no FLOP
formula; a GPU kernel's would count the backward as 2.5x forward, recomputation included). Where
its conventions differ from the model FLOPs the tests say so and account for it exactly:

- it counts every slot of a padded batch: the tests build padding-free batches (one row, clips of
  one length), or compare against the padded slots;
- a causal attention runs (and is counted) as its full n x n square: model FLOPs count the
  n(n + 1) / 2 causal pairs, so the n(n - 1) / 2 masked pairs per example are added back;
- it counts the loss's row-wise dot products (a batched GEMV, not a GEMM through the head):
  measured on the loss alone and added back.
"""

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mtbi_fast.flops import PEAK_TFLOPS, mfu, peak_tflops, step_flops
from mtbi_fast.loss import ImitationLoss
from mtbi_fast.model import ModelConfig, SpeechLLM
from mtbi_fast.packing import Example, Speech, Text, pack

from helpers import ROOT

LINEAR = ("aten.mm", "aten.addmm")
# the tiny LLM (hub.TINY_LLM): hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 kv heads
TINY_DECODER = 2 * (2 * 64 * 64 + 2 * 64 * 2 * 16 + 3 * 64 * 128)  # q, o; k, v; gated MLP
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def tiny(**overrides) -> SpeechLLM:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]
    cfg.update(overrides)
    return SpeechLLM.from_config(ModelConfig.from_dict(cfg))


@pytest.fixture(scope="module")
def model():
    return tiny()


def counted(fn):
    """``fn()``'s result and the FLOPs FlopCounterMode saw while it ran, by op name."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        out = fn()
    return out, {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}


def examples(model, mel_lengths):
    """One speech student example per clip (text, the clip's frames, text; a response) and its
    text teacher (a transcript instead of the frames; the same response)."""
    students, teachers = [], []
    for i, t in enumerate(mel_lengths):
        f = model.adapter.n_frames(model.front.frames(t))
        response = list(range(10, 14 + i))
        students.append(Example(f"u{i}", [Text([1 + i, 2, 3]), Speech(0, f), Text([4])], response,
                                n_frames=f))
        teachers.append(Example(f"u{i}", [Text([1 + i, 2, 3] + list(range(20, 25 + 2 * i)))], response))
    return students, teachers


def masked_pairs(exs) -> int:
    """Pairs a causal attention masks out, summed over the examples: n(n - 1) / 2 each."""
    return sum(len(ex) * (len(ex) - 1) // 2 for ex in exs)


def attention_per_pair(model) -> int:
    """Forward FLOPs of one query-key pair in all layers: QK^T and PV, 2 x 2 x heads x head_dim."""
    cfg = model.llm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 4 * cfg.num_attention_heads * head_dim * cfg.num_hidden_layers


# --- the whole step ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, online", [
    ({}, True),
    ({"adapter": {"kind": "conv", "stride": 4}, "train_encoder_layers": 1}, False),
    ({"llm": {"tiny": {"model_type": "qwen2"}}, "lora": LORA}, True),
], ids=["stack-online", "conv-trained-encoder-cached", "qwen2-lora-online"])
def test_step_matches_flop_counter(overrides, online):
    """The real step (speech_frames, the model's forward with its teacher, backward) under
    FlopCounterMode: its count is the total plus the masked attention pairs it computes and the
    loss's row-wise dot products (module docstring), exactly."""
    if "lora" in overrides:
        pytest.importorskip("peft")
    m = tiny(**overrides)
    mels = [torch.randn(80, 97), torch.randn(80, 97)]  # one length: the convolutions pad nothing
    students, teachers = examples(m, [97, 97])
    student, teacher = pack(students, 256), pack(teachers, 256)
    assert student.rows == teacher.rows == 1 and student.n_tokens == student.source.numel()
    cached = None if online else m.teacher_states(teacher)

    def step():
        frames = m.speech_frames(mels)
        kw = dict(teacher=teacher) if online else dict(teacher_hidden=cached)
        m(student, frames, **kw)["loss"].backward()

    _, seen = counted(step)
    parts = step_flops(m, student, teacher if online else None, feature_lengths=[97, 97])
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert (parts["teacher"] > 0) == online and parts["llm_backward"] > 0
    masked = 3 * masked_pairs(students) + (masked_pairs(teachers) if online else 0)
    rows = student.target_ids.numel()
    assert sum(seen.values()) == parts["total"] + attention_per_pair(m) * masked + loss_extras(m, rows)


def loss_extras(model, rows) -> int:
    """FLOPs FlopCounterMode counts in the loss besides its GEMMs through the head."""
    h = torch.randn(rows, model.hidden_size, requires_grad=True)
    head = model.llm.get_output_embeddings().weight
    _, seen = counted(lambda: model.loss_fn(h, torch.randn_like(h), head,
                                            torch.arange(rows)).backward())
    return sum(n for op, n in seen.items() if op not in LINEAR)


# --- the parts --------------------------------------------------------------------------------

@pytest.mark.parametrize("llm, lora", [
    ({"model_type": "llama"}, None),
    ({"model_type": "qwen2"}, None),
    ({"model_type": "qwen3"}, None),                               # head_dim from the config
    ({"model_type": "gpt_neox", "num_key_value_heads": 4}, None),  # a non-gated MLP
    ({"model_type": "llama"}, LORA),
], ids=["llama", "qwen2", "qwen3", "gpt_neox", "llama-lora"])
def test_llm_linear_layers_match_flop_counter(llm, lora):
    """The LLM decoder's matmuls, forward and backward counted apart, on a padding-free batch
    (exact) and on a padded one (FlopCounterMode counts every padded slot)."""
    if lora:
        pytest.importorskip("peft")
    m = tiny(llm={"tiny": llm}, lora=lora)
    students, _ = examples(m, [96, 41])
    for batch in (pack(students, 256), pack(students, 40, row_len="max")):
        frames = torch.randn(int(batch.frame_offsets[-1]), m.hidden_size, requires_grad=True)
        h, forward = counted(lambda: m.loss_states(batch, frames))
        _, backward = counted(lambda: (h * torch.randn_like(h)).sum().backward())
        parts = step_flops(m, batch, feature_lengths=[96, 41])
        slots = batch.source.numel()
        assert sum(forward[op] for op in LINEAR if op in forward) * batch.n_tokens \
            == parts["llm_forward"] * slots
        assert sum(backward[op] for op in LINEAR if op in backward) * batch.n_tokens \
            == parts["llm_backward"] * slots
    assert slots > batch.n_tokens  # the second batch is padded
    if lora:  # LoRA: weight and activation gradients in backward, twice its forward
        assert parts["llm_backward"] > parts["llm_forward"]
    else:
        assert parts["llm_backward"] == parts["llm_forward"]


def test_llama_decoder_parameters_by_hand(model):
    students, _ = examples(model, [96])
    batch = pack(students, 256)
    assert step_flops(model, batch)["llm_forward"] == 2 * TINY_DECODER * batch.n_tokens


def test_causal_attention_by_hand(model):
    """Two text examples of 5 and 9 tokens, packed three ways (one row; a padding tail; two rows,
    one padded): the same causal count, from the examples alone. Per layer and pair: 2 matmuls x
    2 FLOPs x 4 heads x 16 = 256; 2 layers; 5 * 6 / 2 + 9 * 10 / 2 = 60 pairs."""
    exs = [Example("a", [Text([1, 2])], [3, 4, 5]), Example("b", [Text([6, 7, 8, 9])], [10] * 5)]
    forward = 256 * 2 * 60
    for batch in (pack(exs, 16), pack(exs, 16, row_len="max"), pack(exs, 9)):
        parts = step_flops(model, batch, teacher=batch)
        assert parts["attention"] == 3 * forward == 92160
        assert parts["teacher"] == 2 * TINY_DECODER * 14 + forward  # a forward of 14 real tokens
        assert parts["encoder"] == parts["adapter"] == 0  # no speech


@pytest.mark.parametrize("trained", [0, 1, 2])
def test_encoder_matches_flop_counter(trained):
    """The Whisper encoder on each clip alone (odd and even lengths), forward, and backward
    through its trained top layers: exactly what FlopCounterMode counts (non-causal attention
    runs its full square)."""
    m = tiny(train_encoder_layers=trained)
    lengths = [97, 150]
    total = 0
    for t in lengths:
        states, seen = counted(lambda: m.encoder([torch.randn(80, t)])[0])
        total += sum(seen.values())
        if trained:
            _, seen = counted(lambda: states.sum().backward())
            total += sum(seen.values())
    students, _ = examples(m, lengths)
    assert step_flops(m, pack(students, 256), feature_lengths=lengths)["encoder"] == total


def test_mel_frames_derived_from_the_batch(model):
    """Without mel_frames, each example is a clip of 2 x stride x F mel frames: exact for clips
    whose length is a multiple of 8 (stride 4), and an upper bound otherwise."""
    students, _ = examples(model, [96, 160])
    batch = pack(students, 256)
    assert step_flops(model, batch) == step_flops(model, batch, feature_lengths=[96, 160])
    students, _ = examples(model, [97, 150])
    batch = pack(students, 256)
    assert step_flops(model, batch)["encoder"] > step_flops(model, batch, feature_lengths=[97, 150])["encoder"]


@pytest.mark.parametrize("kind", ["stack", "conv"])
@pytest.mark.parametrize("trained", [0, 1])
def test_adapter_matches_flop_counter(kind, trained):
    """The adapter forward and backward on one clip of 49 encoder frames (13 LLM frames); with a
    frozen encoder its first matmul forms no input gradient."""
    m = tiny(adapter={"kind": kind, "stride": 4}, train_encoder_layers=trained)
    x = torch.randn(49, m.encoder.d_model, requires_grad=bool(trained))
    out, forward = counted(lambda: m.adapter(x))
    _, backward = counted(lambda: out.sum().backward())
    students, _ = examples(m, [97])  # 97 mel frames -> 49 encoder frames -> 13
    batch = pack(students, 256)
    assert out.shape[0] == int(batch.frame_offsets[-1]) == 13
    assert step_flops(m, batch)["adapter"] == sum(forward.values()) + sum(backward.values())


@pytest.mark.parametrize("head_trained", [False, True])
def test_loss_matches_flop_counter(head_trained):
    """The loss's GEMMs through the head: 6 M H V (student and teacher logits, G @ W) with the
    configured backend; a trained head adds G^T @ h (eager backend: autograd forms it)."""
    m = tiny()
    head = m.llm.get_output_embeddings().weight
    head.requires_grad_(head_trained)
    students, _ = examples(m, [96, 41])
    batch = pack(students, 256)
    rows = batch.target_ids.numel()
    h = torch.randn(rows, m.hidden_size, requires_grad=True)
    loss_fn = ImitationLoss(backend="eager") if head_trained else m.loss_fn
    _, seen = counted(lambda: loss_fn(h, torch.randn_like(h), head, batch.target_ids).backward())
    gemms = sum(seen[op] for op in LINEAR if op in seen)
    assert step_flops(m, batch)["loss"] == gemms == (8 if head_trained else 6) * rows * 64 * 512


# --- peak and MFU -----------------------------------------------------------------------------

def test_peak_override_wins_and_is_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_tflops("cuda", override=500) == (500.0, "config")
    assert peak_tflops("cpu", override=123.5) == (123.5, "config")
    for bad in (0, -1.0, float("nan"), True, "989"):
        with pytest.raises(ValueError, match="peak_tflops must be a positive number of TFLOP/s"):
            peak_tflops("cuda", override=bad)


def test_peak_unknown_is_none_with_a_message(monkeypatch):
    assert peak_tflops("cpu") == (None, "unknown: cpu; set train.peak_tflops")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
    assert peak_tflops("cuda") == (None, "unknown: NVIDIA A10G; set train.peak_tflops")


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.4),
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.05),
    ("NVIDIA L4", 121.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA B200", 2250.0),
    ("NVIDIA GeForce RTX 4090", 165.2),
])
def test_peak_table_lookup(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda", 0)) == (peak, f"table: {name}")
    assert all(k == k.lower() for k in PEAK_TFLOPS)


def test_mfu_by_hand():
    # 1.5e15 FLOPs in 2 s = 750 TFLOP/s, three quarters of a 1000 TFLOP/s card
    assert mfu(1.5e15, 2.0, 1000.0) == pytest.approx((750.0, 0.75))
    assert mfu(1.5e15, 2.0, None) == pytest.approx((750.0, None))
    with pytest.raises(ValueError, match="seconds must be > 0"):
        mfu(1.0, 0.0, 1000.0)
    with pytest.raises(ValueError, match="peak must be > 0"):
        mfu(1.0, 1.0, 0.0)
