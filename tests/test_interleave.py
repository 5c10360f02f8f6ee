"""mtbi_fast/interleave.py: segment invariants, reproducibility, schedules, bad alignments."""

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from mtbi_fast.data import Word, check_alignment
from mtbi_fast.interleave import (RatioSchedule, Segment, frame_cuts, render, sample_segments,
                                  segment_text, transcript)
from mtbi_fast.packing import Speech, Text

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "speech models learn to follow instructions they never saw",
    "a cat sat on the mat and looked at the rain outside",
    "numbers like 42 and 1999 or words like don't can't it's matter",
]


@pytest.fixture(scope="module")
def tokenize():
    """A small byte-level BPE (GPT-2 style pre-tokenization), trained here: no hub needed."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(SENTENCES * 5, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return lambda text: tok.encode(text).ids


def make_words(text, seed=0, rate=12.5):
    """Words with plausible times: 0.15-0.5 s each, 0-0.2 s gaps, 0.3 s leading silence."""
    g = torch.Generator().manual_seed(seed)
    t, words = 0.3, []
    for w in text.split():
        dur = 0.15 + 0.35 * torch.rand((), generator=g).item()
        words.append(Word(w, round(t, 3), round(t + dur, 3)))
        t += dur + 0.2 * torch.rand((), generator=g).item()
    n_frames = math.ceil((t + 0.3) * rate)
    return words, n_frames


def check_invariants(segs, words, n_frames):
    # every word exactly once, in order
    assert segs[0].word_start == 0 and segs[-1].word_end == len(words)
    for a, b in zip(segs, segs[1:]):
        assert a.word_end == b.word_start
        assert a.kind != b.kind  # runs of one kind are merged
    speech = [s for s in segs if s.is_speech]
    for s in speech:
        assert s.frame_end > s.frame_start
    for a, b in zip(speech, speech[1:]):
        assert a.frame_end <= b.frame_start  # no overlap, in order
    cuts = frame_cuts(words, n_frames, 12.5)
    for s in speech:  # a speech span is exactly the frames its words own: nothing left uncovered
        assert (s.frame_start, s.frame_end) == (cuts[s.word_start], cuts[s.word_end])


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
def test_invariants_over_many_draws(ratio):
    for seed in range(40):
        words, n_frames = make_words(SENTENCES[seed % 4] + " " + SENTENCES[(seed + 1) % 4], seed)
        g = torch.Generator().manual_seed(seed)
        segs = sample_segments(words, n_frames, 12.5, ratio, mean_span=2.5, generator=g, utt_id="u")
        check_invariants(segs, words, n_frames)
        n_text = sum(s.word_end - s.word_start for s in segs if not s.is_speech)
        assert n_text == round(ratio * len(words))  # frames are long enough here: exact ratio


def test_ratio_one_is_the_teacher_sequence(tokenize):
    for seed, text in enumerate(SENTENCES):
        words, n_frames = make_words(text, seed)
        segs = sample_segments(words, n_frames, 12.5, 1.0, generator=torch.Generator().manual_seed(seed))
        assert segs == [Segment("text", 0, len(words))]
        parts = render(segs, words, tokenize)
        assert parts == [Text(tokenize(transcript(words)))]
        assert transcript(words) == text


def test_ratio_zero_is_one_speech_segment_over_the_utterance():
    words, n_frames = make_words(SENTENCES[0])
    segs = sample_segments(words, n_frames, 12.5, 0.0)
    assert segs == [Segment("speech", 0, len(words), 0, n_frames)]
    assert render(segs, words, lambda s: []) == [Speech(0, n_frames)]


def test_text_runs_render_with_word_spacing(tokenize):
    """Text runs keep the leading space that separates them from what precedes them, so the runs
    of any segmentation tokenize to exactly the transcript's tokens, piece by piece."""
    for seed in range(20):
        words, n_frames = make_words(SENTENCES[seed % 4], seed)
        segs = sample_segments(words, n_frames, 12.5, 0.5, mean_span=2,
                               generator=torch.Generator().manual_seed(seed))
        pieces = [tokenize(segment_text(words, s)) for s in segs]
        assert [i for p in pieces for i in p] == tokenize(transcript(words))
        parts = render(segs, words, tokenize)
        for seg, piece, part in zip(segs, pieces, parts):
            assert part == (Speech(seg.frame_start, seg.frame_end) if seg.is_speech else Text(piece))


def test_mean_span_and_reproducibility():
    words = [Word(f"w{i}", i * 0.5, i * 0.5 + 0.4) for i in range(3000)]
    n_frames = math.ceil(3000 * 0.5 * 12.5)
    g = torch.Generator().manual_seed(7)
    segs = sample_segments(words, n_frames, 12.5, 0.15, mean_span=3.0, generator=g)
    runs = [s.word_end - s.word_start for s in segs if not s.is_speech]
    # few text spans touch at this ratio, so the mean run is close to the requested mean span
    assert 2.6 < sum(runs) / len(runs) < 3.8
    again = sample_segments(words, n_frames, 12.5, 0.15, mean_span=3.0,
                            generator=torch.Generator().manual_seed(7))
    other = sample_segments(words, n_frames, 12.5, 0.15, mean_span=3.0,
                            generator=torch.Generator().manual_seed(8))
    assert again == segs and other != segs


def test_speech_span_shorter_than_a_frame_becomes_text():
    # two words inside one 80 ms frame: no frames of their own at 12.5 Hz
    words = [Word("a", 0.0, 0.5), Word("b", 0.52, 0.54), Word("c", 0.55, 0.57), Word("d", 0.6, 1.2)]
    cuts = frame_cuts(words, 16, 12.5)
    assert cuts[2] == cuts[3]
    is_text = None
    for seed in range(50):
        segs = sample_segments(words, 16, 12.5, 0.5, mean_span=1,
                               generator=torch.Generator().manual_seed(seed))
        for s in segs:
            if s.is_speech:
                assert s.frame_end > s.frame_start
                is_text = True
    assert is_text


@pytest.mark.parametrize(
    "words, message",
    [
        ([Word("a", 0.1, 0.2), Word("b", 0.5, 0.3)], r"utterance 'u7': word 1 'b' has times out of order"),
        ([Word("a", 0.1, 0.4), Word("b", 0.3, 0.6)], r"utterance 'u7': word 1 'b' \(start 0.3\) overlaps the previous word 'a'"),
        ([Word("a", 0.1, 0.4), Word("b", 0.5, 9.0)], r"utterance 'u7': word 1 'b' ends at 9.0 s, beyond the audio"),
        ([Word("a", 0.1, 0.4), Word(" ", 0.5, 0.6)], r"utterance 'u7': word 1 ' ' is empty"),
        ([Word("a", 0.1, 0.4), {"word": "b", "start": 0.5}], r"utterance 'u7': word 1 'b' has no end"),
        ([Word("a", 0.1, 0.4), Word("b", float("nan"), 0.6)], r"utterance 'u7': word 1 'b' has missing times"),
        ([], r"utterance 'u7': no words"),
    ],
)
def test_bad_alignment_names_utterance_and_word(words, message):
    with pytest.raises(ValueError, match=message):
        sample_segments(words, 25, 12.5, 0.5, utt_id="u7")


def test_dict_words_accepted():
    ws = check_alignment([{"word": "hi", "start": 0.1, "end": 0.3}], 1.0, "u")
    assert ws == [Word("hi", 0.1, 0.3)]


def test_ratio_schedules():
    const = RatioSchedule.from_config({"start": 0.3})
    assert const(0) == const(10_000) == 0.3
    lin = RatioSchedule("linear", 1.0, 0.0, 100)
    assert lin(0) == 1.0 and lin(50) == pytest.approx(0.5) and lin(100) == 0.0 and lin(500) == 0.0
    cos = RatioSchedule.from_config({"schedule": "cosine", "start": 0.8, "end": 0.2, "steps": 10})
    assert cos(0) == pytest.approx(0.8) and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.2)
    values = [cos(s) for s in range(11)]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize("cfg, message", [
    ({"schedule": "step"}, r"interleave.schedule must be one of"),
    ({"start": 1.5}, r"interleave.start must be a number in \[0, 1\]"),
    ({"schedule": "linear", "steps": 0}, r"interleave.steps must be a positive integer"),
    ({"ratio": 0.5}, r"unknown key interleave.ratio"),
])
def test_schedule_config_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        RatioSchedule.from_config(cfg)


def test_bundled_schedule_configs_load():
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "interleave.yaml").read_text())
    schedules = {name: RatioSchedule.from_config(c) for name, c in cfg.items()}
    assert schedules["constant"](123) == 0.5
    assert schedules["linear_decay"](1000) == pytest.approx(0.4)
    assert schedules["cosine_decay"](2000) == pytest.approx(0.1)
