"""Whole-turn reuse, measured with the real Llama 2 tokenizer: how much of turn k's engine sequence (its
prompt and the answer's tokens) turn k+1's prompt begins with, after the answer went to the client as text
and came back in the history (detokenize, Meta's template, tokenize). The prefix cache can reuse exactly
that much, in whole blocks (docs/engine.md, Whole-turn reuse)."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.engine import start_engine
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, EngineRequest
from serve_app.protocol import ChatMessage
from serve_app.stage.chat_template import render_chat_prompt
from serve_app.stage.detokenizer import IncrementalDetokenizer

BLOCK = 16
SYSTEM = {"role": "system", "content": "Respond like a michelin starred chef."}
TURNS = [
    ("Can you name at least two different techniques to cook lamb?",
     "Bonjour! Let me tell you, my friend, cooking lamb is an art form: sous vide, and slow roasting."),
    ("Tell me more about the second method.\n",
     "Slow roasting at 120 °C — six hours, basted every hour — gives a crème brûlée-soft shoulder. 😋"),
    ("And a sauce? 料理は好きです。", "A jus: the pan juices, shallots, thyme, a splash of red wine."),
    ("Thanks!", ""),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return PreTrainedTokenizerFast.from_pretrained(tiny_checkpoint)


def _render(tokenizer, raw: list[dict]) -> list[int]:
    return render_chat_prompt([ChatMessage.model_validate(m) for m in raw],
                              lambda text: tokenizer.encode(text, add_special_tokens=False),
                              tokenizer.bos_token_id, tokenizer.eos_token_id)


def _text(tokenizer, token_ids: list[int]) -> str:
    """What the stage sends the client for these generated tokens (EOS is not text)."""
    detokenizer = IncrementalDetokenizer(tokenizer)
    ids = [t for t in token_ids if t != tokenizer.eos_token_id]
    return detokenizer.push(ids) + detokenizer.flush()


def _shared(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _next_turn(tokenizer, history: list[dict], generated: list[int], question: str
               ) -> tuple[list[int], list[int]]:
    """Turn k's engine sequence (prompt + generated tokens) and turn k+1's prompt."""
    prompt = _render(tokenizer, history)
    following = history + [{"role": "assistant", "content": _text(tokenizer, generated)},
                           {"role": "user", "content": question}]
    return prompt + generated, _render(tokenizer, following)


def test_a_canonical_answer_is_reused_to_its_last_token_and_no_further(tokenizer):
    """Answers tokenized as the tokenizer itself would (what a trained model mostly samples) round-trip:
    the next prompt repeats the last prompt and every answer token. It parts at the answer's end, where the
    engine's sequence has the EOS the model sampled and Meta's template has `{answer} ` + EOS: a "▁"
    first."""
    space = tokenizer.convert_tokens_to_ids("\u2581")
    history = [SYSTEM]
    for k, (question, answer) in enumerate(TURNS[:-1]):
        history.append({"role": "user", "content": question})
        answer_ids = tokenizer.encode(answer, add_special_tokens=False)
        sequence, following = _next_turn(tokenizer, history, answer_ids + [tokenizer.eos_token_id],
                                         TURNS[k + 1][0])
        prompt_len = len(sequence) - len(answer_ids) - 1
        shared = _shared(sequence, following)
        assert shared == prompt_len + len(answer_ids), k
        assert sequence[shared] == tokenizer.eos_token_id
        assert following[shared:shared + 2] == [space, tokenizer.eos_token_id]
        history.append({"role": "assistant", "content": answer})


def test_an_empty_answer_still_reuses_the_whole_last_prompt(tokenizer):
    history = [SYSTEM, {"role": "user", "content": TURNS[0][0]}]
    sequence, following = _next_turn(tokenizer, history, [tokenizer.eos_token_id], "Hello?")
    assert _shared(sequence, following) == len(sequence) - 1


@pytest.mark.parametrize("pieces", [
    ["\u2581H", "ello", "!"],  # split where the tokenizer would not split
    ["<0x0A>", "\u2581Sure", "!"],  # a leading newline, which the template strips
    ["\u2581\u2581Sure", "!"],  # a leading double space, stripped too
])
def test_reuse_stops_at_the_first_answer_token_that_does_not_survive_the_round_trip(tokenizer, pieces):
    history = [SYSTEM, {"role": "user", "content": TURNS[0][0]}]
    generated = tokenizer.convert_tokens_to_ids(pieces) + [tokenizer.eos_token_id]
    sequence, following = _next_turn(tokenizer, history, generated, "Go on.")
    assert _shared(sequence, following) == len(sequence) - len(generated)  # the last prompt, not one more


def test_the_engine_reuses_exactly_the_full_blocks_the_two_turns_share(tiny_checkpoint, tokenizer):
    """The tiny model's random answers, through the stage's detokenizer and the template, into the engine:
    the next turn's cached tokens are the whole blocks of what it shares with the last turn's computed
    tokens (its prompt and every generated token but the last, which was sampled and never fed)."""
    model = ModelConfig(source=str(tiny_checkpoint), served_model_id="tiny", dtype="float32",
                        max_model_len=1024)
    engine = start_engine(model, EngineConfig(device="cpu", kv_cache_bytes=32 * 2**20,
                                              heartbeat_interval_s=5))

    def run(name: str, prompt: list[int]) -> tuple[list[int], int]:
        params = SamplingParams(max_tokens=24, temperature=0)
        engine.add_request(EngineRequest(ChoiceId(name, 0), prompt, params))
        tokens, cached = [], None
        while engine.has_unfinished():
            for output in engine.step():
                tokens += output.new_token_ids
                cached = output.num_cached_tokens if output.num_cached_tokens is not None else cached
        return tokens, cached

    try:
        history = [SYSTEM]
        previous: list[int] | None = None
        for k, (question, _) in enumerate(TURNS):
            history.append({"role": "user", "content": question})
            prompt = _render(tokenizer, history)
            generated, cached = run(f"turn{k}", prompt)
            if previous is not None:
                shared = _shared(previous, prompt)
                assert shared >= len(_render(tokenizer, history[:-2]))  # at least the last prompt
                assert cached == min(shared // BLOCK, (len(prompt) - 1) // BLOCK) * BLOCK, k
            else:
                assert cached == 0
            previous = prompt + generated[:-1]
            history.append({"role": "assistant", "content": _text(tokenizer, generated)})
    finally:
        engine.shutdown()
