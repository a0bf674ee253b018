"""Convert llama.cpp's Llama 2 vocabulary (GGUF) into the Hugging Face tokenizer folder the package ships.

In: `ggml-vocab-llama-spm.gguf`, the Llama / Llama 2 SentencePiece vocabulary as llama.cpp keeps it for its
tokenizer tests (tokens, scores and token types; no merges, no weights).
Out: `serve_app/assets/llama2-tokenizer/` with `tokenizer.json`, `tokenizer_config.json` and
`special_tokens_map.json`, laid out like meta-llama/Llama-2-7b-chat-hf's own files, so that
`AutoTokenizer.from_pretrained(folder)` works offline and tokenizes exactly as SentencePiece does.

We build the `tokenizers` pipeline ourselves rather than taking transformers' GGUF conversion, because that
one uses a Metaspace pre-tokenizer, which does not add the dummy-prefix `▁` to text that already starts with
a space and so misses 15 of llama.cpp's 46 test vectors. Llama 2's own tokenizer.json instead normalizes
with `Prepend("▁")` + `Replace(" ", "▁")` and has no pre-tokenizer; that is what we write.

Usage (from the repository root):

    python scripts/convert_llama2_tokenizer.py [GGUF] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GGUF = REPO_ROOT.parent / "shared" / "llama2-tokenizer" / "ggml-vocab-llama-spm.gguf"
DEFAULT_OUT = REPO_ROOT / "serve_app" / "assets" / "llama2-tokenizer"

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPIECE_UNDERLINE = "▁"

# llama.cpp token types (gguf.TokenType): only NORMAL pieces are produced by merging.
TOKEN_TYPE_NORMAL = 1

# The Jinja template from meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json, verbatim (including the
# double space before an assistant turn and the `\n` escapes that Jinja, not Python, turns into newlines).
LLAMA2_CHAT_TEMPLATE = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    r"{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    r"{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    r"{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    r"{% else %}{% set content = message['content'] %}{% endif %}"
    r"{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    r"{% endfor %}"
)


def read_gguf_vocab(path: Path) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types, indexed by token id."""
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert fields["tokenizer.ggml.model"].contents() == "llama", "not a SentencePiece (llama) vocabulary"
    tokens = list(fields["tokenizer.ggml.tokens"].contents())
    scores = [float(s) for s in fields["tokenizer.ggml.scores"].contents()]
    types = [int(t) for t in fields["tokenizer.ggml.token_type"].contents()]
    special = [fields[f"tokenizer.ggml.{name}_token_id"].contents() for name in ("unknown", "bos", "eos")]
    assert [tokens[i] for i in special] == [UNK, BOS, EOS], special
    return tokens, scores, types


def bpe_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece BPE vocabulary implies.

    SentencePiece merges the adjacent pair whose *result* has the highest score; HF's BPE merges the pair
    with the lowest rank. So every split of a piece into two known pieces becomes a merge, ranked by the
    piece's score (ties between splits of one piece by the ids of its halves), as transformers'
    SentencePieceExtractor did when Llama 2's tokenizer.json was made.
    """
    vocab = {token: i for i, token in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        if kind != TOKEN_TYPE_NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(tokens: list[str], scores: list[float], types: list[int]) -> Tokenizer:
    """The `tokenizers` pipeline of Llama 2's tokenizer.json, over this vocabulary."""
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=bpe_merges(tokens, scores, types),
            unk_token=UNK,
            fuse_unk=True,
            byte_fallback=True,  # <0x00>..<0xFF> pieces cover any character the vocabulary lacks
        )
    )
    # SentencePiece's dummy prefix: always one `▁` in front, even if the text already starts with a space.
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPIECE_UNDERLINE), normalizers.Replace(" ", SPIECE_UNDERLINE)]
    )
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(SPIECE_UNDERLINE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),  # drop the dummy prefix again
        ]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, vocab[BOS])],
    )
    # Special tokens are matched before normalization, so "<s>" in text stays one token.
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (UNK, BOS, EOS)])
    return tokenizer


def tokenizer_config(tokens: list[str]) -> dict:
    """tokenizer_config.json, as Llama-2-7b-chat-hf's, with a class every transformers version loads as-is.

    `tokenizer_class` is the generic fast tokenizer on purpose: transformers 5's `LlamaTokenizer` ignores
    tokenizer.json's normalizer and rebuilds a Metaspace pipeline, which breaks leading-space inputs.
    """
    added = {
        str(tokens.index(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in (UNK, BOS, EOS)
    }
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "chat_template": LLAMA2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        # Text after a special token gets a `▁` prefix too, like SentencePiece on each piece (legacy=True).
        "legacy": True,
        "model_max_length": 4096,
        "pad_token": None,
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": UNK,
        "use_default_system_prompt": False,
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_json(path: Path, tokenizer: Tokenizer) -> None:
    """Save as Llama 2's tokenizer.json does: one vocab entry and one "left right" merge per line.

    tokenizers would write each merge as a four-line list (3.6 MB); the string form is what Meta's file uses,
    is still read by every tokenizers version, and is unambiguous here because no Llama piece has a space.
    """
    data = json.loads(tokenizer.to_str())
    merges = data["model"]["merges"]
    assert not any(" " in piece for merge in merges for piece in merge)
    data["model"]["merges"] = [f"{left} {right}" for left, right in merges]
    write_json(path, data)
    # The file must load back to the very same pipeline.
    assert Tokenizer.from_file(str(path)).to_str() == tokenizer.to_str()


def convert(gguf_path: Path, out_dir: Path) -> None:
    tokens, scores, types = read_gguf_vocab(gguf_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer_json(out_dir / "tokenizer.json", build_tokenizer(tokens, scores, types))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(tokens))
    write_json(out_dir / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("gguf", nargs="?", type=Path, default=DEFAULT_GGUF, help="llama.cpp vocabulary file")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="tokenizer folder to write")
    args = parser.parse_args(argv)
    convert(args.gguf, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
