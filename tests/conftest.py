"""Fixtures and options shared by the whole test-suite.

* The suite never touches the network: the Hugging Face offline switches are set here, before
  anything imports ``huggingface_hub``, ``transformers`` or ``datasets``.
* ``--run-slow`` runs the tests marked ``slow``; without it they are skipped. Tests marked
  ``real_model`` run when the built-in models are prepared in the cache (``scripts/setup.sh`` and
  ``nacd models prepare --all`` do it), and are skipped with that instruction otherwise.
  Tests marked ``gpu`` are skipped when no CUDA device is available.
* Session fixtures give tiny random models (see :mod:`nacd.testing`), built once per session,
  and the shared data folder that lies beside the checkout.
"""

from __future__ import annotations

import os

# Before any Hugging Face import: these libraries read the switches when they are imported.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

#: The checkout (the folder holding pyproject.toml).
REPO_ROOT = Path(__file__).resolve().parents[1]


def multiprocess_overrides() -> list[str]:
    """Overrides for a 2-process torchrun test: NCCL on 2+ GPUs, else the CPU (gloo); 2 ranks on one
    GPU is refused by nacd (:func:`nacd.models.resolve_device`), as NCCL would crash on it."""
    import torch

    return [] if torch.cuda.device_count() >= 2 else ["run.device=cpu"]


def torchrun(target: list[str], port: int, timeout: int = 600, nproc: int = 2):
    """``torchrun --nproc_per_node NPROC TARGET`` (``TARGET``: ``-m nacd ...`` or a script and its
    arguments), one thread per process, so that two processes share 2 cores without oversubscribing them;
    returns the completed process."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    launcher = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert launcher, "torchrun is installed with torch"
    cmd = [launcher, "--nproc_per_node", str(nproc), "--master_port", str(port), *target]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hung job: stop torchrun and its workers, not only torchrun
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"{' '.join(cmd[:6])} ...: no end after {timeout} s; stderr:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun_nacd(command: str, args: list[str], port: int, timeout: int = 600, nproc: int = 2):
    """``torchrun --nproc_per_node NPROC -m nacd COMMAND ARGS``; see :func:`torchrun`."""
    return torchrun(["-m", "nacd", command, *args], port, timeout, nproc)


def assert_same_tensors(a, b, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Bitwise equal on the CPU; close on a GPU, whose kernels are not bitwise reproducible."""
    import torch

    if torch.cuda.is_available():
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    else:
        assert torch.equal(a, b)


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--run-slow``."""
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run tests marked slow (minutes)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``slow`` tests without ``--run-slow``, ``real_model`` tests when the built-ins are not
    prepared, and ``gpu`` tests without CUDA."""
    run_slow = config.getoption("--run-slow")
    skip_slow = pytest.mark.skip(reason="slow test: run with --run-slow")
    skip_real = None
    if any("real_model" in item.keywords for item in items):
        from nacd.models import BUILTINS, builtin_status

        missing = [name for name in BUILTINS if builtin_status(name) != "ready"]
        if missing:
            skip_real = pytest.mark.skip(
                reason=f"built-in model(s) {', '.join(missing)} not prepared: run `nacd models prepare --all`"
            )
    has_gpu_tests = any("gpu" in item.keywords for item in items)
    skip_gpu = None
    if has_gpu_tests:
        import torch

        if not torch.cuda.is_available():
            skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if not run_slow and "slow" in item.keywords:
            item.add_marker(skip_slow)
        if skip_real is not None and "real_model" in item.keywords:
            item.add_marker(skip_real)
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder, ``shared/data`` beside the checkout (``<repo>/../shared/data``).

    Fails (does not skip) when it is missing: the suite needs it.
    """
    candidates = [REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "shared" / "data"]
    for path in candidates:
        if path.is_dir():
            return path
    pytest.fail(
        f"the tests need the shared data folder beside the checkout, at {candidates[0]} "
        f"(or inside it, at {candidates[1]}); neither exists"
    )


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ``LlamaForCausalLM`` with a byte-level BPE tokenizer and ChatML template (seed 0)."""
    from nacd.testing import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny_llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ``Gemma3ForCausalLM`` with a Unigram tokenizer and no chat template (seed 0)."""
    from nacd.testing import build_tiny_model

    return build_tiny_model("gemma3", tmp_path_factory.mktemp("tiny_gemma"), seed=0)


@pytest.fixture(scope="session")
def tiny_llama_tokenizer(tiny_llama_dir: Path):
    """The tokenizer of :func:`tiny_llama_dir`, loaded with ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_gemma_tokenizer(tiny_gemma_dir: Path):
    """The tokenizer of :func:`tiny_gemma_dir`, loaded with ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gemma_dir)


#: Overrides that size a run for the tiny models: 40 examples of the shared mix, 64 tokens each.
TINY_RUN_OVERRIDES = (
    "data.max_seq_len=64",
    "data.sources.0.max_examples=10",
    "data.sources.1.max_examples=10",
    "data.sources.2.max_examples=10",
    "data.sources.3.max_examples=10",
    "experts.num_experts=2",
    "experts.train.epochs=2",
    "experts.train.batch_size=8",
    "experts.train.micro_batch_size=4",
    "finetune.train.epochs=1",
    "finetune.train.batch_size=8",
)


@pytest.fixture
def tiny_overrides(tiny_llama_dir: Path, shared_data: Path, tmp_path: Path) -> list[str]:
    """Dotted overrides for a small run of the tiny Llama on the shared data, in a fresh run folder."""
    return [
        f"model.spec={tiny_llama_dir}",
        f"data.root={shared_data}",
        f"run.out_dir={tmp_path / 'run'}",
        *TINY_RUN_OVERRIDES,
    ]
