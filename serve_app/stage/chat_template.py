"""Llama 2 chat prompt: OpenAI messages in, prompt token ids out.

Follows Meta's reference `chat_completion` (llama/generation.py) token for token: the system message is
folded into the first user turn as `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}`; every finished exchange is
`BOS + encode("[INST] {user} [/INST] {assistant} ") + EOS` and the last user turn is
`BOS + encode("[INST] {user} [/INST]")`, where each user text (system included) and assistant text is
stripped. Each piece is encoded on its own, as Meta's code does; Hugging Face's `apply_chat_template` gives
the same ids for Llama 2.

Beyond Meta's code, which takes strict user/assistant alternation after an optional leading system message:
- the one system message may stand anywhere; it still goes into the first user turn;
- Llama 2 knows no tools, so tools are written as text inside the turns it does know. An assistant's tool
  calls follow its text as lines `Tool call ({name}): {arguments}`. Tool results become user-side text
  `Tool result ({name}): {content}`, named by the function of the call they answer (or by the call id
  when no earlier assistant message made that call). The results that follow one assistant message, and
  a user message after them, share one `[INST]` turn, separated by blank lines, so the conversation keeps
  the alternation the model was trained on and may end with tool results for the model to answer.

Any other order (two user messages in a row, an assistant message first or last, no user message at all,
a tool result not following an assistant message, a second system message) raises `InvalidRequestError`
with param "messages".
"""

from collections.abc import Callable
from dataclasses import dataclass

from serve_app.errors import InvalidRequestError
from serve_app.protocol import ChatMessage

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation's prompt token ids, and its opening: the first user turn's text with the system prompt
    folded in, the same in every turn of one conversation (each resends the history), which the stage keys
    the conversation's replica group by."""

    token_ids: list[int]
    opening: str


def render_chat(messages: list[ChatMessage], encode: Callable[[str], list[int]], bos_id: int, eos_id: int
                ) -> ChatPrompt:
    """`messages` as prompt token ids, and their opening; `encode` is the tokenizer without special tokens."""
    turns = _turns(messages)
    ids: list[int] = []
    for text, finished in _pieces(turns):
        ids.append(bos_id)
        ids.extend(encode(text))
        if finished:
            ids.append(eos_id)
    return ChatPrompt(ids, turns[0])


def render_chat_prompt(
    messages: list[ChatMessage], encode: Callable[[str], list[int]], bos_id: int, eos_id: int
) -> list[int]:
    """Prompt token ids for `messages`; `encode` is the tokenizer without special tokens."""
    return render_chat(messages, encode, bos_id, eos_id).token_ids


def _pieces(turns: list[str]) -> list[tuple[str, bool]]:
    """The texts to encode one by one, each with whether it is a finished exchange (ends with EOS)."""
    pieces = [
        (f"{B_INST} {user.strip()} {E_INST} {assistant.strip()} ", True)
        for user, assistant in zip(turns[:-1:2], turns[1::2], strict=True)
    ]
    pieces.append((f"{B_INST} {turns[-1].strip()} {E_INST}", False))
    return pieces


def _turns(messages: list[ChatMessage]) -> list[str]:
    """The texts of the turns Llama 2 knows: user, assistant, user, ..., user (always an odd count)."""
    system: str | None = None
    turns: list[str] = []
    tool_names: dict[str, str] = {}  # tool call id -> function name, to label the call's result
    previous: str | None = None  # role of the last non-system message
    for i, message in enumerate(messages):
        text = message.content or ""
        if message.role == "system":
            if system is not None:
                raise _order_error(f"Message {i} is a second system message; at most one is allowed.")
            system = text
            continue
        if message.role == "user":
            if previous == "user":
                raise _order_error(f"Message {i} is a user message following another user message.")
            if previous == "tool":
                turns[-1] += f"\n\n{text}"
            else:
                turns.append(text)
        elif message.role == "assistant":
            if previous is None:
                raise _order_error(f"Message {i} is an assistant message before any user message.")
            if previous == "assistant":
                raise _order_error(f"Message {i} is an assistant message following another one.")
            calls = message.tool_calls or []
            tool_names.update({call.id: call.function.name for call in calls})
            lines = [f"Tool call ({call.function.name}): {call.function.arguments}" for call in calls]
            turns.append("\n".join([text, *lines] if text else lines))
        else:  # tool
            if previous not in ("assistant", "tool"):
                raise _order_error(f"Message {i} is a tool result that does not follow an assistant message.")
            assert message.tool_call_id is not None  # the protocol requires it for role "tool"
            result = f"Tool result ({tool_names.get(message.tool_call_id, message.tool_call_id)}): {text}"
            if previous == "tool":
                turns[-1] += f"\n\n{result}"
            else:
                turns.append(result)
        previous = message.role

    if not turns:
        raise _order_error("The conversation has no user message.")
    if previous == "assistant":
        raise _order_error("The last message is from the assistant; it must be a user or tool message.")
    if system is not None:
        turns[0] = f"{B_SYS}{system}{E_SYS}{turns[0]}"
    return turns


def _order_error(detail: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{detail} Messages must be (user, assistant, tool*)* user, with at most one system message.",
        param="messages",
    )
