"""mtbi_fast/io.py: the one implementation of file hashing and moving a folder aside, checked
against hashlib directly in each format that run, behaviors and shard folders record."""

import hashlib

from mtbi_fast.io import move_aside, sha256_and_lines, sha256_files


def test_each_recorded_hash_format_against_hashlib(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.bin"
    a.write_bytes(b'{"x": 1}\n{"x": 2}\n')
    b.write_bytes(bytes(range(256)) * 40000)  # over one 4 MiB block
    ra, rb = a.read_bytes(), b.read_bytes()
    sha = lambda *parts: hashlib.sha256(b"".join(parts)).hexdigest()  # noqa: E731
    # shards: the bytes back to back; one file is its plain sha256
    assert sha256_files([a, b]) == sha(ra, rb) and sha256_files([a]) == hashlib.sha256(ra).hexdigest()
    # run folders: names, bytes, a NUL after each file
    assert sha256_files([a, b], names=True, separator=b"\0") == sha(b"a.jsonl\0", ra, b"\0", b"b.bin\0", rb, b"\0")
    assert sha256_files([a], separator=b"\0") == sha(ra, b"\0")
    # behaviors' tokenizer files: names and each file's digest
    assert sha256_files([a, b], names=True, digest_each=True) == sha(
        b"a.jsonl\0", hashlib.sha256(ra).digest(), b"b.bin\0", hashlib.sha256(rb).digest())
    assert sha256_and_lines(a) == (hashlib.sha256(ra).hexdigest(), 2)


def test_move_aside_keeps_what_it_is_told_and_never_reuses_a_name(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in (".lock", "checkpoints", "metrics.jsonl"):
        (out / name).write_text(name)
    first = move_aside(out, first="checkpoints", keep=lambda p: p.name == ".lock")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert sorted(p.name for p in first.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert first.name.startswith("run.replaced-")
    (out / "x").write_text("x")
    second = move_aside(out, keep=lambda p: p.name == ".lock")
    assert second != first and (second / "x").read_text() == "x" and (first / "checkpoints").is_file()
