"""Prompts (mtbi_fast/prompts.py): the chat-template halves around the utterance, checked against
the formatted text written out by hand, and left padding against a literal batch."""

import pytest
import torch

from mtbi_fast.hub import load_llm
from mtbi_fast.prompts import SPEECH, left_pad, prompt_halves, template_halves
from mtbi_fast.tasks import PLACEHOLDER

# a ChatML-style template (Qwen2's layout), written here rather than taken from a model
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return load_llm({"tiny": {}})[1]  # the bundled 512-token byte-level BPE, no chat template


def text(tokenizer, ids):
    return tokenizer.decode(ids)


def test_halves_without_a_chat_template_are_user_and_assistant_lines(tokenizer):
    before, after = template_halves(tokenizer, f"Summarize: {PLACEHOLDER} Be brief.")
    assert text(tokenizer, before) == "User: Summarize: "
    assert text(tokenizer, after) == " Be brief.\nAssistant:"


def test_halves_follow_the_tokenizers_chat_template(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", CHATML, raising=False)
    before, after = template_halves(tokenizer, f"Summarize: {PLACEHOLDER} Be brief.")
    assert text(tokenizer, before) == "<|im_start|>user\nSummarize: "
    assert text(tokenizer, after) == " Be brief.<|im_end|>\n<|im_start|>assistant\n"
    # the ids are the tokenizer's own for each half (what training and the exported model use)
    assert before == tokenizer("<|im_start|>user\nSummarize: ", add_special_tokens=False)["input_ids"]


def test_speech_goes_at_the_end_of_a_prompt_without_a_marker(tokenizer):
    assert prompt_halves(tokenizer, "Transcribe the audio.") == \
        template_halves(tokenizer, f"Transcribe the audio.\n{SPEECH}", SPEECH)
    before, after = prompt_halves(tokenizer, f"Listen: {SPEECH} What was said?")
    assert text(tokenizer, before) == "User: Listen: "
    assert text(tokenizer, after) == " What was said?\nAssistant:"


@pytest.mark.parametrize("prompt, message", [
    (f"{PLACEHOLDER} and {PLACEHOLDER}", r"has \{transcript\} 2 times; it marks the one place"),
    ("no marker here", r"has no \{transcript\} to put the utterance in: 'no marker here'"),
])
def test_a_prompt_needs_its_marker_exactly_once(tokenizer, prompt, message):
    with pytest.raises(ValueError, match=message):
        template_halves(tokenizer, prompt)


def test_left_pad_puts_each_row_at_the_right_end():
    rows = [torch.tensor([1, 2]), torch.tensor([3, 4, 5, 6]), torch.tensor([7])]
    batch, mask = left_pad(rows, value=-1)
    assert batch.tolist() == [[-1, -1, 1, 2], [3, 4, 5, 6], [-1, -1, -1, 7]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]] and mask.dtype == torch.long
    embeds, mask = left_pad([torch.ones(1, 3), torch.full((2, 3), 2.0)])
    assert embeds.shape == (2, 2, 3) and embeds[0, 0].eq(0).all() and embeds[0, 1].eq(1).all()
    assert embeds[1].eq(2).all() and mask.tolist() == [[0, 1], [1, 1]]
