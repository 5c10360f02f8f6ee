"""Makes tiny_tokenizer.json: a 512-token byte-level BPE for the random tiny LLM of the tests.

Trained on English prose that ships with Python (module docstrings), so it needs no download:
    python mtbi_fast/assets/make_tiny_tokenizer.py
"""

import importlib
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

MODULES = ["argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
           "decimal", "email", "functools", "http", "inspect", "json", "logging", "os", "pathlib",
           "pickle", "random", "re", "shutil", "socket", "statistics", "string", "subprocess",
           "tarfile", "textwrap", "threading", "typing", "unittest", "urllib", "uuid", "zipfile"]


def corpus():
    for name in MODULES:
        mod = importlib.import_module(name)
        for obj in [mod, *vars(mod).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                yield doc


def main():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    out = Path(__file__).with_name("tiny_tokenizer.json")
    tok.save(str(out))
    print(f"wrote {out} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
