"""Packing interleaved speech/text examples into dense rows for varlen attention.

An ``Example`` is a prompt (a list of ``Text`` token runs and ``Speech`` frame ranges, in order)
followed by a response (token ids, with an optional per-token loss mask). ``pack`` bins examples
into rows of at most ``max_tokens`` by first-fit-decreasing and returns a ``PackedBatch``:

- ``source`` [R * L] int64: for each packed position, a text token id (``>= 0``) or a speech
  frame ``-(index + 1)`` into the batch's frame buffer (the examples' frames concatenated in input
  order, ``frame_offsets``); ``embeddings.pack_embeddings`` turns it into ``inputs_embeds``;
- ``position_ids`` [R, L] restarting at 0 for every example (and for each row's padding tail);
- ``cu_seqlens`` (int32, one entry per sequence + 1, over the flat R * L stream) and
  ``max_seqlen`` for flash-attn varlen kernels;
- ``loss_positions`` / ``target_ids`` [M]: the flat positions whose next token is a counted
  response token, listed in input-example order, so that a student batch and a teacher batch of the
  same examples line up row for row for the imitation loss.

Attention never crosses examples: ``model_inputs`` gives the keyword arguments for a transformers
causal LM: restarting ``position_ids`` with no attention mask and no cache (transformers 5 turns
them into a block-causal mask for SDPA and eager attention), an explicit block-diagonal causal
mask, or the ``cu_seqlens`` for the varlen implementations (flash-attention-2, and
``TORCH_VARLEN`` / ``VARLEN_SDPA`` of ``mtbi_fast.attention``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from .attention import REGISTERED, VARLEN_IMPLEMENTATIONS


@dataclass(frozen=True)
class Text:
    """A run of text token ids in a prompt."""

    ids: tuple[int, ...]

    def __init__(self, ids: Iterable[int]):
        object.__setattr__(self, "ids", tuple(int(i) for i in ids))

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Speech:
    """Speech frames ``[start, end)`` of the example's own frame sequence (adapter output)."""

    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class Example:
    """One training example: ``prompt`` parts then ``response`` tokens.

    ``n_frames`` is the length of the example's frame sequence (what it adds to the batch's frame
    buffer; defaults to the largest frame index its speech parts use). ``response_mask`` marks the
    response tokens the loss counts (default: all).
    """

    id: str
    prompt: list
    response: list[int]
    response_mask: list[bool] | None = None
    n_frames: int | None = None

    def __post_init__(self):
        for i, part in enumerate(self.prompt):
            if not isinstance(part, (Text, Speech)):
                raise TypeError(f"example {self.id!r}: prompt part {i} is {type(part).__name__}, "
                                "expected Text or Speech")
            if isinstance(part, Speech) and not 0 <= part.start <= part.end:
                raise ValueError(f"example {self.id!r}: prompt part {i} has a bad frame range "
                                 f"[{part.start}, {part.end})")
        used = max((p.end for p in self.prompt if isinstance(p, Speech)), default=0)
        if self.n_frames is None:
            self.n_frames = used
        elif used > self.n_frames:
            raise ValueError(f"example {self.id!r}: speech parts use frame {used - 1} but the "
                             f"example has {self.n_frames} frames")
        if self.response_mask is not None and len(self.response_mask) != len(self.response):
            raise ValueError(f"example {self.id!r}: response_mask has {len(self.response_mask)} "
                             f"entries for {len(self.response)} response tokens")

    @property
    def prompt_len(self) -> int:
        return sum(len(p) for p in self.prompt)

    def __len__(self) -> int:
        return self.prompt_len + len(self.response)


@dataclass
class PackedBatch:
    """Packed rows (see the module docstring). Flat tensors index the R * L stream row-major."""

    source: torch.Tensor          # [R * L] int64: token id >= 0, or -(frame index + 1)
    position_ids: torch.Tensor    # [R, L] int64
    cu_seqlens: torch.Tensor      # [S + 1] int32, sequences of the flat stream (padding included)
    max_seqlen: int
    loss_positions: torch.Tensor  # [M] int64 flat positions, input-example order
    target_ids: torch.Tensor      # [M] int64: the response token each loss position predicts
    loss_example: torch.Tensor    # [M] int64: input index of the example of each loss position
    frame_offsets: torch.Tensor   # [E + 1] int64: example e's frames in the frame buffer
    example_ids: list[str]        # input order
    example_rows: list[int]       # the row of each example
    example_starts: list[int]     # flat start of each example
    n_tokens: int                 # real (non-padding) tokens
    max_tokens: int
    stats: dict = field(default_factory=dict)
    bounds: tuple = ()            # cu_seqlens as host ints (empty: read them from cu_seqlens)

    @property
    def rows(self) -> int:
        return self.position_ids.shape[0]

    @property
    def row_len(self) -> int:
        return self.position_ids.shape[1]

    @property
    def utilization(self) -> float:
        """Real tokens over the R * L slots the model runs on."""
        return self.n_tokens / max(self.source.numel(), 1)

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        """The batch on ``device`` (``non_blocking``: asynchronous copies from pinned memory)."""
        return PackedBatch(**{k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor)
                                  else v) for k, v in self.__dict__.items()})

    def pin_memory(self) -> "PackedBatch":
        """The batch with its tensors in pinned (page-locked) host memory; the DataLoader calls
        this with ``pin_memory=True``, so that copies to the GPU can be asynchronous."""
        return PackedBatch(**{k: (v.pin_memory() if isinstance(v, torch.Tensor) else v)
                              for k, v in self.__dict__.items()})


def pack(examples: Sequence[Example], max_tokens: int, *, pad_id: int = 0,
         overlong: str = "error", row_len: str = "longest",
         bins: list[list[int]] | None = None) -> PackedBatch:
    """Pack ``examples`` into rows of at most ``max_tokens`` tokens (first-fit-decreasing).

    ``overlong``: "error" (a ValueError naming the example) or "truncate" (drop response tokens
    from the end until it fits; an example whose prompt alone does not fit is still an error).
    ``row_len``: "longest" pads rows to the longest row, "max" to ``max_tokens``.
    ``bins``: a precomputed row assignment (lists of example indices) instead of FFD.
    """
    if overlong not in ("error", "truncate"):
        raise ValueError(f"overlong must be 'error' or 'truncate', got {overlong!r}")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    if not examples:
        raise ValueError("pack() needs at least one example")
    examples = [_fit(ex, max_tokens, overlong) for ex in examples]
    lengths = [len(ex) for ex in examples]
    rows = bins if bins is not None else first_fit_decreasing(lengths, max_tokens)
    n_rows = len(rows)
    width = max_tokens if row_len == "max" else max(sum(lengths[i] for i in r) for r in rows)

    frame_offsets = [0]
    for ex in examples:
        frame_offsets.append(frame_offsets[-1] + ex.n_frames)

    source = torch.full((n_rows, width), pad_id, dtype=torch.int64)
    position_ids = torch.zeros((n_rows, width), dtype=torch.int64)
    seqlens: list[int] = []
    example_rows = [0] * len(examples)
    example_starts = [0] * len(examples)
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            ex = examples[i]
            example_rows[i], example_starts[i] = r, r * width + col
            n = lengths[i]
            source[r, col:col + n] = _example_source(ex, frame_offsets[i])
            position_ids[r, col:col + n] = torch.arange(n)
            seqlens.append(n)
            col += n
        if col < width:  # the padding tail is a sequence of its own
            position_ids[r, col:] = torch.arange(width - col)
            seqlens.append(width - col)

    loss_pos, targets, loss_ex = [], [], []
    for i, ex in enumerate(examples):
        mask = ex.response_mask or [True] * len(ex.response)
        first = example_starts[i] + ex.prompt_len - 1  # position predicting response[0]
        for j, (tok, keep) in enumerate(zip(ex.response, mask)):
            if keep:
                loss_pos.append(first + j)
                targets.append(tok)
                loss_ex.append(i)

    n_tokens = sum(lengths)
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seqlens, dtype=torch.int64), 0).to(torch.int32)
    return PackedBatch(
        source=source.reshape(-1), position_ids=position_ids, cu_seqlens=cu,
        max_seqlen=max(seqlens), loss_positions=torch.tensor(loss_pos, dtype=torch.int64),
        target_ids=torch.tensor(targets, dtype=torch.int64),
        loss_example=torch.tensor(loss_ex, dtype=torch.int64),
        frame_offsets=torch.tensor(frame_offsets, dtype=torch.int64),
        example_ids=[ex.id for ex in examples], example_rows=example_rows,
        example_starts=example_starts, n_tokens=n_tokens, max_tokens=max_tokens,
        stats=dict(rows=n_rows, row_len=width, examples=len(examples),
                   fill=n_tokens / (n_rows * max_tokens)),
        bounds=tuple(cu.tolist()))


def truncate_together(examples: Sequence[Example], max_tokens: int,
                      overlong: str = "truncate") -> list[Example]:
    """Versions of one example that must keep the same response tokens (the speech student and
    the text teacher of one behavior, packed into separate batches) fitted to ``max_tokens``
    together: with "truncate" every version keeps the response prefix that fits the longest
    prompt (``pack`` alone would cut each to its own prompt, so the speech version, whose prompt
    is longer, would lose more tokens than its teacher). With "error", or a prompt that does not
    fit alone, the error ``pack`` gives."""
    if overlong not in ("error", "truncate"):
        raise ValueError(f"overlong must be 'error' or 'truncate', got {overlong!r}")
    if not examples:
        return []
    n = len(examples[0].response)
    for ex in examples[1:]:
        if len(ex.response) != n:
            raise ValueError(f"examples {examples[0].id!r} and {ex.id!r} do not have the same "
                             f"response length ({n} and {len(ex.response)})")
    keep = min(n, *(max_tokens - ex.prompt_len for ex in examples))
    out = []
    for ex in examples:
        if len(ex) > max_tokens and (overlong != "truncate" or ex.prompt_len >= max_tokens):
            _fit(ex, max_tokens, overlong)  # raises the error naming the example
        if keep < n:
            mask = ex.response_mask[:keep] if ex.response_mask is not None else None
            ex = Example(ex.id, ex.prompt, ex.response[:keep], mask, ex.n_frames)
        out.append(ex)
    return out


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin indices of ``lengths`` into bins of ``capacity``: longest first, each into the first
    bin with room. Returns the bins (lists of indices, in placement order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} has length {n} > capacity {capacity}")
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def iter_packed(examples: Iterable[Example], max_tokens: int, rows_per_batch: int,
                buffer_size: int = 256, **pack_kw) -> Iterator[PackedBatch]:
    """Stream of packed batches: fill a buffer of examples, bin it by first-fit-decreasing, emit
    ``rows_per_batch`` rows at a time, fullest rows first (the last batch may have fewer rows).
    Keyword arguments go to ``pack``."""
    buffer: list[Example] = []
    for ex in examples:
        buffer.append(ex)
        if len(buffer) >= buffer_size:
            yield from _emit(buffer, max_tokens, rows_per_batch, pack_kw)
            buffer = []
    if buffer:
        yield from _emit(buffer, max_tokens, rows_per_batch, pack_kw)


def _emit(buffer, max_tokens, rows_per_batch, pack_kw):
    fitted = [_fit(ex, max_tokens, pack_kw.get("overlong", "error")) for ex in buffer]
    lengths = [len(ex) for ex in fitted]
    bins = first_fit_decreasing(lengths, max_tokens)
    # rows of similar fill share a batch, so padding each row to the batch's longest costs little
    bins.sort(key=lambda b: -sum(lengths[i] for i in b))
    for b0 in range(0, len(bins), rows_per_batch):
        chunk = bins[b0:b0 + rows_per_batch]
        members = [i for b in chunk for i in b]
        local, k = [], 0
        for b in chunk:
            local.append(list(range(k, k + len(b))))
            k += len(b)
        yield pack([fitted[i] for i in members], max_tokens, bins=local, **pack_kw)


def _fit(ex: Example, max_tokens: int, overlong: str) -> Example:
    if len(ex) <= max_tokens:
        return ex
    if overlong == "truncate" and ex.prompt_len < max_tokens:
        keep = max_tokens - ex.prompt_len
        mask = ex.response_mask[:keep] if ex.response_mask is not None else None
        return Example(ex.id, ex.prompt, ex.response[:keep], mask, ex.n_frames)
    raise ValueError(f"example {ex.id!r} has {len(ex)} tokens (prompt {ex.prompt_len}, response "
                     f"{len(ex.response)}), more than max_tokens={max_tokens}"
                     + ("" if overlong == "truncate" else "; set overlong='truncate' to cut the "
                        "response"))


def _example_source(ex: Example, frame_base: int) -> torch.Tensor:
    pieces = []
    for part in ex.prompt:
        if isinstance(part, Text):
            pieces.append(torch.tensor(part.ids, dtype=torch.int64))
        else:
            pieces.append(-(frame_base + torch.arange(part.start, part.end, dtype=torch.int64)) - 1)
    pieces.append(torch.tensor(ex.response, dtype=torch.int64))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


def model_inputs(batch: PackedBatch, inputs_embeds: torch.Tensor, attention: str = "auto",
                 attn_implementation: str | None = None) -> dict:
    """Keyword arguments for a transformers causal LM over a packed batch.

    ``inputs_embeds``: [R * L, H] (from ``pack_embeddings``). ``attention``:

    - "position_ids": restarting positions, no mask, no cache; transformers builds the
      block-causal mask itself (SDPA and eager attention compute every row's full L x L scores);
    - "mask": an explicit [R, 1, L, L] block-diagonal causal mask, additive in the embeddings' dtype
      (works with eager attention and SDPA; for model families that do not
      detect packed positions);
    - "varlen": the cu_seqlens, for flash-attention-2's varlen kernel or for
      ``attn_implementation=TORCH_VARLEN`` / ``VARLEN_SDPA`` (``mtbi_fast.attention``: torch's
      varlen kernel, or SDPA per sequence; no mask, and no work across examples);
    - "auto": "varlen" for those attention implementations, else "position_ids".
    """
    if attention not in ("auto", "position_ids", "mask", "varlen"):
        raise ValueError("attention must be 'auto', 'position_ids', 'mask' or 'varlen', "
                         f"got {attention!r}")
    if attention == "auto":
        attention = "varlen" if attn_implementation in VARLEN_IMPLEMENTATIONS else "position_ids"
    embeds = inputs_embeds.reshape(batch.rows, batch.row_len, -1)
    kw = dict(inputs_embeds=embeds, position_ids=batch.position_ids.to(embeds.device),
              use_cache=False)
    if attention == "mask":  # additive (0 / dtype min): eager attention adds the mask to the scores
        kw["attention_mask"] = block_causal_mask(batch.position_ids.to(embeds.device), dtype=embeds.dtype)
    elif attention == "varlen":
        cu = batch.cu_seqlens.to(embeds.device)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch.max_seqlen,
                  max_length_k=batch.max_seqlen)
        if attn_implementation in REGISTERED:  # the bounds as host ints: nothing read back per layer
            kw["mtbi_bounds"] = batch.bounds or None
    return kw


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[R, 1, L, L] mask of where query i may attend key j (same sequence, j <= i). Sequences are
    delimited by ``position_ids`` restarting (any step other than +1).

    ``dtype`` None: a bool mask (True = attend). A floating ``dtype``: the additive form, 0 where
    allowed and the dtype's minimum elsewhere, which every transformers attention takes as it is
    (eager attention adds the mask to the scores, so a bool mask would add 1 and 0 there and
    isolate nothing; SDPA accepts both forms)."""
    step = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1)
    seq = (step != 1).cumsum(-1)
    same = seq[:, :, None] == seq[:, None, :]
    causal = torch.ones(position_ids.shape[-1], position_ids.shape[-1], dtype=torch.bool,
                        device=position_ids.device).tril()
    allowed = (same & causal)[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)


def gather_loss_rows(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Hidden states [R, L, H] or [R * L, H] -> the rows at the loss positions [M, H]."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.loss_positions.to(hidden.device))
