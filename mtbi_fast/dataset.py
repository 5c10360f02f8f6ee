"""The training data: behavior records joined with their utterances, built into deterministic
micro-batches.

``MTBIData`` reads a manifest and a behaviors folder and builds any micro-batch from its index
alone (audio decode, the encoder's features, SpecAugment, interleaving, packing); ``MicroBatches`` is the
``torch.utils.data.Dataset`` of one rank's micro-batches that DataLoader workers build ahead of the
training step. Teacher hidden states cached with the behaviors (``data.teacher_cache``) come with
each batch, cut like its responses.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable

import soundfile as sf
import torch

from mtbi_fast.audio import SAMPLE_RATE, load_audio, spec_augment
from mtbi_fast.behaviors_folder import BehaviorsFolder
from mtbi_fast.hf_code.modeling_mtbi_speech import adapter_frames
from mtbi_fast.data import DURATION_TOLERANCE, Utterance
from mtbi_fast.lhotse_io import read_utterances
from mtbi_fast.errors import USER_ERRORS
from mtbi_fast.interleave import RatioSchedule, example_pair, transcript
from mtbi_fast.io import derived_seed
from mtbi_fast.packing import pack, truncate_together

if TYPE_CHECKING:  # the model is read for plain values only, never kept
    from mtbi_fast.model import SpeechLLM

# encoder features kept per process: 256 clips of 15 s are about 120 MB as log-mels (80 bins,
# fp32) or 250 MB as waveforms; the demo's 200 training clips all fit
FEATURE_CACHE_CLIPS = 256


class BatchBuilder:
    """Builds packed micro-batches from behavior records and their utterances; shared by the
    in-memory reader (``MTBIData``) and the streaming reader (``mtbi_fast.streaming``). Holds what
    the batches need from the model as plain values (tokenizer, the encoder's front end, adapter
    stride, frame rate), never the model: it goes to DataLoader worker processes."""

    def __init__(self, model: SpeechLLM, seed: int, mean_span: float, max_tokens: int,
                 overlong: str, spec_augment: dict | None = None, skip_bad_audio: bool = False):
        self.seed, self.mean_span = seed, mean_span
        self.max_tokens, self.overlong = max_tokens, overlong
        self.tokenizer, self.front = model.tokenizer, model.front
        self.vocab = model.vocab_size  # token ids of records must be below it
        self.stride, self.frame_rate = model.adapter.stride, model.frame_rate
        self.adapter_kind = model.adapter.kind
        if spec_augment is not None and not self.front.spectral:
            raise ValueError(f"data.spec_augment masks log-mel features; this model's {model.encoder.family} "
                             f"encoder reads waveforms (set data.spec_augment: null)")
        self.spec_augment = spec_augment  # SpecAugment's settings for training inputs, or None
        self.skip_bad_audio = skip_bad_audio

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def build(self, items: list[Item], ratio: float, salt: int) -> dict:
        """The packed student and teacher inputs of ``items`` at text ratio ``ratio`` (interleaving
        and SpecAugment seeded by ``salt`` and each item's key), their encoder features, the bad audio left
        out (``skipped_audio``) and, when every item has them, the teacher's cached states cut
        like the responses (``teacher_hidden``)."""
        students, teachers, feats, kept, skipped = [], [], [], [], []
        for item in items:
            try:
                feat = item.features()
            except BadAudioError as exc:
                if not self.skip_bad_audio:
                    raise
                skipped.append(str(exc))  # left out; the other examples are what they would be
                continue
            if self.spec_augment is not None:  # masks seeded by example and step (resumable)
                ga = torch.Generator().manual_seed(derived_seed(self.seed, f"spec_augment/{salt}/{item.key}"))
                feat = spec_augment(feat, generator=ga, **self.spec_augment)
            s, t = self.example_pair(item, feat, ratio, salt)
            students.append(s)
            teachers.append(t)
            feats.append(feat)
            kept.append(item)
        if not students:
            raise BadAudioError(f"every example of this batch has bad audio: {'; '.join(skipped)}")
        out = {"student": pack(students, self.max_tokens, overlong=self.overlong),
               "teacher": pack(teachers, self.max_tokens, overlong=self.overlong), "features": feats,
               "skipped_audio": skipped}
        if kept[0].hidden is not None:  # cached states, cut like the (possibly truncated) responses
            counts = torch.bincount(out["student"].loss_example, minlength=len(kept)).tolist()
            out["teacher_hidden"] = torch.cat([it.hidden[:c] for it, c in zip(kept, counts)])
        return out

    def n_frames(self, n_samples: int) -> int:
        """The model's speech frames for a clip of ``n_samples`` samples (``SpeechLLM.n_frames``)."""
        return adapter_frames(self.front.n_frames(n_samples), self.stride, self.adapter_kind)

    def example_pair(self, item: Item, features: torch.Tensor, ratio: float, salt: int):
        """The item's student (interleaved) and teacher (text) examples, truncated together."""
        r, u = item.record, item.utterance
        n_frames = adapter_frames(self.front.frames(self.front.length(features)), self.stride, self.adapter_kind)
        g = torch.Generator().manual_seed(derived_seed(self.seed, f"interleave/{salt}/{item.key}"))
        s, t = example_pair(r["id"], u.words, n_frames, self.frame_rate, ratio,
                            r["prefix_ids"], r["suffix_ids"], r["response_ids"], self.tokenize,
                            mean_span=self.mean_span, generator=g, duration=u.duration)
        if list(t.prompt[1].ids) != r["transcript_ids"]:
            raise ValueError(f"{r['id']}: the words of utterance {u.id!r} ({transcript(u.words)!r})"
                             " do not tokenize to the behavior's transcript; regenerate the behaviors")
        return truncate_together([s, t], self.max_tokens, self.overlong)  # same response tokens


def check_fits(records: list[dict], utts: dict, model, max_tokens: int, overlong: str, where) -> None:
    """Before step 0: no record's example can be too long for ``packing.max_tokens`` (found
    mid-run, the same batch would fail at the same step on every resume). Its prompt as pure
    speech (prefix + the clip's frames + suffix) and as text (the teacher's) must leave room for a
    response token; with ``overlong: error`` the response must fit whole. An interleaved prompt
    lies between the two, but for a few tokens where spans meet. The error names the longest first."""
    bad = []
    for r in records:
        u = utts[r["utt_id"]]
        frames = model.n_frames(round(u.duration * SAMPLE_RATE))  # a SpeechLLM, or a BatchBuilder
        around = len(r["prefix_ids"]) + len(r["suffix_ids"])
        prompt = around + max(frames, len(r["transcript_ids"]))
        need = prompt + (len(r["response_ids"]) if overlong == "error" else 1)
        if need > max_tokens:
            bad.append((-need, f"{r['id']} (prompt {around + frames} tokens as speech, "
                        f"{around + len(r['transcript_ids'])} as text, response {len(r['response_ids'])})"))
    if bad:
        bad = [text for _, text in sorted(bad, key=lambda b: b[0])]  # the longest first
        raise ValueError(
            f"{where}: {len(bad)} behavior record(s) can never fit packing.max_tokens={max_tokens} "
            f"(overlong: {overlong}): {'; '.join(bad[:5])}{'; ...' if len(bad) > 5 else ''}. Raise "
            f"packing.max_tokens (it may change on resume) or leave these utterances out")


@dataclass
class Item:
    """One example to build: a behavior ``record`` of ``utterance``. ``key``: an integer that
    seeds the example's interleaving and SpecAugment (with the batch's salt); ``features``: gives
    the utterance's encoder features (raises ``BadAudioError``); ``hidden``: the teacher's cached states
    [response tokens, H], or None."""
    key: int
    record: dict
    utterance: Utterance
    features: Callable[[], torch.Tensor]
    hidden: torch.Tensor | None = None


class MTBIData(BatchBuilder):
    """Behavior records joined with their utterances, all in memory; deterministic micro-batches.

    Every utterance of the manifest must fit the speech encoder (checked here, from the audio
    headers). Audio that still fails to decode when its batch is built is an error naming the
    utterance and file, or with ``skip_bad_audio`` an example left out of its batch (the others
    are unchanged) and listed in the batch's ``skipped_audio``."""

    def __init__(self, manifest: str, behaviors: str, model: SpeechLLM, seed: int, mean_span: float,
                 max_tokens: int, overlong: str, teacher_cache: bool = False,
                 tasks: list[str] | None = None, spec_augment: dict | None = None,
                 skip_bad_audio: bool = False):
        super().__init__(model, seed, mean_span, max_tokens, overlong, spec_augment, skip_bad_audio)
        utts = read_utterances(manifest, require_words=True)  # JSONL manifest or Lhotse CutSet
        check_durations(utts, model, manifest)
        self.utts = {u.id: u for u in utts}
        folder = BehaviorsFolder(behaviors)
        self.records = folder.records(vocab=self.vocab)
        if tasks is not None:  # a baseline on fewer tasks (e.g. [continue]: BLSP-style alignment)
            self.records = [r for r in self.records if r["task"] in tasks]
            if not self.records:
                raise ValueError(f"data.tasks={tasks}: {behaviors} has no behaviors of these tasks")
        missing = sorted({r["utt_id"] for r in self.records} - set(self.utts))
        if missing:
            raise ValueError(f"{behaviors}: behaviors refer to utterances not in {manifest}: {missing[:5]}")
        check_fits(self.records, self.utts, model, max_tokens, overlong, behaviors)
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()  # LRU, FEATURE_CACHE_CLIPS
        self.cache = folder.hidden_states() if teacher_cache else None

    def __len__(self) -> int:
        return len(self.records)

    def record_indices(self, micro: int, n: int) -> list[int]:
        """Records of micro-batch ``micro``: positions [micro * n, micro * n + n) of an endless
        stream of seeded permutations, one per epoch."""
        out = []
        for pos in range(micro * n, micro * n + n):
            epoch, offset = divmod(pos, len(self.records))
            out.append(self._permutation(epoch)[offset])
        return out

    def _permutation(self, epoch: int) -> list[int]:
        """The epoch's record order (one randperm per epoch, kept for the current epoch)."""
        if getattr(self, "_perm_epoch", None) != epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, f"epoch/{epoch}"))
            self._perm = torch.randperm(len(self.records), generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def features(self, utt_id: str) -> torch.Tensor:
        """The utterance's encoder features; the last FEATURE_CACHE_CLIPS are kept (per process:
        each DataLoader worker has its own cache, so memory stays bounded whatever the corpus size)."""
        if utt_id in self._features:
            self._features.move_to_end(utt_id)
        else:
            audio = self.utts[utt_id].audio
            while len(self._features) >= FEATURE_CACHE_CLIPS:
                self._features.popitem(last=False)
            self._features[utt_id] = features_or_bad_audio(utt_id, audio, lambda: load_audio(audio),
                                                           self.front, self.skip_bad_audio)
        return self._features[utt_id]

    def batch(self, indices: list[int], ratio: float, salt: int) -> dict:
        """The micro-batch of records ``indices`` (``BatchBuilder.build``; record i's key is i)."""
        items = []
        for i in indices:
            r = self.records[i]
            items.append(Item(i, r, self.utts[r["utt_id"]], partial(self.features, r["utt_id"]),
                              self.cache[r["id"]] if self.cache is not None else None))
        return self.build(items, ratio, salt)


class MicroBatches(torch.utils.data.Dataset):
    """Item j: this rank's j-th training micro-batch (step ``j // grad_accum``), the global
    micro-batch ``j * world + rank``. A pure function of the seed and j, so DataLoader workers
    (any number) give the batches the training process would build, and a run resumed at step s
    starts at item ``s * grad_accum``."""

    def __init__(self, data: MTBIData, schedule: RatioSchedule, examples_per_step: int,
                 grad_accum: int, world: int = 1, rank: int = 0):
        self.data, self.schedule, self.examples = data, schedule, examples_per_step
        self.grad_accum, self.world, self.rank = grad_accum, world, rank

    def __getitem__(self, j: int) -> dict:
        """The micro-batch, or ``{"error": message}`` for a user error (bad audio, a behavior that
        does not match its utterance): returned, not raised, so that the training loop raises it
        as the same one-line error whether a worker process or this one built the batch (the
        DataLoader turns a worker's exception into a traceback text)."""
        micro = j * self.world + self.rank  # = (step * grad_accum + k) * world + rank
        indices = self.data.record_indices(micro, self.examples)
        try:
            return self.data.batch(indices, self.schedule(j // self.grad_accum), salt=micro)
        except USER_ERRORS as exc:
            return {"error": str(exc)}



class BadAudioError(ValueError):
    """An utterance whose audio cannot be decoded into features (the message names it and its file)."""


def features_or_bad_audio(utt_id: str, where: str, load: Callable[[], torch.Tensor], front,
                          skip_bad_audio: bool) -> torch.Tensor:
    """``front.features(load())`` (``front``: an ``encoders.FrontEnd``), or a ``BadAudioError``
    naming the utterance and ``where`` its audio is (a file, or a shard) when the audio is
    unreadable, empty, non-finite or too short."""
    try:
        return front.features(load())
    except (ValueError, OSError, RuntimeError) as exc:
        why = _short_error(exc)
        msg = why if where in why else f"{where}: {why}"
        hint = "" if skip_bad_audio else \
            " (set data.skip_bad_audio: true to leave such examples out, counted in metrics.jsonl)"
        raise BadAudioError(f"utterance {utt_id!r}: bad audio: {msg}{hint}") from None



_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")
_CUT_REPR = re.compile(r"\b(Mono|Mixed|Padding|Data)?Cut\(id='([^']*)'.*", re.DOTALL)
MAX_ERROR_CHARS = 300


def _short_error(exc: Exception) -> str:
    """A decoder's error in one short line: no object reprs (``<_io.BytesIO object at 0x...>``
    says nothing to a user), no Lhotse cut repr (kilobytes; the cut's id is kept), at most
    MAX_ERROR_CHARS characters."""
    text = " ".join(str(exc).split())
    text = _OBJECT_REPR.sub("the audio bytes", text)
    text = _CUT_REPR.sub(lambda m: f"cut {m.group(2)!r}", text)
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS - 3] + "..."
    return text


def check_durations(utts, model: SpeechLLM, manifest) -> None:
    """Every utterance fits the model (``SpeechLLM.max_seconds``: ``max_audio_seconds``, or the
    encoder's limit, Whisper's 1500 frames being 30 s), judged from the manifest's durations and,
    near the limit, the audio header's exact length. The error lists the utterances that do not."""
    limit, front = model.max_seconds, model.front
    own_limit = limit == front.max_seconds  # the encoder's: exact in its frames
    what = (f"the speech encoder's limit of {limit:g} s ({front.max_frames} frames)" if own_limit
            else f"the model's limit of {limit:g} s (model.max_audio_seconds)")
    bad = []
    for u in utts:
        if u.duration <= limit - DURATION_TOLERANCE:
            continue
        if u.duration <= limit + DURATION_TOLERANCE:  # the duration field may be off by the tolerance
            info = sf.info(u.audio)
            samples = math.ceil(info.frames * SAMPLE_RATE / info.samplerate)
            if own_limit and front.n_frames(samples) <= front.max_frames or samples <= limit * SAMPLE_RATE:
                continue
        bad.append(f"{u.id} ({u.duration:.1f} s)")
    if bad:
        raise ValueError(f"{manifest}: {len(bad)} utterance{'s are' if len(bad) > 1 else ' is'} longer "
                         f"than {what}: "
                         f"{', '.join(bad[:20])}{', ...' if len(bad) > 20 else ''}; remove "
                         f"{'them' if len(bad) > 1 else 'it'} from the manifest or cut the audio")
