"""Model specs, loading, and the built-in models."""

import math
import os
from pathlib import Path

import pytest
import torch

from nacd.config import ModelConfig
from nacd.errors import ModelError
from nacd.models import (
    BUILTINS,
    builtin_status,
    default_lora_targets,
    load_model,
    prepare_builtin,
    resolve_attn,
    resolve_dtype,
    resolve_spec,
)


def test_resolve_local_folder(tiny_llama_dir):
    r = resolve_spec(str(tiny_llama_dir))
    assert (r.kind, r.location) == ("folder", str(tiny_llama_dir))


def test_resolve_hub_id_and_bad_specs(tmp_path):
    assert resolve_spec("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    with pytest.raises(ModelError, match="not a built-in"):
        resolve_spec("no such model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="folder has no config.json"):
        resolve_spec(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_spec(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="a file that is not .gguf"):
        resolve_spec(str(tmp_path / "weights.bin"))


def test_hub_loading_is_the_real_code_path_and_fails_clearly_offline(monkeypatch):
    # HF_HUB_OFFLINE is set by conftest: transformers is asked for the hub id and says it cannot reach it.
    with pytest.raises(ModelError, match=r"model.spec='nobody/not-a-model': cannot load from the Hugging Face Hub"):
        load_model(ModelConfig(spec="nobody/not-a-model"), torch.device("cpu"))


def test_builtin_status_in_an_empty_cache(tmp_path):
    for name, builtin in BUILTINS.items():
        assert builtin_status(name, tmp_path) == ("installed" if builtin.installed() else "missing")
    with pytest.raises(ModelError, match="unknown built-in model 'nope'"):
        prepare_builtin("nope", tmp_path)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gemma_dir"])
def test_load_tiny_models(fixture, request):
    folder = request.getfixturevalue(fixture)
    model, tok = load_model(ModelConfig(spec=str(folder)), torch.device("cpu"))
    assert model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert default_lora_targets(model) == ["q_proj", "v_proj"]
    model2, _ = load_model(ModelConfig(spec=str(folder)), torch.device("cpu"), needs_double_backward=True)
    assert model2.config._attn_implementation == "eager"  # differentiated twice on the CPU


def test_double_backward_through_sdpa_math_equals_eager(tiny_llama_dir):
    from nacd.models import double_backward_attention

    seconds = {}
    for attn in ("eager", "sdpa"):
        cfg = ModelConfig(spec=str(tiny_llama_dir), attn_implementation=attn)
        model, tok = load_model(cfg, torch.device("cpu"), needs_double_backward=True)
        model = model.to(torch.float64)
        ids = tok("The capital of France is Paris.", return_tensors="pt")["input_ids"]
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with double_backward_attention():
            loss = model(inputs_embeds=embeds, labels=ids).loss
            params = [p for n, p in model.named_parameters() if "q_proj" in n or "v_proj" in n]
            grads = torch.autograd.grad(loss, params, create_graph=True)
            seconds[attn] = torch.autograd.grad(sum((g * g).sum() for g in grads), embeds)[0]
    assert seconds["sdpa"].abs().sum() > 0
    # eager takes its softmax in float32 even in a float64 model; SDPA's math backend stays in float64
    scale = float(seconds["eager"].abs().max())
    torch.testing.assert_close(seconds["sdpa"], seconds["eager"], rtol=1e-4, atol=1e-5 * scale)


def test_attn_and_dtype_resolution():
    assert resolve_attn("auto", True) == "eager"  # CPU: eager measured faster at short sequences
    assert resolve_attn("auto", True, torch.device("cuda", 0)) == "sdpa"  # math backend where differentiated twice
    assert resolve_attn("auto", False) == "sdpa" == resolve_attn("auto", False, torch.device("cuda", 0))
    assert resolve_attn("sdpa", True) == "sdpa"
    with pytest.raises(ModelError, match="no double-backward"):
        resolve_attn("flash_attention_2", True)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_each_process_gets_its_own_gpu_or_a_clear_refusal(monkeypatch):
    from nacd.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("auto") == torch.device("cuda", 0) == resolve_device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc_per_node 2 on one GPU
    monkeypatch.setenv("LOCAL_RANK", "1")
    for device in ("auto", "cuda"):
        with pytest.raises(
            ModelError, match=r"started 2 processes on this node but it has 1 CUDA device.*run.device=cpu"
        ):
            resolve_device(device)
    assert resolve_device("cpu") == torch.device("cpu")  # gloo on the CPU is fine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 1)


# ---------------------------------------------------------------- the real built-in models

ENGLISH = (
    "The sun rises in the east and sets in the west. Water boils at one hundred degrees Celsius at sea level. "
    "Paris is the capital and largest city of France."
)


def _perplexity(model, tok, text):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


@pytest.mark.real_model
@pytest.mark.parametrize("name", list(BUILTINS))
def test_builtin_model_is_coherent(name):
    model, tok = load_model(ModelConfig(spec=name), torch.device("cpu"))
    enc = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    words = [w for w in text.replace(".", " ").split() if w.isalpha()]
    assert len(words) >= 3, text
    # A random model of this vocabulary has perplexity in the tens of thousands; a real one is low.
    assert _perplexity(model, tok, ENGLISH) < 40
    if name == "smollm2-135m":
        assert "Paris" in text
    sample = "Line one.\nLine two: 3.14, naïve café — done!"
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample


@pytest.mark.real_model
def test_gguf_spec_converts_once(tmp_path):
    from nacd.models import _locate_smollm2

    gguf = _locate_smollm2(tmp_path)
    first = resolve_spec(str(gguf), tmp_path)
    marker = Path(first.location) / "nacd_model.json"
    assert first.kind == "gguf" and marker.is_file()
    mtime = os.path.getmtime(marker)
    again = resolve_spec(str(gguf), tmp_path)
    assert again.location == first.location and os.path.getmtime(marker) == mtime
