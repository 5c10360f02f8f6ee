"""The streaming reader: training micro-batches from a shard folder (``mtbi-fast shard``) in memory
that does not grow with the corpus.

    data = ShardData("shards/", builder, seed=0, examples=8, shuffle_cuts=128)
    loader = DataLoader(StreamingBatches(data, schedule, grad_accum=1, world=2, rank=0, workers=2),
                        batch_size=None, num_workers=2)

Every (rank, DataLoader worker) pair is a reader; in each epoch the readers read disjoint shards
that together are all of them (the order seeded by the seed and the epoch). A reader takes its
cuts ``shuffle_cuts`` at a time (a window), shuffles the window's examples, with
``length_buckets`` groups them by length, and cuts them into micro-batches (``examples`` each, or
as many as fit ``token_budget`` tokens). Each batch carries the reader's position after it; a
checkpoint saves the positions, and a resumed run continues exactly where it stopped (the same
ranks and workers). Bad shards or cuts are errors naming them, or with ``skip_bad_shards`` left
out and counted. docs/data.md#the-streaming-reader
"""

from __future__ import annotations

import random
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import torch

from .audio import SAMPLE_RATE, wave_from_samples
from .behaviors_folder import check_record_ids
from .data import Utterance
from .dataset import BatchBuilder, Item, check_fits, features_or_bad_audio
from .errors import USER_ERRORS
from .interleave import RatioSchedule
from .io import derived_seed
from .lhotse_io import cut_words
from .shards import HIDDEN_FIELD, read_index, shard_paths


@dataclass
class Position:
    """Where a reader is: the window starting at cut ``cut`` of its epoch ``epoch`` stream, of
    which ``batch`` micro-batches were given."""
    epoch: int = 0
    cut: int = 0
    batch: int = 0


class ShardError(ValueError):
    """A shard (or a cut in it) that cannot be read; the message names the shard file and cut."""


class ShardData:
    """A shard folder and what a reader needs to build batches from it (module docstring)."""

    def __init__(self, folder: str, builder: BatchBuilder, *, seed: int, examples: int,
                 shuffle_cuts: int = 128, length_buckets: bool = True, token_budget: int | None = None,
                 tasks: list[str] | None = None,
                 teacher_cache: bool = False, skip_bad_shards: bool = False, max_seconds: float | None = None,
                 verify: str = "quick"):
        self.folder = Path(folder)
        # with skip_bad_shards a shard whose files do not match the index is left out, not refused
        self.bad_shards: dict[int, str] = {}
        self.index = read_index(self.folder, verify=verify, progress=True,
                                bad=self.bad_shards if skip_bad_shards else None)
        for k, why in self.bad_shards.items():
            print(f"skipping shard {k} ({self.index['shards'][k]['cuts']} cuts): {why}", flush=True)
        if teacher_cache and not self.index["teacher_hidden"]:
            raise ValueError(f"data.teacher_cache is on but the shards in {self.folder} have no teacher "
                             f"states; write them with `mtbi-fast shard ... --teacher-hidden`")
        if tasks is not None and not set(tasks) & set(self.index["tasks"]):
            raise ValueError(f"data.tasks={tasks}: {self.folder} has no behaviors of these tasks "
                             f"(it has {sorted(self.index['tasks'])})")
        if max_seconds is not None:
            self.check_durations(max_seconds)
        self.builder, self.seed, self.examples = builder, seed, examples
        self.shuffle_cuts, self.length_buckets, self.tasks = shuffle_cuts, length_buckets, tasks
        self.token_budget = token_budget
        self.teacher_cache, self.skip_bad_shards = teacher_cache, skip_bad_shards

    def __len__(self) -> int:  # behavior records (all tasks)
        return self.index["records"]

    def check_durations(self, max_seconds: float) -> None:
        """The longest cut of every shard (the index records it) fits the speech encoder."""
        bad = [f"{s['files']['cuts']} ({s['max_duration']:.1f} s)" for s in self.index["shards"]
               if s.get("max_duration", 0) > max_seconds]
        if bad:
            raise ValueError(f"{self.folder}: shards with utterances longer than the speech encoder's "
                             f"limit of {max_seconds:g} s: {', '.join(bad[:10])}")

    # -- one reader ------------------------------------------------------------------------------

    def shards(self, epoch: int, reader: int, readers: int) -> list[int]:
        """The shards reader ``reader`` of ``readers`` reads in ``epoch``, in order."""
        n = len(self.index["shards"])
        if n < readers:
            raise ValueError(f"{self.folder} has {n} shard{'s' if n != 1 else ''}, fewer than the "
                             f"{readers} readers (ranks x data.num_workers) that read it; write more, "
                             f"smaller shards (`mtbi-fast shard --shard-size`) or use fewer workers")
        order = list(range(n))
        random.Random(derived_seed(self.seed, f"shards/{epoch}")).shuffle(order)
        return order[reader::readers]

    def batches(self, reader: int, readers: int, start: Position) -> Iterator[tuple[list[Item], Position, int]]:
        """Reader ``reader``'s micro-batches from ``start`` on, endless: (items, the position after
        them, cuts skipped as bad since the previous batch). Each epoch's shards are read in one
        pass (a resumed reader skips to its window's first cut once)."""
        pos = Position(**asdict(start))
        while True:
            cuts = self._cuts(self.shards(pos.epoch, reader, readers), pos.cut)
            given = 0  # micro-batches given in this epoch
            while True:
                window = list(islice(cuts, self.shuffle_cuts))
                if not window:  # the epoch is over
                    break
                skipped = sum(bad for _, bad in window)
                items = [it for cut, _ in window if cut is not None for it in cut]
                groups = self._micro_batches(items, reader, pos.epoch, pos.cut)
                next_window = Position(pos.epoch, pos.cut + len(window), 0)
                for b in range(pos.batch, len(groups)):
                    after = Position(pos.epoch, pos.cut, b + 1) if b + 1 < len(groups) else next_window
                    yield groups[b], after, skipped
                    given += 1
                    skipped = 0
                pos = next_window
            if given == 0 and start.epoch < pos.epoch:  # a whole epoch without an example
                raise ValueError(f"reader {reader} of {readers} found no examples in a whole epoch "
                                 f"of {self.folder}" + (f" (data.tasks={self.tasks})" if self.tasks else ""))
            pos = Position(pos.epoch + 1, 0, 0)

    def _cuts(self, shards: list[int], start: int):
        """(the items of each cut or None for a bad one skipped, whether it was skipped) from cut
        ``start`` of the concatenated ``shards``."""
        from lhotse.shar.readers import LazySharIterator

        offset = 0
        for k in shards:
            entry = self.index["shards"][k]
            if offset + entry["cuts"] <= start:
                offset += entry["cuts"]
                continue
            if k in self.bad_shards:  # its files do not match the index: every cut skipped
                for j in range(entry["cuts"]):
                    if offset + j >= start:
                        yield None, True
                offset += entry["cuts"]
                continue
            paths = shard_paths(self.folder, entry)
            fields = {f: [p] for f, p in paths.items() if f != HIDDEN_FIELD or self.teacher_cache}
            name, seen = paths["cuts"], 0
            try:
                for cut in LazySharIterator(fields=fields):
                    seen += 1
                    if offset + seen - 1 < start:
                        continue
                    try:
                        yield self._items(cut, paths), False
                    except ShardError:
                        if not self.skip_bad_shards:
                            raise
                        yield None, True
            except ShardError:
                raise
            except (OSError, EOFError, tarfile.TarError, AssertionError, ValueError, KeyError,
                    RuntimeError, zlib.error) as exc:
                msg = (f"shard {name}: cannot be read at {_cut_name(name, seen)} "
                       f"({type(exc).__name__}: {exc})")
                if not self.skip_bad_shards:
                    raise ShardError(msg + _SKIP_HINT) from None
                for _ in range(entry["cuts"] - seen):  # the rest of the shard, skipped
                    seen += 1
                    if offset + seen - 1 >= start:
                        yield None, True
            if seen < entry["cuts"]:
                msg = f"shard {name}: {entry['cuts']} cuts in the index, {seen} read (a field file is short)"
                if not self.skip_bad_shards:
                    raise ShardError(msg + _SKIP_HINT)
                for _ in range(entry["cuts"] - seen):
                    seen += 1
                    if offset + seen - 1 >= start:
                        yield None, True
            offset += entry["cuts"]

    def _items(self, cut, paths: dict) -> list[Item]:
        """The cut's examples: one item per behavior record of the configured tasks."""
        where = f"shard {paths['cuts']}: cut {cut.id!r}"
        utt = cut_utterance(cut, where)
        records = getattr(cut, "behaviors", None) or (cut.custom or {}).get("behaviors")
        if not records:
            raise ShardError(f"{where}: no behavior records (custom field 'behaviors')" + _SKIP_HINT)
        hidden = None
        if self.teacher_cache:
            if not cut.has_custom(HIDDEN_FIELD):
                raise ShardError(f"{where}: no cached teacher states ({HIDDEN_FIELD})" + _SKIP_HINT)
            bits = cut.load_custom(HIDDEN_FIELD)
            hidden = torch.from_numpy(bits.view("int16")).view(torch.bfloat16)
        features = _LazyFeatures(cut, utt.id, f"{paths['recording']} (cut {cut.id!r})", self.builder.front,
                                 self.builder.skip_bad_audio)
        items, row = [], 0
        for r in records:
            try:
                check_record_ids(r, self.builder.vocab, where)
                check_fits([r], {utt.id: utt}, self.builder, self.builder.max_tokens, self.builder.overlong, where)
            except ValueError as exc:
                raise ShardError(f"{exc}{_SKIP_HINT}") from None
            n = len(r["response_ids"])
            if self.tasks is None or r["task"] in self.tasks:
                h = hidden[row:row + n] if hidden is not None else None
                items.append(Item(zlib.crc32(r["id"].encode()), r, utt, features, h))
            row += n
        return items

    def _micro_batches(self, items: list[Item], reader: int, epoch: int, start: int) -> list[list[Item]]:
        """The window's items shuffled (and bucketed by length) into micro-batches: of
        ``examples`` examples, or with ``token_budget`` of as many examples as fit it."""
        rng = random.Random(derived_seed(self.seed, f"window/{epoch}/{reader}/{start}"))
        items = list(items)
        rng.shuffle(items)
        if self.length_buckets:
            items.sort(key=self._length)  # stable: equal lengths stay shuffled
        if self.token_budget is None:
            n = self.examples
            groups = [items[i:i + n] for i in range(0, len(items), n)]
        else:
            groups, used = [], self.token_budget
            for it in items:
                n = self._length(it)
                if used + n > self.token_budget:  # a longer example than the budget goes alone
                    groups.append([])
                    used = 0
                groups[-1].append(it)
                used += n
        if self.length_buckets:
            rng.shuffle(groups)
        return groups

    def _length(self, item: Item) -> int:
        """The example's length in tokens with the whole transcript as speech (the most it takes)."""
        r, u = item.record, item.utterance
        frames = self.builder.n_frames(round(u.duration * SAMPLE_RATE))
        return len(r["prefix_ids"]) + frames + len(r["suffix_ids"]) + len(r["response_ids"])


class StreamingBatches(torch.utils.data.IterableDataset):
    """This rank's training micro-batches from a ``ShardData``, for a DataLoader with ``workers``
    worker processes (0: built in this process). Micro-batch ``j`` of this rank (step
    ``j // grad_accum``) comes from reader ``j % workers`` of the rank, as the DataLoader takes its
    workers' batches in turn; ``start`` is the first micro-batch (a resumed run's) and
    ``positions`` the readers' saved positions."""

    def __init__(self, data: ShardData, schedule: RatioSchedule, grad_accum: int, world: int = 1,
                 rank: int = 0, workers: int = 0, start: int = 0, positions: dict | None = None):
        self.data, self.schedule, self.grad_accum = data, schedule, grad_accum
        self.world, self.rank, self.workers = world, rank, max(1, workers)
        self.start, self.positions = start, positions or {}
        data.shards(0, 0, self.world * self.workers)  # enough shards for the readers

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        local = (self.start + w) % self.workers  # the reader that gave micro-batch start + w before
        reader = self.rank * self.workers + local
        j = self.start + w
        start = Position(**self.positions.get(str(local), {}))
        for items, after, skipped in self.data.batches(reader, self.world * self.workers, start):
            micro = j * self.world + self.rank
            try:
                batch = self.data.builder.build(items, self.schedule(j // self.grad_accum), salt=micro)
            except USER_ERRORS as exc:  # raised by the training loop, as for the in-memory reader
                batch = {"error": str(exc)}
            batch["stream"] = {"reader": local, "position": asdict(after), "skipped_cuts": skipped}
            yield batch
            j += self.workers


def cut_utterance(cut, where: str) -> Utterance:
    """The data model's view of a shard's cut (its audio stays in the cut): id, text, duration and
    word times from ``supervision.alignment["word"]``; a cut without them is a ``ShardError``."""
    if not cut.supervisions or not (cut.supervisions[0].text or "").strip():
        raise ShardError(f"{where}: no supervision with text" + _SKIP_HINT)
    sup = cut.supervisions[0]
    try:
        words = cut_words(cut)
    except ValueError as exc:
        raise ShardError(f"{where}: {exc}" + _SKIP_HINT) from None
    if words is None:
        raise ShardError(f'{where}: no word alignment (supervision.alignment["word"]); align the corpus '
                         f"(`mtbi-fast align`) and write the shards again" + _SKIP_HINT)
    return Utterance(cut.id, where, sup.text.strip(), float(cut.duration), words, {})


class _LazyFeatures:
    """A cut's encoder features, decoded from the shard's audio on first use and kept with the window."""

    def __init__(self, cut, utt_id: str, where: str, front, skip_bad_audio: bool):
        self.cut, self.utt_id, self.where = cut, utt_id, where
        self.front, self.skip_bad_audio = front, skip_bad_audio
        self.features = None

    def __call__(self) -> torch.Tensor:
        if self.features is None:
            self.features = features_or_bad_audio(self.utt_id, self.where, self._wave, self.front,
                                                  self.skip_bad_audio)
            self.cut = None  # the compressed audio is no longer needed
        return self.features

    def _wave(self) -> torch.Tensor:
        if self.cut is None or not self.cut.has_recording:
            raise ValueError(f"audio file {self.where} is missing from the shard")
        try:
            samples = self.cut.load_audio()  # [channels, T] at the recording's rate
        except Exception as exc:  # lhotse and soundfile raise several types
            raise ValueError(f"cannot decode audio file {self.where}: {exc}") from None
        return wave_from_samples(samples.T.astype("float32", copy=False), self.cut.sampling_rate, self.where)


def _cut_name(cuts_file: str, k: int) -> str:
    """"cut 'ID' (number k+1 of the shard)", the id read from the shard's cuts file when it can be."""
    import gzip
    import json

    try:
        with gzip.open(cuts_file, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i == k:
                    return f"cut {json.loads(line)['id']!r} (number {k + 1} of the shard)"
    except (OSError, EOFError, ValueError, KeyError):
        pass
    return f"cut number {k + 1} of the shard"


_SKIP_HINT = " (set data.skip_bad_shards: true to leave bad cuts out, counted in metrics.jsonl)"
