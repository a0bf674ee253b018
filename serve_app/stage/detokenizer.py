"""Incremental detokenization: generated token ids in, text deltas out, one engine step at a time.

What "the text of the completion" is: the text the completion adds to the conversation, that is
`decode(prompt + completion)` with `decode(prompt)` removed from its front. For Llama 2 this keeps the
leading space of the first generated token (`▁Hello` gives " Hello", as the reference service returns
" Hello! It's nice to meet you."), whereas `tokenizer.decode(completion)` on its own would give "Hello":
Llama's decoder strips one leading space from whatever it decodes, because SentencePiece writes a `▁`
before the first word of every text it encodes.

How: the prefix-offset/read-offset technique. Each step decodes a small window, the tokens emitted by the
previous step (the prefix) plus the tokens not emitted yet, and emits the part of its text past the text of
the prefix alone. Every token is decoded a bounded number of times, so the cost is O(1) amortized per
token. The window always starts with a fixed anchor token, so the decoder's leading-space strip falls on the
anchor and never on generated text; since a chat prompt ends with an ordinary token ("]" of "[/INST]"),
this is exactly the prompt-relative text above.

Text is held back, never emitted broken:
- a run of byte-fallback tokens (`<0xF0>`, `<0x9F>`, ...) at the end waits until a non-byte token ends it:
  Hugging Face's ByteFallback decoder turns a whole run into text at once, and into one U+FFFD per byte
  if any byte of the run is invalid UTF-8, so no character of a run is final while the run is open;
- everything waits while the window's text ends in U+FFFD: the general rule, for decoders that render an
  unfinished multi-byte character that way (byte-level BPE).
`flush()` releases what is held when generation ends. With `skip_special_tokens`, special tokens (BOS, EOS)
are dropped on arrival: `decode` skips them and joins the byte runs on either side, so must we.

Invariant: the concatenated deltas, flush included, equal `decode(prompt + ids)` minus `decode(prompt)`
for the same `skip_special_tokens`, whatever the ids and however they are split across pushes.
"""

import re

from transformers import PreTrainedTokenizerBase

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text, a delta per `push`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._special_ids = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        # The anchor can be any ordinary token (not special, not a byte) with visible text, such as "a".
        self._anchor = tokenizer.encode("a", add_special_tokens=False)
        self._prefix_ids: list[int] = []  # emitted by the previous step: the window's context
        self._pending_ids: list[int] = []  # not emitted yet

    def push(self, token_ids: list[int]) -> str:
        """The text that `token_ids`, the newly generated tokens, add; "" while it is held back."""
        new_ids = [i for i in token_ids if i not in self._special_ids]
        self._pending_ids.extend(new_ids)
        # The text is ready up to the last non-byte token; a byte run still open at the end waits. Only the
        # new ids need looking at: anything pending before them was held back already and still is.
        ready = len(self._pending_ids)
        for token_id in reversed(new_ids):
            if not self._is_byte(token_id):
                return self._emit(ready, hold_replacement=True)
            ready -= 1
        return ""

    def flush(self) -> str:
        """The held-back text; call once, when generation ends (an unfinished character stays U+FFFD)."""
        return self._emit(len(self._pending_ids), hold_replacement=False) if self._pending_ids else ""

    def _emit(self, count: int, hold_replacement: bool) -> str:
        """Emit the text of the first `count` pending ids, unless it ends in U+FFFD and may be held."""
        ready = self._pending_ids[:count]
        prefix_text = self._decode(self._anchor + self._prefix_ids)
        full_text = self._decode(self._anchor + self._prefix_ids + ready)
        if hold_replacement and full_text.endswith(_REPLACEMENT):
            return ""
        delta = full_text[len(prefix_text) :]
        # `ready` ends with a non-byte token (or generation is over), so as the next window's start it
        # never cuts a byte run in two.
        self._prefix_ids, self._pending_ids = ready, self._pending_ids[count:]
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _is_byte(self, token_id: int) -> bool:
        return _BYTE_TOKEN.fullmatch(self._tokenizer.convert_ids_to_tokens(token_id)) is not None
