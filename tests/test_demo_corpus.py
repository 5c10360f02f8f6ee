"""data/demo: the bundled corpus is valid, sized as documented, and its words are its text."""

from pathlib import Path

from mtbi_fast.data import read_manifest
from mtbi_fast.interleave import transcript

DEMO = Path(__file__).parents[1] / "data" / "demo"


def test_demo_corpus():
    train = read_manifest(DEMO / "train.jsonl", require_words=True)
    test = read_manifest(DEMO / "test.jsonl", require_words=True)
    assert len(train) == 200 and len(test) == 40
    assert not {u.text for u in train} & {u.text for u in test}
    for u in train + test:
        assert 6 <= len(u.words) <= 25
        assert transcript(u.words) == " ".join(u.text.split())
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert size <= 15 * 2**20, size
    assert len({u.extra["voice"] for u in train}) >= 6
