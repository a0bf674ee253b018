"""Unit tests of the Llama 2 chat prompt, with a character-level fake tokenizer.

The fake makes token ids readable back into text, so the id rendering and the text rendering are checked
against each other. One test compares with the real tokenizer's own chat template when the project ships it.
"""

from pathlib import Path
from typing import Any

import pytest

from serve_app.errors import InvalidRequestError
from serve_app.protocol import ChatMessage
from serve_app.stage.chat_template import render_chat_prompt

BOS, EOS = 1, 2
TOKENIZER_DIR = Path(__file__).parents[2] / "serve_app" / "assets" / "llama2-tokenizer"

SYSTEM = "Respond like a michelin starred chef."
QUESTION = "Can you name at least two different techniques to cook lamb?"
ANSWER = (
    "Bonjour! Let me tell you, my friend, cooking lamb is an art form, and I'm more than happy to share with "
    "you not two, but three of my favorite techniques to coax out the rich, unctuous flavors and tender "
    'textures of this majestic protein. First, we have the classic "Sous Vide" method. Next, we have the '
    'ancient art of "Sous le Sable". And finally, we have the more modern technique of "Hot Smoking."'
)
FOLLOW_UP = "Tell me more about the second method."
CHEF = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": ANSWER},
    {"role": "user", "content": FOLLOW_UP},
]


def encode(text: str) -> list[int]:
    """One token per character, offset so that no character collides with BOS or EOS."""
    return [1000 + ord(char) for char in text]


def decode(ids: list[int]) -> str:
    return "".join({BOS: "<s>", EOS: "</s>"}.get(i) or chr(i - 1000) for i in ids)


def messages(*raw: dict[str, Any]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(message) for message in raw]


def render(*raw: dict[str, Any]) -> str:
    """The prompt's token ids as text (each test tokenizer id is one character; BOS/EOS as <s>, </s>)."""
    return decode(render_chat_prompt(messages(*raw), encode, BOS, EOS))


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_single_user_message() -> None:
    assert render({"role": "user", "content": "Hello!"}) == "<s>[INST] Hello! [/INST]"


def test_single_user_message_ids() -> None:
    ids = render_chat_prompt(messages({"role": "user", "content": "Hello!"}), encode, BOS, EOS)
    assert ids == [BOS, *encode("[INST] Hello! [/INST]")]


def test_reference_multi_turn_example() -> None:
    assert render(*CHEF) == (
        f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{QUESTION} [/INST] {ANSWER} </s>"
        f"<s>[INST] {FOLLOW_UP} [/INST]"
    )


def test_each_exchange_is_encoded_on_its_own() -> None:
    ids = render_chat_prompt(messages(*CHEF[1:]), encode, BOS, EOS)
    assert ids == [
        BOS,
        *encode(f"[INST] {QUESTION} [/INST] {ANSWER} "),
        EOS,
        BOS,
        *encode(f"[INST] {FOLLOW_UP} [/INST]"),
    ]


def test_turns_are_stripped_as_in_metas_code() -> None:
    text = render(
        {"role": "system", "content": " be brief "},
        {"role": "user", "content": "  a  "},
        {"role": "assistant", "content": "\n b \n"},
        {"role": "user", "content": " c\n"},
    )
    # The system text is not stripped on its own: Meta strips the user turn it was folded into.
    assert text == "<s>[INST] <<SYS>>\n be brief \n<</SYS>>\n\n  a [/INST] b </s><s>[INST] c [/INST]"


@pytest.mark.parametrize("position", [2, 3, 4])
def test_system_message_anywhere_goes_into_the_first_user_turn(position: int) -> None:
    moved = [*CHEF[1:]]
    moved.insert(position - 1, CHEF[0])
    assert render(*moved) == render(*CHEF)


def test_text_parts_render_joined() -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    assert render({"role": "user", "content": parts}) == "<s>[INST] Hello\nthere [/INST]"


def test_tool_calls_and_results_render_as_text() -> None:
    text = render(
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                call("c1", "weather", '{"city":"Paris"}'),
                call("c2", "weather", '{"city":"Rome"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "tool", "tool_call_id": "c2", "content": "24C"},
    )
    assert text == (
        "<s>[INST] Weather in Paris and Rome? [/INST] "
        'Tool call (weather): {"city":"Paris"}\nTool call (weather): {"city":"Rome"} </s>'
        "<s>[INST] Tool result (weather): 18C\n\nTool result (weather): 24C [/INST]"
    )


def test_tool_results_share_a_turn_with_the_next_user_message() -> None:
    text = render(
        {"role": "user", "content": "Look it up."},
        {"role": "assistant", "content": "Sure.", "tool_calls": [call("c1", "search", "{}")]},
        {"role": "tool", "tool_call_id": "c1", "content": "nothing found"},
        {"role": "assistant", "content": "Nothing."},
        {"role": "tool", "tool_call_id": "unknown", "content": "late"},
        {"role": "user", "content": "Thanks."},
    )
    assert text == (
        "<s>[INST] Look it up. [/INST] Sure.\nTool call (search): {} </s>"
        "<s>[INST] Tool result (search): nothing found [/INST] Nothing. </s>"
        "<s>[INST] Tool result (unknown): late\n\nThanks. [/INST]"
    )


@pytest.mark.parametrize(
    "raw",
    [
        [{"role": "system", "content": "s"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "assistant", "content": "c"},
        ],
        [
            {"role": "system", "content": "s"},
            {"role": "system", "content": "t"},
            {"role": "user", "content": "a"},
        ],
        [{"role": "tool", "tool_call_id": "c1", "content": "r"}, {"role": "user", "content": "a"}],
        [{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "c1", "content": "r"}],
    ],
)
def test_wrong_order_is_rejected(raw: list[dict[str, Any]]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        render_chat_prompt(messages(*raw), encode, BOS, EOS)
    assert info.value.param == "messages"
    assert "(user, assistant, tool*)* user" in info.value.message


@pytest.mark.skipif(not TOKENIZER_DIR.is_dir(), reason="the real tokenizer is not in serve_app/assets yet")
def test_ids_equal_the_real_tokenizers_chat_template() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    padded = [
        {"role": "system", "content": " be brief "},
        {"role": "user", "content": "  a  "},
        {"role": "assistant", "content": "\n b \n"},
        {"role": "user", "content": " c\n"},
    ]
    conversations = [CHEF, CHEF[1:], padded, [{"role": "user", "content": "Hello!"}]]
    for conversation in conversations:
        expected = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
        ids = render_chat_prompt(
            messages(*conversation),
            lambda text: tokenizer.encode(text, add_special_tokens=False),
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
        )
        assert ids == expected
