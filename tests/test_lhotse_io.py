"""Lhotse interop (mtbi_fast.lhotse_io): JSONL manifest <-> CutSet on the demo corpus."""

from pathlib import Path

import numpy as np
import pytest

lhotse = pytest.importorskip("lhotse")

from mtbi_fast.audio import load_audio  # noqa: E402
from mtbi_fast.data import ManifestError, read_manifest, write_manifest  # noqa: E402
from mtbi_fast.lhotse_io import (  # noqa: E402
    cutset_to_manifest, is_cutset_manifest, manifest_to_cutset, read_utterances)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "train.jsonl"


@pytest.fixture(scope="module")
def utts():
    return read_manifest(DEMO, require_words=True)[:10]


def assert_same(got, want):
    assert [u.id for u in got] == [u.id for u in want]
    for g, w in zip(got, want):
        assert g.text == w.text
        assert g.audio == w.audio
        assert g.duration == pytest.approx(w.duration, abs=1e-3)
        assert [x.word for x in g.words] == [x.word for x in w.words]
        assert np.allclose([x.start for x in g.words], [x.start for x in w.words], atol=1e-3)
        assert np.allclose([x.end for x in g.words], [x.end for x in w.words], atol=1e-3)
        assert g.extra == w.extra


@pytest.mark.parametrize("name", ["cuts.jsonl.gz", "cuts.jsonl"])
def test_round_trip_through_disk(utts, tmp_path, name):
    cuts = manifest_to_cutset(utts)
    assert len(cuts) == 10
    cut = cuts[0]
    assert type(cut).__name__ == "MonoCut"
    assert cut.supervisions[0].text == utts[0].text
    item = cut.supervisions[0].alignment["word"][1]
    assert (item.symbol, item.start) == (utts[0].words[1].word, utts[0].words[1].start)
    assert item.duration == pytest.approx(utts[0].words[1].end - utts[0].words[1].start)

    path = tmp_path / name
    cuts.to_file(path)
    assert is_cutset_manifest(path)
    back = cutset_to_manifest(lhotse.load_manifest_lazy(path))
    assert_same(back, utts)
    assert_same(read_utterances(path, require_words=True), utts)  # detected by content


def test_read_utterances_takes_project_manifests(utts, tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, utts)
    assert not is_cutset_manifest(path)
    assert_same(read_utterances(path, require_words=True), utts)


def test_extra_fields_travel_in_custom(utts, tmp_path):
    import dataclasses

    tagged = [dataclasses.replace(u, extra={"speaker": "spk1"}) for u in utts[:2]]
    path = tmp_path / "c.jsonl.gz"
    manifest_to_cutset(tagged).to_file(path)
    assert [u.extra for u in read_utterances(path)] == [{"speaker": "spk1"}] * 2


def test_cut_without_alignment_names_it(utts, tmp_path):
    cuts = manifest_to_cutset(utts[:3])
    bare = cuts[1]
    bare.supervisions[0].alignment = None
    with pytest.raises(ManifestError) as exc:
        cutset_to_manifest(cuts)
    msg = str(exc.value)
    assert f"cut {utts[1].id!r}" in msg
    assert 'no word alignment (supervision.alignment["word"])' in msg
    assert "mtbi-fast align" in msg
    assert utts[0].id not in msg and utts[2].id not in msg
    # the same from a file, named in the message; allowed where words are optional (align)
    path = tmp_path / "c.jsonl.gz"
    cuts.to_file(path)
    with pytest.raises(ManifestError, match=f"{path}: cut '{utts[1].id}'"):
        read_utterances(path, require_words=True)
    got = read_utterances(path, require_words=False)
    assert got[1].words is None and got[0].words is not None


def test_unsupported_cuts_are_errors(utts):
    cuts = manifest_to_cutset(utts[:3])
    two = cuts[0]
    two.supervisions = two.supervisions * 2
    part = cuts[1].truncate(duration=1.0)
    with pytest.raises(ManifestError) as exc:
        cutset_to_manifest([two, part, cuts[2]])
    msg = str(exc.value)
    assert "2 bad lines" in msg
    assert f"cut {utts[0].id!r}: has 2 supervisions; one per cut is required" in msg
    assert f"cut {part.id!r}: covers 0.000-1.000 s of a" in msg


def test_bad_word_times_are_reported(utts):
    cuts = manifest_to_cutset(utts[:1])
    items = cuts[0].supervisions[0].alignment["word"]
    items[0], items[1] = items[1], items[0]
    with pytest.raises(ManifestError, match="overlaps the previous word"):
        cutset_to_manifest(cuts)


def test_lhotse_audio_equals_project_reader(utts):
    for cut in manifest_to_cutset(utts[:3]):
        assert cut.sampling_rate == 16000
        ours = load_audio(cut.recording.sources[0].source).numpy()
        theirs = cut.load_audio()
        assert theirs.shape == (1, ours.shape[0])
        np.testing.assert_allclose(theirs[0], ours, atol=1e-6)


def test_multichannel_file_mixes_like_the_project(tmp_path):
    import soundfile as sf

    from mtbi_fast.data import Utterance, Word

    wave = (np.random.default_rng(0).standard_normal((8000, 2)) * 0.1).astype("float32")
    sf.write(tmp_path / "st.flac", wave, 16000)
    u = Utterance("st", str(tmp_path / "st.flac"), "a b", 0.5, [Word("a", 0.0, 0.2), Word("b", 0.2, 0.4)])
    cuts = manifest_to_cutset([u])
    assert type(cuts[0]).__name__ == "MultiCut"
    np.testing.assert_allclose(cuts[0].load_audio().mean(axis=0),
                               load_audio(u.audio).numpy(), atol=1e-4)
    path = tmp_path / "c.jsonl.gz"
    cuts.to_file(path)
    assert_same(read_utterances(path), [u])
    # one channel of a stereo file is not what the project would read: an error
    mono = cuts[0].to_mono(mono_downmix=False)[0]
    with pytest.raises(ManifestError, match="mixes all channels"):
        cutset_to_manifest([mono])


def test_duplicate_cut_ids_are_refused_by_name(utts, tmp_path):
    """Two cuts with one id would give two behavior records with one id and a teacher-state file
    out of step with its records: refused when read, as JSONL manifests refuse them."""
    import json

    cuts = list(manifest_to_cutset(utts[:3]))
    path = tmp_path / "dup.jsonl"  # written line by line: CutSet.from_cuts itself keeps one per id
    path.write_text("".join(json.dumps(c.to_dict()) + "\n" for c in [*cuts, cuts[1]]))
    with pytest.raises(ManifestError, match=rf"{path}: cut '{utts[1].id}': duplicate id \(cut 4; first as cut 2\)"):
        read_utterances(path, require_words=True)
