"""Incremental detokenization without Ray, on the real Llama 2 tokenizer: ids in, prompt-relative text out.

"The text of the completion" is `decode(prompt + ids)` minus `decode(prompt)`: it keeps the leading space of
the first generated token, which `decode(ids)` alone strips.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

import serve_app
from serve_app.stage.detokenizer import IncrementalDetokenizer

EOS = 2
HELLO, BANG = 15043, 29991  # "▁Hello", "!"
REPLACEMENT_TOKENS = [26308, 30140]  # vocabulary entries that are literally "��" and "�"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(Path(serve_app.__file__).parent / "assets" / "llama2-tokenizer")


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def completion_text(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """The definition: what the ids add to the decoded text of a chat prompt."""
    prompt = [1, *encode(tokenizer, "[INST] Hello! [/INST]")]
    before = tokenizer.decode(prompt, skip_special_tokens=True)
    after = tokenizer.decode(prompt + ids, skip_special_tokens=True)
    assert after.startswith(before)
    return after[len(before) :]


def split(ids: list[int], cuts: list[int]) -> list[list[int]]:
    points = sorted({c % (len(ids) + 1) for c in cuts})
    return [ids[a:b] for a, b in zip([0, *points], [*points, len(ids)])]


def detokenize(tokenizer: PreTrainedTokenizerBase, chunks: list[list[int]]) -> tuple[list[str], str]:
    """The deltas of each push, and the full text with the final flush."""
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(chunk) for chunk in chunks]
    deltas.append(detokenizer.flush())
    return deltas, "".join(deltas)


def test_first_token_keeps_its_space(tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push([HELLO]) == " Hello"
    assert detokenizer.push([BANG]) == "!"
    assert tokenizer.decode([HELLO]) == "Hello"  # what decoding the completion on its own would give


def test_reference_reply_one_token_at_a_time(tokenizer) -> None:
    reply = "Hello! It's nice to meet you. Is there something I can help you with?"
    ids = encode(tokenizer, reply)
    deltas, text = detokenize(tokenizer, [[i] for i in ids] + [[EOS]])
    assert text == " " + reply
    assert deltas[-2:] == ["", ""]  # EOS adds nothing, and nothing was left to flush


def test_multibyte_characters_are_held_until_complete(tokenizer) -> None:
    reply = "Smile 😀 ok 𝄞 and 你好 and 🦙🦙"
    ids = encode(tokenizer, reply)
    assert any(3 <= i <= 258 for i in ids)  # the emoji really go through byte fallback
    deltas, text = detokenize(tokenizer, [[i] for i in ids])
    assert text == " " + reply
    assert all("\ufffd" not in delta for delta in deltas)
    # The four byte tokens of 😀 emit nothing until the token after them closes the run.
    smile = ids.index(tokenizer.convert_tokens_to_ids("<0xF0>"))
    assert deltas[smile : smile + 4] == ["", "", "", ""]
    assert deltas[smile + 4].startswith("😀")


def test_unfinished_character_is_flushed_as_replacement(tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push([HELLO, 3 + 0xF0, 3 + 0x9F]) == " Hello"  # only the open run waits
    assert detokenizer.flush() == "\ufffd\ufffd"


def test_special_tokens_are_dropped(tokenizer) -> None:
    # decode() skips the EOS and joins the byte runs on either side of it, so the stream must too: here the
    # joined run is invalid UTF-8 and becomes one U+FFFD per byte, even though "你" alone was complete.
    ids = [3 + 0xE4, 3 + 0xBD, 3 + 0xA0, EOS, 3 + 0x80, HELLO, EOS]
    deltas, text = detokenize(tokenizer, [[i] for i in ids])
    assert text == completion_text(tokenizer, ids) == "\ufffd" * 4 + " Hello"
    assert "</s>" not in "".join(deltas)


def test_special_tokens_kept_when_asked(tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    assert detokenizer.push([HELLO, EOS]) == " Hello</s>"


def test_cost_per_token_is_bounded(tokenizer) -> None:
    class CountingTokenizer:
        """Delegates to the tokenizer and counts the ids passed to decode."""

        def __init__(self) -> None:
            self.decoded = 0

        def __getattr__(self, name: str):
            return getattr(tokenizer, name)

        def decode(self, ids: list[int], **kwargs) -> str:
            self.decoded += len(ids)
            return tokenizer.decode(ids, **kwargs)

    ids = encode(tokenizer, "All work and no play makes Jack a dull boy, 好. " * 40)
    counting = CountingTokenizer()
    detokenizer = IncrementalDetokenizer(counting)
    text = "".join(detokenizer.push([i]) for i in ids)
    assert text == " " + tokenizer.decode(ids)
    # Re-decoding the whole output at every step would cost about len(ids)**2 / 2.
    assert counting.decoded <= 8 * len(ids)


token_ids = st.one_of(
    st.integers(min_value=3, max_value=258),  # byte fallback
    st.integers(min_value=0, max_value=31999),
    st.sampled_from([0, 1, 2, 29871, *REPLACEMENT_TOKENS]),  # specials, "▁", literal U+FFFD
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(ids=st.lists(token_ids, max_size=40), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_random_ids_any_split(tokenizer, ids: list[int], cuts: list[int]) -> None:
    _, text = detokenize(tokenizer, split(ids, cuts))
    assert text == completion_text(tokenizer, ids)
    # Decoded on its own, the same ids lose exactly the one leading space Llama's decoder strips.
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.removeprefix(" ")


@settings(max_examples=200, derandomize=True, deadline=None)
@given(reply=st.text(max_size=30), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_real_text_any_split(tokenizer, reply: str, cuts: list[int]) -> None:
    assume(not any(special in reply for special in ("<s>", "</s>", "<unk>")))
    ids = encode(tokenizer, reply)
    deltas, text = detokenize(tokenizer, split(ids, cuts))
    assert text == completion_text(tokenizer, ids) == (" " + reply if reply else "")
    if "\ufffd" not in reply:
        assert all("\ufffd" not in delta for delta in deltas)
