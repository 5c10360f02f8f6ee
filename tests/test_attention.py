"""mtbi_fast/attention.py: the packed-sequence attention implementations.

On CPU: the glue around torch's varlen kernel (layout, GQA, scale, cu_seqlens, each known
signature) with the CUDA-only kernel replaced by a per-sequence SDPA reference, the fallbacks,
and what ``resolve_attn("auto")`` picks. On a CUDA GPU: every implementation available there,
packed against each example alone, judged against float64 (err <= 2 * plain SDPA's err + atol).
"""

import importlib.util
import inspect

import pytest
import torch
from helpers import VOCAB, random_examples, run_alone, run_packed, tiny_model

import mtbi_fast.attention as attention
from mtbi_fast.attention import (TORCH_VARLEN, VARLEN_SDPA, VarlenKernel, flash_attn_available,
                                 padded_attention, resolve_attn, torch_varlen_available,
                                 torch_varlen_attention, varlen_sdpa_attention)
from mtbi_fast.packing import pack

# ---- a reference for torch's varlen_attn, in each known signature ----------------------------------


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal, scale, gqa):
    """Per-sequence SDPA over packed [T, heads, d] tensors; checks what the kernel would need."""
    assert query.dim() == key.dim() == value.dim() == 3 and query.is_contiguous()
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    assert max_q == max_k == int(cu_seq_q.diff().max()) and int(cu_seq_q[-1]) == query.shape[0]
    assert gqa or key.shape[1] == query.shape[1]
    bounds = cu_seq_q.tolist()
    return torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            query[a:b].transpose(0, 1), key[a:b].transpose(0, 1), value[a:b].transpose(0, 1),
            is_causal=causal, scale=scale, enable_gqa=gqa).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:])])


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                     return_aux=None):
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None, False)


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                     scale=None, window_size=(-1, -1)):
    assert window_size in ((-1, -1), (-1, 0))
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                            window_size == (-1, 0), scale, False)


def varlen_attn_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                     scale=None, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
                     block_table=None, num_splits=None):
    assert window_size in ((-1, -1), (-1, 0))
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                            window_size == (-1, 0), scale, enable_gqa)


SIGNATURES = [varlen_attn_2_10, varlen_attn_2_11, varlen_attn_2_12]


def cpu_kernel(varlen_attn, calls):
    """A VarlenKernel that runs ``varlen_attn`` on CPU float32 tensors and counts its calls."""
    def counted(*args, **kw):
        calls.append(kw)
        return varlen_attn(*args, **kw)

    counted.__signature__ = inspect.signature(varlen_attn)
    return VarlenKernel(counted, device_type="cpu", dtypes=(torch.float32,))


def test_installed_torch_varlen_signature_is_known():
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        pytest.skip("this torch has no torch.nn.attention.varlen (torch < 2.10)")
    kernel = attention.TORCH_VARLEN_KERNEL
    assert kernel is not None
    from torch.nn.attention.varlen import varlen_attn

    assert kernel.varlen_attn is varlen_attn and kernel.device_type == "cuda"


def test_unknown_signature_is_a_type_error():
    with pytest.raises(TypeError, match="neither window_size nor is_causal"):
        VarlenKernel(lambda q, k, v, cu_q, cu_k, max_q, max_k: q)


@pytest.mark.parametrize("varlen_attn", SIGNATURES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_torch_varlen_glue_matches_per_sequence_sdpa(monkeypatch, varlen_attn, scaling):
    """[R, h, L, d] in, [R, L, h, d] out, GQA (4 query heads on 2 key/value heads), a scale, and
    sequences of different lengths (one of length 1, a padding tail) across two rows."""
    calls = []
    monkeypatch.setattr(attention, "TORCH_VARLEN_KERNEL", cpu_kernel(varlen_attn, calls))
    g = torch.Generator().manual_seed(0)
    rows, length, dim = 2, 13, 8
    q = torch.randn(rows, 4, length, dim, generator=g, requires_grad=True)
    k = torch.randn(rows, 2, length, dim, generator=g, requires_grad=True)
    v = torch.randn(rows, 2, length, dim, generator=g, requires_grad=True)
    cu = torch.tensor([0, 5, 6, 13, 20, 26], dtype=torch.int32)  # row 2: 7 + 6 + a padding tail
    module = torch.nn.Module().eval()
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)

    out, _ = torch_varlen_attention(module, q, k, v, scaling=scaling, **kw)
    assert len(calls) == 1 and out.shape == (rows, length, 4, dim)
    expected, _ = varlen_sdpa_attention(module, q, k, v, scaling=scaling, **kw)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    grad = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("varlen_attn", SIGNATURES, ids=lambda f: f.__name__)
def test_torch_varlen_packed_model_matches_each_example_alone(monkeypatch, family, varlen_attn):
    calls = []
    monkeypatch.setattr(attention, "TORCH_VARLEN_KERNEL", cpu_kernel(varlen_attn, calls))
    model = tiny_model(family, attn=TORCH_VARLEN)
    examples = random_examples(9, seed=3)
    batch = pack(examples, max_tokens=max(map(len, examples)) + 30)
    assert batch.rows >= 2 and len(examples) > batch.rows
    frames = torch.randn(int(batch.frame_offsets[-1]), 64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(batch.source.numel(), VOCAB, generator=torch.Generator().manual_seed(2))

    packed, packed_grad = run_packed(model, batch, examples, frames, weights)
    assert len(calls) == model.config.num_hidden_layers  # the kernel ran in every layer
    alone, alone_grad = run_alone(model, batch, examples, frames, weights)  # unpacked: plain SDPA
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_grad, alone_grad, atol=1e-5, rtol=1e-4)


def test_torch_varlen_on_cpu_is_varlen_sdpa():
    """The real kernel is CUDA-only: on CPU TORCH_VARLEN runs the per-sequence SDPA, unpacked
    rows and decoding included."""
    torch_varlen, varlen_sdpa = tiny_model("llama", attn=TORCH_VARLEN), tiny_model("llama", attn=VARLEN_SDPA)
    examples = random_examples(5, seed=4)
    batch = pack(examples, max_tokens=max(map(len, examples)) + 20)
    frames = torch.randn(int(batch.frame_offsets[-1]), 64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(batch.source.numel(), VOCAB, generator=torch.Generator().manual_seed(2))
    a = run_packed(torch_varlen, batch, examples, frames, weights)
    b = run_packed(varlen_sdpa, batch, examples, frames, weights)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    ids = torch.randint(0, VOCAB, (1, 6))
    assert torch.equal(torch_varlen.generate(ids, max_new_tokens=4, do_sample=False),
                       varlen_sdpa.generate(ids, max_new_tokens=4, do_sample=False))
    with padded_attention(torch_varlen) as llm:  # left-padded generation gets a padding mask
        assert llm.config._attn_implementation == "sdpa"
    assert torch_varlen.config._attn_implementation == TORCH_VARLEN


@pytest.mark.parametrize("cuda, flash_attn, kernel, capability, expected", [
    (False, True, True, (9, 0), VARLEN_SDPA),
    (True, True, True, (9, 0), "flash_attention_2"),
    (True, False, True, (9, 0), TORCH_VARLEN),
    (True, False, True, (7, 5), VARLEN_SDPA),
    (True, False, False, (9, 0), VARLEN_SDPA),
])
def test_resolve_attn_auto(monkeypatch, cuda, flash_attn, kernel, capability, expected):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        (object() if flash_attn else None) if name == "flash_attn" else real_find_spec(name, *a)))
    monkeypatch.setattr(attention, "TORCH_VARLEN_KERNEL",
                        VarlenKernel(varlen_attn_2_12) if kernel else None)
    assert resolve_attn("auto") == expected
    for name in ("sdpa", "eager", VARLEN_SDPA, TORCH_VARLEN, "flash_attention_2"):
        assert resolve_attn(name) == name


# ---- CUDA: every implementation on this machine, packed vs each example alone ---------------------

CUDA_IMPLEMENTATIONS = ["sdpa", VARLEN_SDPA, TORCH_VARLEN, "flash_attention_2"]


def _available(impl):
    if impl == TORCH_VARLEN:
        return torch_varlen_available()
    if impl == "flash_attention_2":
        return flash_attn_available()
    return True


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("impl", CUDA_IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cuda_packed_matches_each_example_alone(monkeypatch, family, impl, dtype):
    """Each example's logits and the frames' gradient from the packed run (``impl``: "sdpa" with
    restarting position_ids, the others with cu_seqlens) against float64 math on the same
    (rounded) weights and inputs: within twice plain SDPA's error on each example alone, at the
    same dtype, plus a small atol."""
    if not _available(impl):
        pytest.skip(f"{impl} is not available on this machine")
    if impl == "flash_attention_2" and dtype == torch.float32:
        pytest.skip("flash-attn runs fp16/bf16 only")
    calls = []
    if impl == TORCH_VARLEN:  # count the kernel's calls: no silent fallback in half precision
        kernel = attention.TORCH_VARLEN_KERNEL
        real = kernel.varlen_attn
        monkeypatch.setattr(kernel, "varlen_attn", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    dev = torch.device("cuda")
    examples = random_examples(12, seed=5, max_frames=150)  # up to ~200 tokens: several tiles
    batch = pack(examples, max_tokens=max(map(len, examples)) + 60)
    assert batch.rows >= 2 and len(examples) > batch.rows
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(int(batch.frame_offsets[-1]), 64, generator=g).to(dev, dtype)
    weights = torch.randn(batch.source.numel(), VOCAB, generator=g).to(dev)

    model = tiny_model(family, attn=impl).to(dev, dtype)
    packed, packed_grad = run_packed(model, batch.to(dev), examples, frames, weights)
    if impl == TORCH_VARLEN:
        assert len(calls) == (model.config.num_hidden_layers if dtype != torch.float32 else 0)
    plain = tiny_model(family, attn="sdpa").to(dev, dtype)
    base, base_grad = run_alone(plain, batch, examples, frames, weights)
    ref, ref_grad = run_alone(plain.double(), batch, examples, frames.double(), weights)

    atol = 1e-5 if dtype == torch.float32 else 1e-3
    for got, want, reference in ((packed, base, ref), (packed_grad, base_grad, ref_grad)):
        err = (got.double() - reference).abs().max().item()
        base_err = (want.double() - reference).abs().max().item()
        assert err <= 2 * base_err + atol, f"{impl} {dtype}: {err:.3g} vs plain SDPA {base_err:.3g}"
