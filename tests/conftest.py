"""Test setup. TRITON_INTERPRET must be set before triton is first imported, so it is set here.

With it, the Triton kernels run on the CPU interpreter (slow: tests use small shapes).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A training corpus shared by the trainer tests: 12 training and 4 held-out demo utterances
    with behaviors from the tiny_train LLM (``helpers.make_training_corpus``)."""
    from helpers import make_training_corpus

    return make_training_corpus(tmp_path_factory.mktemp("mtbi"))


@pytest.fixture(scope="session")
def shards(data, tmp_path_factory):
    """``data``'s training corpus written as shards (``helpers.SHARD_SIZE`` cuts each: 4 shards),
    with the teacher's cached states; tests that change it work on a copy."""
    from helpers import SHARD_SIZE
    from mtbi_fast.shards import write_shards

    out = tmp_path_factory.mktemp("shards") / "s"
    write_shards(data / "train.jsonl", data / "beh", out, shard_size=SHARD_SIZE, teacher_hidden=True,
                 progress=False)
    return out
