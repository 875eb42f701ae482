"""Tests of :mod:`nacd.testing`, the tiny offline test models, and of the shared fixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import nacd.testing
from nacd.testing import SMOLLM2_CHAT_TEMPLATE, TINY_KINDS, build_tiny_model, build_tiny_tokenizer

ROUND_TRIP_TEXTS = [
    "The capital of France is Paris.",
    "Question: What is 12 * 4?\nAnswer: 48.",
    "Hello, world!\n\nTwo blank lines above?  And two spaces;\ttab, too.\n",
    " leading space and trailing space ",
    "def add(a, b):\n    return a + b\n",
    'She said, "It\'s $19.99 (10% off)!" -- call 555-0123 or mail hello@example.com.',
    "\n",
    "Zebra xylophone quizzically jinxed VW; unusual words ~ {curly} [square] <angle> | back\\slash ^ `tick`",
]


@pytest.fixture(scope="module")
def tiny_dirs(tiny_llama_dir: Path, tiny_gemma_dir: Path) -> dict[str, Path]:
    """The session's tiny model folders by kind."""
    return {"llama": tiny_llama_dir, "gemma3": tiny_gemma_dir}


@pytest.fixture(scope="module")
def tiny_tokenizers(tiny_llama_tokenizer, tiny_gemma_tokenizer) -> dict:
    """The session's tiny tokenizers by kind."""
    return {"llama": tiny_llama_tokenizer, "gemma3": tiny_gemma_tokenizer}


@pytest.fixture(scope="module")
def tiny_models(tiny_dirs: dict[str, Path]) -> dict:
    """The tiny models by kind, loaded once for this module with ``AutoModelForCausalLM``."""
    return {kind: AutoModelForCausalLM.from_pretrained(path) for kind, path in tiny_dirs.items()}


def _state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_import_does_no_work():
    code = "import sys, nacd.testing; print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_kind_is_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown tiny model kind"):
        build_tiny_model("gpt2", tmp_path)
    assert not (tmp_path / "config.json").exists()
    with pytest.raises(ValueError, match="unknown tiny model kind"):
        build_tiny_tokenizer("bert")


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_folder_holds_safetensors_and_marker(kind: str, tiny_dirs: dict[str, Path]):
    path = tiny_dirs[kind]
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (path / name).is_file(), name
    assert not list(path.glob("*.bin"))
    marker = json.loads((path / "nacd_tiny.json").read_text())
    assert marker["kind"] == kind
    assert marker["seed"] == 0


def test_models_reload_with_expected_architectures(tiny_models: dict):
    llama, gemma = tiny_models["llama"], tiny_models["gemma3"]
    assert type(llama).__name__ == "LlamaForCausalLM"
    assert type(gemma).__name__ == "Gemma3ForCausalLM"
    assert llama.config.model_type == "llama"
    assert gemma.config.model_type == "gemma3_text"
    for model in (llama, gemma):
        assert model.dtype == torch.float32
        assert model.config.num_hidden_layers == 2
        assert model.config.max_position_embeddings == 512
        assert model.num_parameters() < 200_000

    lc = llama.config
    assert (lc.hidden_size, lc.num_attention_heads, lc.num_key_value_heads, lc.intermediate_size) == (64, 4, 2, 128)
    assert lc.tie_word_embeddings is False
    assert llama.get_output_embeddings().weight.data_ptr() != llama.get_input_embeddings().weight.data_ptr()

    gc = gemma.config
    assert (gc.hidden_size, gc.num_attention_heads, gc.num_key_value_heads, gc.head_dim) == (48, 4, 1, 16)
    assert gc.intermediate_size == 96
    assert gc.sliding_window == 64
    assert gc.layer_types == ["sliding_attention", "full_attention"]


def test_kinds_differ_in_vocabulary_and_tokenizer_type(tiny_dirs: dict[str, Path], tiny_tokenizers: dict):
    llama_tok, gemma_tok = tiny_tokenizers["llama"], tiny_tokenizers["gemma3"]
    assert len(llama_tok) == 512
    assert len(gemma_tok) == 384
    models = {kind: json.loads((path / "tokenizer.json").read_text())["model"] for kind, path in tiny_dirs.items()}
    assert models["llama"]["type"] == "BPE"
    assert models["gemma3"]["type"] == "Unigram"
    # Same text, different segmentations.
    text = "The capital of France is Paris."
    llama_pieces = llama_tok.convert_ids_to_tokens(llama_tok.encode(text, add_special_tokens=False))
    gemma_pieces = gemma_tok.convert_ids_to_tokens(gemma_tok.encode(text, add_special_tokens=False))
    assert llama_pieces != gemma_pieces
    assert any(p.startswith("Ġ") for p in llama_pieces)
    assert any(p.startswith("▁") for p in gemma_pieces)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_ordinary_english_is_split_into_word_pieces(kind: str, tiny_tokenizers: dict):
    tok = tiny_tokenizers[kind]
    text = "The capital of France is Paris."
    ids = tok.encode(text, add_special_tokens=False)
    # More than one token, but far fewer than one per character (the text is 31 characters).
    assert 2 <= len(ids) <= 16
    assert any(len(tok.decode([i]).strip()) >= 3 for i in ids)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_config_special_ids_match_tokenizer(kind: str, tiny_models: dict, tiny_tokenizers: dict):
    model, tok = tiny_models[kind], tiny_tokenizers[kind]
    assert model.config.vocab_size == len(tok)
    assert model.config.bos_token_id == tok.bos_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_llama_tokenizer_mirrors_smollm2(tiny_llama_tokenizer):
    tok = tiny_llama_tokenizer
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    # No special tokens are added by default.
    assert tok("Hello there.").input_ids == tok("Hello there.", add_special_tokens=False).input_ids
    # Special tokens written in text are single tokens.
    ids = tok("<|im_start|>user\nHi<|im_end|>").input_ids
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>"


def test_llama_chat_template_renders_chatml(tiny_llama_tokenizer):
    tok = tiny_llama_tokenizer
    assert tok.chat_template == SMOLLM2_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_gemma_tokenizer_adds_bos_and_has_no_chat_template(tiny_gemma_tokenizer):
    tok = tiny_gemma_tokenizer
    assert tok.chat_template is None
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == ("<pad>", "<eos>", "<bos>", "<unk>")
    assert tok.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]) == [
        0,
        1,
        2,
        3,
        4,
        5,
    ]
    plain = tok("Hello there.", add_special_tokens=False).input_ids
    with_bos = tok("Hello there.").input_ids
    assert with_bos == [tok.bos_token_id, *plain]
    assert tok.bos_token_id not in plain
    ids = tok("<start_of_turn>user\nHi<end_of_turn>", add_special_tokens=False).input_ids
    assert ids[0] == 4 and ids[-1] == 5
    assert tok.decode(with_bos, skip_special_tokens=True) == "Hello there."


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(kind: str, text: str, tiny_tokenizers: dict):
    tok = tiny_tokenizers[kind]
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_newlines_are_kept(kind: str, tiny_tokenizers: dict):
    tok = tiny_tokenizers[kind]
    for text in ("a\nb", "a\n\nb", "line one.\n line two.\n\n\n", "\n  indented\n"):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_offsets_cover_the_text(kind: str, tiny_tokenizers: dict):
    tok = tiny_tokenizers[kind]
    text = "Question: How many days are there in a week?\nAnswer: There are 7 days."
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = enc["offset_mapping"]
    assert len(offsets) == len(enc["input_ids"])
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    for (_, end), (start, _) in zip(offsets, offsets[1:], strict=False):
        assert end == start
    assert "".join(text[a:b] for a, b in offsets) == text


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_forward_backward_and_inputs_embeds(kind: str, tiny_dirs: dict[str, Path], tiny_tokenizers: dict):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[kind])
    tok = tiny_tokenizers[kind]
    batch = tok(["The capital of France is Paris.", "What is 2 + 3?"], return_tensors="pt", padding=True)
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0

    # The same forward through inputs_embeds (Gemma's embedding layer applies its sqrt(hidden) scale itself).
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
        by_ids = model(**batch).logits
        by_embeds = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(by_embeds, by_ids)

    # Gradients reach a trainable inputs_embeds tensor (what prompt distillation optimises).
    soft = embeds[:1].clone().requires_grad_(True)
    model(inputs_embeds=soft, labels=batch["input_ids"][:1]).loss.backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_generate(kind: str, tiny_models: dict, tiny_tokenizers: dict):
    model, tok = tiny_models[kind], tiny_tokenizers[kind]
    batch = tok(["The capital of France is"], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, batch["input_ids"].shape[1] + 4)
    assert torch.equal(out[0, : batch["input_ids"].shape[1]], batch["input_ids"][0])
    assert int(out.max()) < len(tok)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_second_build_is_a_no_op(kind: str, tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    path = tiny_dirs[kind]
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt although the folder already held this build")

    monkeypatch.setattr(nacd.testing, "build_tiny_tokenizer", fail)
    assert build_tiny_model(kind, path, seed=0) == path
    assert build_tiny_model(kind, str(path), seed=0) == path
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.iterdir()}
    assert after == before


def test_same_seed_gives_identical_builds(tmp_path: Path, tiny_gemma_dir: Path):
    other = build_tiny_model("gemma3", tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (other / name).read_bytes() == (tiny_gemma_dir / name).read_bytes(), name


def test_seed_changes_weights_and_rebuilds(tmp_path: Path, tiny_models: dict):
    path = build_tiny_model("llama", tmp_path / "m", seed=1)
    assert json.loads((path / "nacd_tiny.json").read_text())["seed"] == 1
    seeded = _state(AutoModelForCausalLM.from_pretrained(path))
    base = _state(tiny_models["llama"])
    assert seeded.keys() == base.keys()
    assert not torch.equal(seeded["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    # Asking for seed 0 in the same folder rebuilds it with the seed-0 weights.
    build_tiny_model("llama", path, seed=0)
    rebuilt = _state(AutoModelForCausalLM.from_pretrained(path))
    assert all(torch.equal(rebuilt[k], base[k]) for k in base)


def test_build_leaves_global_rng_alone(tmp_path: Path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("gemma3", tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_build_into_folder_of_another_kind_replaces_it(tmp_path: Path):
    path = build_tiny_model("llama", tmp_path / "m")
    assert AutoTokenizer.from_pretrained(path).chat_template is not None
    build_tiny_model("gemma3", path)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template is None
    assert len(tok) == 384
    assert type(AutoModelForCausalLM.from_pretrained(path)).__name__ == "Gemma3ForCausalLM"


def test_tokenizers_are_reproducible_across_processes(tiny_dirs: dict[str, Path]):
    # The hash seeds of the Rust tokenizers library change from one process to the next; the
    # trained vocabularies must not.
    code = (
        "import sys, json; from nacd.testing import build_tiny_tokenizer; "
        "json.dump({k: build_tiny_tokenizer(k).backend_tokenizer.to_str() for k in sys.argv[1:]}, sys.stdout)"
    )
    out = subprocess.run([sys.executable, "-c", code, *TINY_KINDS], capture_output=True, text=True, check=True).stdout
    fresh = json.loads(out)
    for kind, path in tiny_dirs.items():
        saved = json.loads((path / "tokenizer.json").read_text())
        assert json.loads(fresh[kind])["model"] == saved["model"], kind


def test_shared_data_fixture(shared_data: Path):
    assert shared_data.is_dir()
    assert shared_data.name == "data" and shared_data.parent.name == "shared"
