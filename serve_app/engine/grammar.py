"""Constrained decoding in the engine: grammars prepared off the engine's thread, one matcher per sequence.

In: a sequence's `SamplingParams.grammar` (text in llguidance's Lark dialect, built and validated by the
stage). Out, each step: the token bitmask of the rows that have a grammar (bit j of word k allows token
32k + j), which the sampler applies to their logits; after sampling, which of those rows completed their
grammar (only EOS could follow) and which could not take their token.

- `GrammarCompiler` prepares grammars on one background thread, so that neither the engine's loop nor a step
  waits for one: a sequence whose grammar is not ready yet waits outside the batch (`Engine`). A prepared
  grammar is a matcher in its start state whose first mask has been computed once, kept in an LRU cache
  keyed by the grammar's text: the same schema on many requests is prepared once, and each sequence gets a
  copy of it (microseconds).
- `GrammarTable` is the sampler's per-sequence grammar state: one matcher per running sequence with a
  grammar, advanced with every token the sequence samples, kept across preemption (a preempted sequence keeps
  its output tokens and is recomputed, so the matcher that consumed them stays right) and freed when the
  sequence finishes or is aborted.

llguidance (https://github.com/guidance-ai/llguidance) is imported only when a first grammar arrives, on the
compiler's thread: an engine that serves no grammar never loads it, and runs where it is not installed. A
matcher is not thread-safe ("Already borrowed"): a prepared template is read by the engine's thread only once
its future is done, and a sequence's matcher is touched by the engine's thread alone.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from serve_app.engine.sequence import ChoiceId, Sequence
from serve_app.errors import GrammarUnavailableError, InvalidRequestError
from serve_app.layers.transfer import upload

if TYPE_CHECKING:
    import llguidance

logger = logging.getLogger(__name__)


def import_llguidance():
    """The grammar library, or `GrammarUnavailableError` (503) where it is not installed."""
    try:
        import llguidance
    except ImportError as exc:
        raise GrammarUnavailableError() from exc
    return llguidance


def bitmask_words(vocab_size: int) -> int:
    """32-bit words per row of a token bitmask."""
    return (vocab_size + 31) // 32


class GrammarCompiler:
    """Prepares grammars on a background thread, and keeps the last `cache_size` prepared ones."""

    def __init__(self, tokenizer_path: str, vocab_size: int, eos_token_ids: tuple[int, ...], cache_size: int):
        """`tokenizer_path`: the checkpoint folder whose tokenizer the model's token ids belong to (loaded on
        the first grammar); `vocab_size`: the model's, which is the width of its logits."""
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Future] = OrderedDict()  # grammar text -> future of its template
        self._executor: ThreadPoolExecutor | None = None  # started with the first grammar
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on the compiler's thread

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def prepare(self, grammar: str) -> Future:
        """The future of `grammar`'s prepared template: done at once when it is cached (or already being
        prepared), else prepared on the compiler's thread. A failure is its future's exception (a
        `ServiceError`), and is not cached."""
        future = self._cache.get(grammar)
        if future is not None and not (future.done() and future.exception() is not None):
            self._cache.move_to_end(grammar)
            return future
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        future = self._executor.submit(self._build, grammar)
        self._cache[grammar] = future
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)  # a future evicted while pending still completes for its waiters
        return future

    def _build(self, grammar: str) -> llguidance.LLMatcher:
        """On the compiler's thread: a matcher in its start state, its first mask computed (the lexer and
        parser build their tables lazily; a copy made after this shares them)."""
        llguidance = import_llguidance()
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            # The stage validated the grammar before sending it, so this is a stage/engine mismatch.
            raise InvalidRequestError("The output constraint cannot be used: "
                                      f"{_first_line(matcher.get_error())}")
        scratch = torch.empty(bitmask_words(self.vocab_size), dtype=torch.int32)
        matcher.unsafe_compute_mask_ptr(scratch.data_ptr(), scratch.numel() * scratch.element_size())
        return matcher

    def _load_tokenizer(self) -> llguidance.LLTokenizer:
        import llguidance.hf
        from transformers import PreTrainedTokenizerFast

        # Not AutoTokenizer: see stage/deployment.py (transformers 5 mis-encodes Llama's leading spaces).
        hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(self.tokenizer_path)
        return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=self.vocab_size,
                                            eos_token=list(self.eos_token_ids))

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


class GrammarTable:
    """The matchers of the sequences with a grammar, and the step's token bitmask for their rows."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device):
        self.max_rows = max_rows
        self.vocab_size = vocab_size
        self.device = device
        self._matchers: dict[ChoiceId, llguidance.LLMatcher] = {}
        self._bitmask: torch.Tensor | None = None  # int32 [max_rows, words] on the host, made on first use
        self._executor: llguidance.LLExecutor | None = None

    @property
    def num_held(self) -> int:
        return len(self._matchers)

    def add(self, choice: ChoiceId, template: llguidance.LLMatcher) -> None:
        """Give `choice` its own matcher: a copy of a prepared template, in the start state."""
        self._matchers[choice] = template.deep_copy()

    def release(self, choice: ChoiceId) -> None:
        self._matchers.pop(choice, None)

    def fill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The token bitmask of the rows of `seqs` that have a grammar, int32 `[G, words]` on the device,
        and those rows' indices (int64 `[G]` on the device), None when every row has a grammar."""
        rows = [row for row, seq in enumerate(seqs) if seq.params.grammar is not None]
        if self._bitmask is None:
            self._bitmask = torch.empty((self.max_rows, bitmask_words(self.vocab_size)), dtype=torch.int32,
                                        pin_memory=self.device.type == "cuda")
        bitmask = self._bitmask[:len(rows)]
        targets = [(self._matchers[seqs[row].choice], i) for i, row in enumerate(rows)]
        if len(targets) == 1:
            matcher, _ = targets[0]
            matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * bitmask.element_size())
        else:  # llguidance's own threads, without the GIL
            if self._executor is None:
                self._executor = import_llguidance().LLExecutor()
            self._executor.unsafe_compute_mask_ptr(targets, bitmask.data_ptr(),
                                                   bitmask.shape[1] * bitmask.element_size(), len(rows))
        on_device = bitmask.to(self.device, non_blocking=True)
        if len(rows) == len(seqs):
            return on_device, None
        return on_device, upload(rows, torch.int64, self.device)

    def accept(self, seqs: list[Sequence], token_ids: list[int]
               ) -> tuple[frozenset[ChoiceId], frozenset[ChoiceId]]:
        """Advance each grammar row's matcher by its sampled token. Returns the choices whose grammar is now
        complete (only EOS could follow), and those whose matcher refused the token (it was allowed by the
        mask, so only non-finite logits can cause that; the matcher cannot continue)."""
        completed, failed = [], []
        for seq, token in zip(seqs, token_ids, strict=True):
            if seq.params.grammar is None:
                continue
            matcher = self._matchers[seq.choice]
            if not matcher.consume_token(token):
                logger.error("grammar of %s refused sampled token %d: %s", seq.choice, token,
                             _first_line(matcher.get_error()))
                failed.append(seq.choice)
            elif matcher.is_stopped():
                completed.append(seq.choice)
        return frozenset(completed), frozenset(failed)
