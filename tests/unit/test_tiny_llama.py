"""The tiny Llama checkpoint: a real HF Llama folder, deterministic per seed, cached and rebuilt safely."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve_app import tiny_llama
from serve_app.tiny_llama import STAMP_FILE, build_tiny_llama, ensure_tiny_llama

# 2 x 32000 x 256 (embeddings, untied head) + 4 layers x (4 x 256^2 + 3 x 256 x 688 + 2 x 256) + 256.
EXPECTED_PARAMS = 19_548_416


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "a", seed=0)


def test_same_seed_same_bytes_and_tensors(built: Path, tmp_path: Path) -> None:
    again = build_tiny_llama(tmp_path / "b", seed=0)
    assert (again / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    first, second = load_file(built / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_other_seed_other_weights(built: Path, tmp_path: Path) -> None:
    other = load_file(build_tiny_llama(tmp_path / "c", seed=1) / "model.safetensors")
    mine = load_file(built / "model.safetensors")
    assert not torch.equal(other["model.embed_tokens.weight"], mine["model.embed_tokens.weight"])


def test_build_leaves_callers_rng_and_dtype_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_llama(tmp_path / "d", seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_default_dtype() == torch.float32


def test_loads_as_llama_2_shaped_checkpoint(built: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(built)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS
    assert model.dtype == torch.float32
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (32000, 256, 688)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (4, 8, 8)
    assert config.max_position_embeddings == 4096 and config.rms_norm_eps == 1e-5
    assert not config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, None)
    assert (model.generation_config.bos_token_id, model.generation_config.eos_token_id) == (1, 2)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 15043, 29991]])).logits
    assert logits.shape == (1, 3, 32000) and torch.isfinite(logits).all()


def test_checkpoint_tokenizer_is_the_packaged_one(built: Path) -> None:
    # config.json says model_type "llama"; AutoTokenizer must still keep tokenizer.json's pipeline rather than
    # rebuild transformers 5's LlamaTokenizer, whose Metaspace pre-tokenizer mis-encodes leading spaces.
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert type(tokenizer).__name__ != "LlamaTokenizer"
    assert tokenizer("Hello!")["input_ids"] == [1, 15043, 29991]
    assert tokenizer("   Hello", add_special_tokens=False)["input_ids"] == [1678, 15043]
    assert tokenizer.chat_template and "<<SYS>>" in tokenizer.chat_template


def test_default_dir_honours_cache_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLAMA_SERVE_CACHE", str(tmp_path))
    assert tiny_llama.default_checkpoint_dir() == tmp_path / "tiny-llama-2-chat"
    monkeypatch.delenv("LLAMA_SERVE_CACHE")
    assert tiny_llama.default_checkpoint_dir() == Path.home() / ".cache" / "llama-serve" / "tiny-llama-2-chat"


def test_ensure_builds_once_then_reuses(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    assert ensure_tiny_llama(target) == target
    weights = target / "model.safetensors"
    first_build = weights.stat().st_mtime_ns
    ensure_tiny_llama(target)
    assert weights.stat().st_mtime_ns == first_build
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no staging folders left behind


def test_ensure_rebuilds_an_older_recipe(tmp_path: Path) -> None:
    target = ensure_tiny_llama(tmp_path / "tiny")
    (target / STAMP_FILE).write_text(json.dumps({"recipe": "older"}))
    (target / "leftover.txt").write_text("from the old recipe")
    ensure_tiny_llama(target)
    assert json.loads((target / STAMP_FILE).read_text())["recipe"] == tiny_llama.recipe_hash()
    assert not (target / "leftover.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_ensure_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(FileExistsError):
        ensure_tiny_llama(target)
    assert (target / "notes.txt").exists()


def test_racing_builders_leave_one_complete_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = [f.result() for f in [pool.submit(ensure_tiny_llama, target) for _ in range(3)]]
    assert results == [target] * 3
    assert tiny_llama._is_current(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_cli_prints_the_folder(tmp_path: Path, capsys) -> None:
    tiny_llama.main(["--out", str(tmp_path / "cli")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
