"""The packaged Llama 2 tokenizer: SentencePiece-exact ids, BOS handling, decoding and the chat template.

The reference ids are llama.cpp's test vectors for this vocabulary (`tests/data/llama2-vocab-tests.*`),
produced by the original SentencePiece model, without BOS.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

ASSETS = Path(__file__).resolve().parents[2] / "serve_app" / "assets" / "llama2-tokenizer"
DATA = Path(__file__).resolve().parents[1] / "data"
SEPARATOR = "\n__ggml_vocab_test__\n"


def _vectors() -> list[tuple[str, list[int]]]:
    texts = (DATA / "llama2-vocab-tests.inp").read_text(encoding="utf-8").split(SEPARATOR)
    # The file ends with a separator, which leaves one empty piece after the last test string.
    assert texts[-1] == ""
    texts = texts[:-1]
    lines = (DATA / "llama2-vocab-tests.out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(texts) == len(lines) == 46
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines, strict=True)]


VECTORS = _vectors()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS)


@pytest.mark.parametrize(("text", "ids"), VECTORS, ids=[repr(t)[:40] for t, _ in VECTORS])
def test_matches_sentencepiece(tokenizer, text: str, ids: list[int]) -> None:
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids


def test_vectors_cover_leading_spaces_and_empty() -> None:
    # The cases a Metaspace pre-tokenizer gets wrong must be among the vectors, or the test above proves little.
    texts = [text for text, _ in VECTORS]
    assert "" in texts and " Hello" in texts and "   Hello" in texts


def test_special_tokens(tokenizer) -> None:
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == ("<unk>", "<s>", "</s>")
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token is None
    assert len(tokenizer) == 32000
    assert tokenizer.model_max_length == 4096


def test_bos_added_once_and_no_eos(tokenizer) -> None:
    assert tokenizer("Hello!", add_special_tokens=False)["input_ids"] == [15043, 29991]
    assert tokenizer("Hello!")["input_ids"] == [1, 15043, 29991]
    assert tokenizer.encode("") == [1]
    # Special tokens written in the text are single ids, and the text after one gets SentencePiece's
    # dummy-prefix space, as Meta's code (which encodes each turn separately) produces.
    ids = tokenizer("<s>[INST] Hi [/INST]</s>", add_special_tokens=False)["input_ids"]
    assert ids == [1, 518, 25580, 29962, 6324, 518, 29914, 25580, 29962, 2]


def test_inst_is_not_special(tokenizer) -> None:
    ids = tokenizer.encode("[INST]", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁[", "INST", "]"]


ROUND_TRIP = [
    "Hello world",
    "  two leading spaces",
    "tabs\tand\nnewlines\n",
    "🚀 emoji 😶‍🌫️",
    "中文，日本語、한국어",
    "Äpfel ½",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # BOS is followed by the dummy-prefix space, as with HF's Llama 2 tokenizer.
    assert tokenizer.decode(ids) == "<s> " + text


def test_incremental_decoding_keeps_spaces(tokenizer) -> None:
    # Decoding one token alone strips its leading space (SentencePiece does the same); streaming must decode
    # a prefix and take the new text after it, which then keeps the spaces (and waits out partial bytes).
    text = "Hello world, it's 🚀 time."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids[1:2]) == "world"
    streamed, previous = "", ""
    for end in range(1, len(ids) + 1):
        current = tokenizer.decode(ids[:end])
        if not current.endswith("\ufffd"):
            streamed += current[len(previous) :]
            previous = current
    assert streamed == text


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there "},
    {"role": "assistant", "content": " Hello! "},
    {"role": "user", "content": "Name a colour."},
]


def test_chat_template_text(tokenizer) -> None:
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
        "<s>[INST] Name a colour. [/INST]"
    )


def test_chat_template_ids_match_meta_reference(tokenizer) -> None:
    # Meta's chat_completion encodes each exchange on its own: BOS + "[INST] u [/INST] a " + EOS, then
    # BOS + "[INST] u [/INST]". Tokenizing the rendered template must give the same ids.
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    first_user = "<<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there"
    expected = [
        1,
        *encode(f"[INST] {first_user} [/INST] Hello! "),
        2,
        1,
        *encode("[INST] Name a colour. [/INST]"),
    ]
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.encode(rendered, add_special_tokens=False) == expected


def test_chat_template_rejects_bad_alternation(tokenizer) -> None:
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "hi"}], tokenize=False)
