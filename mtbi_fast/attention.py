"""Attention implementations for packed rows, registered with transformers.

A packed row (``mtbi_fast.packing``) holds several examples back to back, and attention must never
cross examples. transformers' own "sdpa" does that from restarting ``position_ids`` by building a
block-causal mask (every row's full L x L scores); its "flash_attention_2" runs flash-attn's varlen
kernel from the batch's ``cu_seqlens``. flash-attn has no wheels and takes hours to build, so this
module registers two more implementations that take the same ``cu_seq_lens_q`` / ``max_length_q``
keywords (``packing.model_inputs(..., attention="varlen")``) and build no mask:

- ``TORCH_VARLEN``: PyTorch's own varlen flash kernel (``torch.nn.attention.varlen.varlen_attn``,
  torch >= 2.10, CUDA, fp16/bf16). Where that kernel does not run (CPU, float32, dropout while
  training, an older torch), it runs ``VARLEN_SDPA``.
- ``VARLEN_SDPA``: SDPA on each packed sequence on its own; any device and dtype.

``resolve_attn("auto")`` picks flash-attention-2, else ``TORCH_VARLEN``, else ``VARLEN_SDPA``.
Without ``cu_seq_lens_q`` both treat each row as one causal sequence (right padding only: they build
no padding mask; ``padded_attention`` switches to SDPA for left-padded generation) or decode one
query against the cached keys.

Both follow the module's ``is_causal`` (True when it has none): the Whisper encoder's
self-attention is not causal, and ``SpeechEncoder`` runs it through them over its clips packed
back to back (no padding, no mask). ``model_inputs`` also passes the sequence bounds as host ints
(``mtbi_bounds``), so that the per-sequence SDPA path reads nothing back from the GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect

import torch

VARLEN_SDPA = "mtbi_varlen_sdpa"
TORCH_VARLEN = "mtbi_torch_varlen"
REGISTERED = (VARLEN_SDPA, TORCH_VARLEN)  # registered here; no padding mask
VARLEN_IMPLEMENTATIONS = ("flash_attention_2", *REGISTERED)  # take the packed batch's cu_seqlens


def resolve_attn(attn_implementation: str) -> str:
    """"auto": the fastest attention here that keeps packed examples apart at no extra cost:
    flash-attention-2 (flash-attn installed, CUDA), else torch's own varlen kernel
    (``TORCH_VARLEN``: torch >= 2.10, an sm80+ GPU), else SDPA per packed sequence
    (``VARLEN_SDPA``). Other names are returned as they are."""
    if attn_implementation != "auto":
        return attn_implementation
    if flash_attn_available():
        return "flash_attention_2"
    if torch_varlen_available():
        return TORCH_VARLEN
    return VARLEN_SDPA


@contextlib.contextmanager
def padded_attention(llm):
    """Plain SDPA while running padded batches (generation with left padding): VARLEN_SDPA and
    TORCH_VARLEN keep packed sequences apart through cu_seqlens and build no padding mask."""
    current = llm.config._attn_implementation
    if current not in REGISTERED:
        yield llm
        return
    llm.set_attn_implementation("sdpa")
    try:
        yield llm
    finally:
        llm.set_attn_implementation(current)


def torch_varlen_attention(module, query, key, value, attention_mask=None, dropout=0.0,
                           scaling=None, **kwargs):
    """A transformers attention function (registered as ``TORCH_VARLEN``): torch's causal varlen
    kernel over the packed R * L stream, from ``cu_seq_lens_q`` and ``max_length_q``; where the
    kernel does not run (``VarlenKernel.accepts``, dropout while training, no ``cu_seq_lens_q``),
    ``varlen_sdpa_attention``.

    query [R, heads, L, d], key/value [R, kv_heads, L, d] -> ([R, L, heads, d], None).
    """
    cu = kwargs.get("cu_seq_lens_q")
    kernel = TORCH_VARLEN_KERNEL
    if (cu is None or kernel is None or not kernel.accepts(query)
            or (dropout and module.training)):
        return varlen_sdpa_attention(module, query, key, value, attention_mask, dropout, scaling,
                                     **kwargs)
    rows, heads, length, dim = query.shape
    q, k, v = (x.transpose(1, 2).reshape(rows * length, x.shape[1], dim)
               for x in (query, key, value))  # [R, h, L, d] -> [R * L, h, d]
    out = kernel(q, k, v, cu, kwargs["max_length_q"], scaling, causal=_causal(module))
    return out.reshape(rows, length, heads, dim), None


def varlen_sdpa_attention(module, query, key, value, attention_mask=None, dropout=0.0,
                          scaling=None, **kwargs):
    """A transformers attention function (registered as ``VARLEN_SDPA``): causal SDPA run on each
    packed sequence separately, from ``cu_seq_lens_q`` over the flat R * L stream. It needs no
    mask and spends nothing across examples; any device and dtype.

    query [R, heads, L, d], key/value [R, kv_heads, L, d] -> ([R, L, heads, d], None).
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # not packed: each row is one causal sequence (right padding only), or decoding
        return _plain_sdpa(module, query, key, value, dropout, scaling, attention_mask)
    rows, heads, length, dim = query.shape

    def flat(x):  # [R, h, L, d] -> [h, R * L, d]; sequences never straddle rows
        return x.transpose(0, 1).reshape(x.shape[1], rows * length, dim)

    q, k, v = (_sdpa_dtype(flat(x)) for x in (query, key, value))
    bounds = kwargs.get("mtbi_bounds")
    if bounds is None:  # (a host sync on a GPU; model_inputs passes the bounds as host ints)
        bounds = cu.tolist()
    causal = _causal(module)
    out = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            q[:, a:b], k[:, a:b], v[:, a:b], is_causal=causal, scale=scaling,
            dropout_p=dropout if module.training else 0.0, enable_gqa=k.shape[0] != heads)
        for a, b in zip(bounds[:-1], bounds[1:])], dim=1).to(query.dtype)
    return out.reshape(heads, rows, length, dim).permute(1, 2, 0, 3).contiguous(), None


class VarlenKernel:
    """torch's ``varlen_attn`` as a causal kernel over packed [T, heads, d] tensors, whatever the
    keywords of this torch version, and where it runs (``accepts``: ``device_type``, ``dtypes``).

    Signatures known: torch 2.10 (``is_causal``, no ``scale``), torch 2.11 (keyword-only ``scale``
    and ``window_size``, causal being ``window_size=(-1, 0)``), torch 2.12+ (adds ``enable_gqa``).
    Without ``enable_gqa`` grouped key/value heads are repeated; without ``scale`` a scale other
    than the default 1/sqrt(d) is folded into the queries. An unknown signature is a TypeError.
    """

    def __init__(self, varlen_attn, device_type: str = "cuda",
                 dtypes: tuple = (torch.float16, torch.bfloat16)):
        params = inspect.signature(varlen_attn).parameters
        if "window_size" in params:
            self.causal, self.full = {"window_size": (-1, 0)}, {"window_size": (-1, -1)}
        elif "is_causal" in params:
            self.causal, self.full = {"is_causal": True}, {"is_causal": False}
        else:
            raise TypeError(f"varlen_attn{inspect.signature(varlen_attn)} has neither window_size "
                            "nor is_causal")
        self.varlen_attn = varlen_attn
        self.takes_scale = "scale" in params
        self.takes_gqa = "enable_gqa" in params
        self.device_type, self.dtypes = device_type, dtypes

    def accepts(self, query: torch.Tensor) -> bool:
        return query.device.type == self.device_type and query.dtype in self.dtypes

    def __call__(self, q, k, v, cu_seqlens, max_seqlen: int, scale: float | None = None,
                 causal: bool = True):
        """q [T, heads, d], k/v [T, kv_heads, d], ``cu_seqlens`` int32 [S + 1] -> [T, heads, d];
        ``causal`` False: each sequence attends to all of itself (an encoder)."""
        kw = dict(self.causal if causal else self.full)
        groups = q.shape[1] // k.shape[1]
        if groups > 1 and self.takes_gqa:
            kw["enable_gqa"] = True
        elif groups > 1:
            k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
        if self.takes_scale:
            kw["scale"] = scale
        elif scale is not None and scale != q.shape[-1] ** -0.5:
            q = q * (scale * q.shape[-1] ** 0.5)
        return self.varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)


def torch_varlen_available() -> bool:
    """torch has a varlen kernel with a known signature, and a CUDA GPU it runs on (sm80+)."""
    return (TORCH_VARLEN_KERNEL is not None and torch.cuda.is_available()
            and torch.cuda.get_device_capability() >= (8, 0))


def flash_attn_available() -> bool:
    """flash-attn is installed and there is a CUDA GPU (transformers' "flash_attention_2")."""
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def _sdpa_dtype(x: torch.Tensor) -> torch.Tensor:
    """CPU SDPA in half precision runs about 2x slower than in float32 (measured on an AVX512-BF16
    EPYC, forward and backward): upcast there; keep the dtype on GPUs."""
    return x.float() if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) else x


def _plain_sdpa(module, query, key, value, dropout, scaling, attention_mask=None):
    q_len, k_len = query.shape[2], key.shape[2]
    if not _causal(module):  # an encoder's self-attention over whole rows (a padding mask taken)
        q = _sdpa_dtype(query)
        mask = attention_mask.to(q.dtype) if attention_mask is not None and attention_mask.is_floating_point() \
            else attention_mask
        out = torch.nn.functional.scaled_dot_product_attention(
            q, _sdpa_dtype(key), _sdpa_dtype(value), attn_mask=mask, scale=scaling,
            dropout_p=dropout if module.training else 0.0,
            enable_gqa=key.shape[1] != query.shape[1]).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None
    if q_len != k_len and q_len != 1:
        raise ValueError(f"{q_len} queries against {k_len} cached keys is not supported by "
                         f"{VARLEN_SDPA} or {TORCH_VARLEN}; use attn_implementation='sdpa' for "
                         "chunked prefill")
    out = torch.nn.functional.scaled_dot_product_attention(
        _sdpa_dtype(query), _sdpa_dtype(key), _sdpa_dtype(value), is_causal=q_len == k_len and q_len > 1,
        scale=scaling, dropout_p=dropout if module.training else 0.0,
        enable_gqa=key.shape[1] != query.shape[1]).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _causal(module) -> bool:
    """Whether the attention module is causal (a decoder's are; Whisper's encoder's are not)."""
    return bool(getattr(module, "is_causal", True))


def _torch_varlen_kernel() -> VarlenKernel | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    try:
        return VarlenKernel(varlen_attn)
    except TypeError:  # a signature this module does not know: VARLEN_SDPA instead
        return None


TORCH_VARLEN_KERNEL = _torch_varlen_kernel()  # None where torch has no usable varlen_attn


def _register():
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionInterface.register(TORCH_VARLEN, torch_varlen_attention)


_register()
