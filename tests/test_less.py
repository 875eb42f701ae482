"""LESS: projection (JL, determinism), per-example gradients, the Adam direction, matching, end to end,
resuming, and 2 processes against 1."""

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tensors, multiprocess_overrides
from safetensors import safe_open
from safetensors.torch import load_file

from nacd import less
from nacd.config import load_config
from nacd.data import load_corpus
from nacd.errors import NacdError
from nacd.less import epoch_lr_mean, less_scores, warmup_indices
from nacd.less_grads import batched_grads, per_example_grads_loop
from nacd.less_math import (
    AdamMoments,
    GaussianProjection,
    SparseProjection,
    adam_direction,
    less_match,
    make_projection,
    subtask_means,
)
from nacd.lora import lora_parameters
from nacd.train import SparseLogitsForward, setup_training

#: A tiny LESS run: 40 examples of 64 tokens, warm-up on 10 of them (2 epochs of 3 steps), 5 shards.
LESS_OVERRIDES = (
    "data.max_seq_len=64",
    *(f"data.sources.{i}.max_examples=10" for i in range(4)),
    "select.less.warmup_fraction=0.25",
    "select.less.warmup.epochs=2",
    "select.less.warmup.batch_size=4",
    "select.less.proj_dim=256",
    "select.less.shard_size=8",
    "select.less.grad_batch_size=4",
    "select.less.feature_dtype=float32",
)

#: The corpus example whose copy is the target of the shared run.
TARGET_INDEX = 9


def _config(model_dir: Path, data_root: Path, *extra: str):
    return load_config(None, [f"model.spec={model_dir}", f"data.root={data_root}", *LESS_OVERRIDES, *extra])


def _target(example, source: str = "arc_easy"):
    return dataclasses.replace(example, id=f"target/{example.id}", source=source)


def _jl_errors(x: torch.Tensor, dim: int, seed: int = 0, kind: str = "gaussian") -> tuple[torch.Tensor, torch.Tensor]:
    """|<Pa,Pb> - <a,b>| and |a||b| / sqrt(dim) over all pairs of rows of ``x`` (float64)."""
    proj = make_projection(kind, x.shape[1], dim, seed)(x)
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    true = (x[i] * x[j]).sum(1)
    approx = (proj[i] * proj[j]).sum(1)
    scale = x[i].norm(dim=1) * x[j].norm(dim=1) / math.sqrt(dim)
    return (approx - true).abs(), scale


# A Gaussian projection with N(0, 1/d) entries is unbiased for inner products, with error variance
# (|a|^2 |b|^2 + <a,b>^2) / d <= 2 |a|^2 |b|^2 / d. Over a few hundred pairs the largest error stays
# below 4.2 standard deviations, so below C_JL * |a||b| / sqrt(d) with C_JL = 6 (> 4.2 * sqrt(2)).
C_JL = 6.0


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_projection_preserves_inner_products_jl(kind):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(30, 20_000, generator=gen, dtype=torch.float64)
    # half of the vectors are correlated with the first (cosines 0.1 .. 0.95), the rest independent
    rho = torch.linspace(0.1, 0.95, 15, dtype=torch.float64)[:, None]
    x = torch.cat([base[:1], rho * base[:1] + (1 - rho**2).sqrt() * base[1:16], base[16:]])
    x = x * torch.rand(30, 1, generator=gen, dtype=torch.float64)  # and different norms
    err, scale = _jl_errors(x, 2048, kind=kind)
    assert len(err) == 435
    assert (err <= C_JL * scale).all(), float((err / scale).max())
    rms = (err / scale).pow(2).mean().sqrt()  # in [1, sqrt(2)] in expectation; off by far without 1/sqrt(d)
    assert 0.8 < rms < 1.7, float(rms)


@pytest.fixture(scope="module")
def tiny_setup(tiny_llama_dir, shared_data):
    """The tiny Llama with LoRA (B randomized so that every LoRA gradient is nonzero) and 40 examples."""
    setup = setup_training(_config(tiny_llama_dir, shared_data))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in lora_parameters(setup.model).items():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return setup


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_projection_preserves_inner_products_of_lora_gradients(tiny_setup, kind):
    grads = batched_grads(tiny_setup.model, tiny_setup.collate(tiny_setup.data[:16])).double()
    assert grads.shape == (16, 3584)
    err, scale = _jl_errors(grads, 2048, seed=5, kind=kind)
    assert (err <= C_JL * scale).all(), float((err / scale).max())


def test_projection_is_deterministic_and_independent_of_chunking():
    gen = torch.Generator().manual_seed(0)
    n, dim = 5000, 64  # 5 blocks of 1024 rows, the last one partly used
    x = torch.randn(7, n, generator=gen, dtype=torch.float64)
    p = GaussianProjection(n, dim, seed=3)
    whole = p(x)
    assert torch.equal(whole, GaussianProjection(n, dim, seed=3)(x))  # a fresh instance: the same matrix
    dense = torch.cat([p.block(k) for k in range(5)])[:n].double()
    torch.testing.assert_close(whole, x @ dense, rtol=0, atol=1e-11)
    for chunk in (1, 700, 1024, 3077, n):
        torch.testing.assert_close(p(x, chunk_rows=chunk), whole, rtol=0, atol=1e-11)
    torch.testing.assert_close(torch.cat([p(x[:3]), p(x[3:4]), p(x[4:])]), whole, rtol=0, atol=1e-11)
    # a longer vector keeps the rows of its prefix: the matrix does not depend on n
    longer = GaussianProjection(n + 1500, dim, seed=3)(torch.cat([x, torch.zeros(7, 1500, dtype=x.dtype)], 1))
    torch.testing.assert_close(longer, whole, rtol=0, atol=1e-11)
    assert not torch.allclose(GaussianProjection(n, dim, seed=4)(x), whole)
    assert not torch.allclose(p.block(0), p.block(1))
    assert abs(float(dense.var()) - 1 / dim) < 0.05 / dim  # entries N(0, 1/d)


def test_sparse_projection_is_deterministic_and_independent_of_chunking():
    gen = torch.Generator().manual_seed(0)
    n, dim = 5000, 64
    x = torch.randn(7, n, generator=gen, dtype=torch.float64)
    p = SparseProjection(n, dim, seed=3, nnz=4)
    whole = p(x)
    assert torch.equal(whole, SparseProjection(n, dim, seed=3, nnz=4)(x))
    dense = p.dense().double()
    torch.testing.assert_close(whole, x @ dense, rtol=0, atol=1e-11)
    assert ((dense != 0).sum(1) <= 4).all() and float(dense.abs().max()) <= 1.0  # +-1/2, summed on a collision
    for chunk in (1, 700, 1024, 3077, n):
        torch.testing.assert_close(p(x, chunk_rows=chunk), whole, rtol=0, atol=1e-11)
    torch.testing.assert_close(torch.cat([p(x[:3]), p(x[3:])]), whole, rtol=0, atol=1e-11)
    longer = SparseProjection(n + 1500, dim, seed=3)(torch.cat([x, torch.zeros(7, 1500, dtype=x.dtype)], 1))
    torch.testing.assert_close(longer, whole, rtol=0, atol=1e-11)
    assert not torch.allclose(SparseProjection(n, dim, seed=4)(x), whole)
    # the squared norm of each row of R is 1 in expectation (exactly 1 without column collisions)
    assert abs(float(dense.pow(2).sum(1).mean()) - 1) < 0.05


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_batched_per_example_grads_match_a_loop(kind, request, shared_data):
    model_dir = request.getfixturevalue(f"tiny_{kind}_dir")
    setup = setup_training(_config(model_dir, shared_data))
    model = setup.model.double()
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    # examples of different lengths (their last tokens, where the response is): padding matters
    data = [
        dataclasses.replace(ex, input_ids=ex.input_ids[-n:], labels=ex.labels[-n:])
        for ex, n in zip(setup.data[:5], (64, 50, 37, 23, 12), strict=True)
    ]
    loop = per_example_grads_loop(model, data, setup.collate)
    batch = setup.collate(data)
    batched = batched_grads(model, batch)
    assert batched.dtype == torch.float64 and loop.shape == batched.shape and not batched.requires_grad
    # the shared loss is computed in float32 whatever the model dtype: agreement to ~1e-7 relative
    atol = 1e-6 * float(loop.abs().max())
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=atol)
    sparse = SparseLogitsForward()
    assert sparse.install(model, batch)
    try:
        torch.testing.assert_close(batched_grads(model, batch, sparse), loop, rtol=1e-5, atol=atol)
    finally:
        sparse.remove()
    model.float()
    torch.testing.assert_close(batched_grads(model, batch), loop.float(), rtol=1e-4, atol=10 * atol)


def test_adam_direction_by_hand_and_as_adamw_would_step():
    m = AdamMoments(torch.tensor([0.1, -0.2]), torch.tensor([0.01, 0.04]), step=3, beta1=0.9, beta2=0.999, eps=1e-8)
    g = torch.tensor([1.0, -1.0])
    # m' = 0.9 m + 0.1 g = [0.19, -0.28]; v' = 0.999 v + 0.001 g^2 = [0.01099, 0.04096]; t = 4
    bc1, bc2 = 1 - 0.9**4, 1 - 0.999**4
    expected = [0.19 / bc1 / (math.sqrt(0.01099 / bc2) + 1e-8), -0.28 / bc1 / (math.sqrt(0.04096 / bc2) + 1e-8)]
    torch.testing.assert_close(adam_direction(g, m), torch.tensor(expected), rtol=1e-6, atol=0)
    # and it is the step torch's AdamW takes next (lr 1, no weight decay), for a batch of gradients
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.float64, generator=gen))
    opt = torch.optim.AdamW([p], lr=1.0, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)
    for _ in range(3):
        p.grad = torch.randn(6, dtype=torch.float64, generator=gen)
        opt.step()
    st = opt.state[p]
    moments = AdamMoments(st["exp_avg"].clone(), st["exp_avg_sq"].clone(), int(st["step"]), 0.8, 0.99, 1e-6)
    grads = torch.randn(2, 6, dtype=torch.float64, generator=gen)
    directions = adam_direction(grads, moments)
    for i in range(2):
        q = torch.nn.Parameter(p.detach().clone())
        replay = torch.optim.AdamW([q], lr=1.0, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)
        replay.load_state_dict(copy.deepcopy(opt.state_dict()))  # it would share the moments otherwise
        q.grad = grads[i]
        replay.step()
        torch.testing.assert_close(p.detach() - q.detach(), directions[i], rtol=1e-12, atol=1e-14)


def test_matching_takes_the_subtask_mean_the_lr_weighted_sum_then_the_max():
    # 2 checkpoints, 2 corpus examples, 3 targets in subtasks a, a, b; features in 2-D
    f = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])]
    t = [torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])]
    subtasks = ["a", "a", "b"]
    names, m0 = subtask_means(t[0], subtasks)
    assert names == ["a", "b"]
    torch.testing.assert_close(m0, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    means = [m0, subtask_means(t[1], subtasks)[1]]
    scores = less_match(f, means, [3.0, 1.0])  # weights 0.75, 0.25
    # example 0: a: 0.75 * 0.5 + 0.25 * 0 = 0.375, b: 0.75 * 0 + 0.25 * 1 = 0.25 -> 0.375
    # example 1: a: 0.75 * 0.5 + 0.25 * 1 = 0.625, b: 0.75 * 1 + 0.25 * 0 = 0.75 -> 0.75
    torch.testing.assert_close(scores, torch.tensor([0.375, 0.75]))
    # the max per checkpoint before the sum would give 0.75 * 0.5 + 0.25 * 1 = 0.625 for example 0
    assert less_match(f, means, [30.0, 10.0]).tolist() == scores.tolist()  # only the lr ratios matter


def test_warmup_sample_and_epoch_lr():
    assert warmup_indices(100, 0.05, 16, seed=0) == sorted(warmup_indices(100, 0.05, 16, seed=0))
    assert len(warmup_indices(100, 0.05, 16, seed=0)) == 16  # at least one batch
    assert len(warmup_indices(1000, 0.05, 16, seed=0)) == 50
    assert warmup_indices(1000, 0.05, 16, seed=0) != warmup_indices(1000, 0.05, 16, seed=1)
    cfg = load_config(None, ["select.less.warmup.warmup_ratio=0.0"]).select.less.warmup
    # 2 epochs of 4 steps, linear decay from 2e-5: factors 1, 7/8, ..., 1/8
    assert epoch_lr_mean(cfg, 1, 4, 8, 0) == pytest.approx(2e-5 * (8 + 7 + 6 + 5) / 32)
    assert epoch_lr_mean(cfg, 2, 4, 8, 0) == pytest.approx(2e-5 * (4 + 3 + 2 + 1) / 32)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, shared_data, tmp_path_factory):
    """One complete run: config, corpus, targets (a copy of one corpus example), workdir and scores."""
    cfg = _config(tiny_llama_dir, shared_data)
    examples, _ = load_corpus(cfg.data)
    targets = [_target(examples[TARGET_INDEX])]
    workdir = tmp_path_factory.mktemp("less_ref")
    scores = less_scores(cfg, examples, targets, workdir)
    return cfg, examples, targets, workdir, scores


def _features(workdir: Path) -> dict[str, torch.Tensor]:
    return {p.relative_to(workdir).as_posix(): load_file(p)["features"] for p in sorted(workdir.rglob("shard_*"))}


def test_a_copy_of_the_target_ranks_first(reference, tmp_path, caplog):
    cfg, examples, targets, workdir, scores = reference
    assert len(scores) == 40 and all(-1.0 <= s <= 1.0 for s in scores)
    assert max(range(40), key=scores.__getitem__) == TARGET_INDEX
    manifest = json.loads((workdir / "warmup" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_examples"] == 10 and manifest["steps_per_epoch"] == 3
    assert [s["epoch"] for s in manifest["snapshots"]] == [1, 2]
    assert manifest["snapshots"][0]["lr_avg"] > manifest["snapshots"][1]["lr_avg"] > 0  # linear decay
    snap = load_file(workdir / "warmup" / "epoch_002.safetensors")
    assert {k.split("/")[0] for k in snap} == {"lora", "exp_avg", "exp_avg_sq"}
    with safe_open(workdir / "warmup" / "epoch_002.safetensors", "pt") as fh:
        assert fh.metadata()["adam_step"] == "6"
    assert not (workdir / "warmup" / "checkpoint").exists()
    feats = _features(workdir)
    assert len(feats) == 2 * (5 + 1) and all(f.shape[1] == 256 for f in feats.values())
    torch.testing.assert_close(feats["features/epoch_001/train/shard_00000.safetensors"].norm(dim=1), torch.ones(8))
    # another target: the warm-up and the corpus features are reused, only the target features change
    shutil.copytree(workdir, tmp_path / "less")
    other = 30
    with caplog.at_level(logging.INFO, logger="nacd.less"):
        again = less_scores(cfg, examples, [_target(examples[other])], tmp_path / "less")
    assert max(range(40), key=again.__getitem__) == other
    assert "LESS warm-up: complete" in caplog.text
    assert "5 of 5 shard(s) already" in caplog.text and "recomputing these features" in caplog.text


def test_interrupted_features_resume_from_complete_shards(reference, tmp_path, monkeypatch, caplog):
    cfg, examples, targets, ref_dir, ref_scores = reference
    workdir = tmp_path / "less"
    shutil.copytree(ref_dir / "warmup", workdir / "warmup")
    real = less.shard_features
    calls = []

    def dies_on_the_third(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(less, "shard_features", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        less_scores(cfg, examples, targets, workdir)
    assert len(list(workdir.rglob("shard_*"))) == 2

    def no_training(*args, **kwargs):
        raise AssertionError("the complete warm-up was trained again")

    calls.clear()
    monkeypatch.setattr(less, "TrainLoop", no_training)
    monkeypatch.setattr(less, "shard_features", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    scores = less_scores(cfg, examples, targets, workdir)
    assert len(calls) == 12 - 2  # 2 checkpoints x (5 corpus + 1 target shards), 2 were done
    ref, got = _features(ref_dir), _features(workdir)
    assert sorted(ref) == sorted(got)
    for k in ref:  # bitwise on the CPU
        assert_same_tensors(got[k], ref[k])
    if not torch.cuda.is_available():
        assert scores == ref_scores
    # a deleted shard is computed again, alone
    (workdir / "features" / "epoch_002" / "train" / "shard_00003.safetensors").unlink()
    calls.clear()
    assert less_scores(cfg, examples, targets, workdir) == ref_scores
    assert calls == [8]
    # a truncated shard (the manifest records every shard's size and sha256) is computed again, alone
    shard = workdir / "features" / "epoch_001" / "train" / "shard_00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    calls.clear()
    assert less_scores(cfg, examples, targets, workdir) == ref_scores
    assert calls == [8]
    # one of the same size but other bytes is named and computed again, alone
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x55
    shard.write_bytes(bytes(data))
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="nacd"):
        assert less_scores(cfg, examples, targets, workdir) == ref_scores
    assert calls == [8]
    assert (
        "shard_00002.safetensors: its sha256 differs from its manifest's (damaged); computing it again" in caplog.text
    )
    # damaged after the features were scored (between the write and the read): caught when read, and named
    checked = less._shard_ok
    monkeypatch.setattr(less, "_shard_ok", lambda folder, k, files: True)
    shard.write_bytes(bytes(data))
    with pytest.raises(NacdError, match=r"shard_00002.safetensors: its sha256 differs .*delete it and rerun"):
        less_scores(cfg, examples, targets, workdir)
    monkeypatch.setattr(less, "_shard_ok", checked)
    shard.unlink()
    # a damaged warm-up snapshot stops LESS before any feature is computed, naming the file
    snap = workdir / "warmup" / "epoch_001.safetensors"
    snap.write_bytes(snap.read_bytes()[:-10])
    calls.clear()
    with pytest.raises(NacdError, match=r"warmup/epoch_001.safetensors: \d+ bytes, its manifest recorded"):
        less_scores(cfg, examples, targets, workdir)
    assert calls == []


def test_changed_settings_refuse_the_warmup_or_redo_the_features(reference, tmp_path, caplog):
    cfg, examples, targets, ref_dir, _ = reference
    workdir = tmp_path / "less"
    shutil.copytree(ref_dir, workdir)
    other_lora = _config(Path(cfg.model.spec), Path(cfg.data.root), "lora.r=4")
    with pytest.raises(
        NacdError, match=r"warmup/manifest.json: field 'lora.r' was 8 when this was made, now 4; delete .*warmup"
    ):
        less_scores(other_lora, examples, targets, workdir)
    other_dim = _config(Path(cfg.model.spec), Path(cfg.data.root), "select.less.proj_dim=512")
    with caplog.at_level(logging.INFO, logger="nacd.less"):
        scores = less_scores(other_dim, examples, targets, workdir)
    assert "LESS warm-up: complete" in caplog.text
    assert "field 'projection' was" in caplog.text and "recomputing these features" in caplog.text
    assert all(f.shape[1] == 512 for f in _features(workdir).values())
    assert max(range(40), key=scores.__getitem__) == TARGET_INDEX


DRIVER = """
import dataclasses, json, sys
from pathlib import Path
from nacd.config import load_config
from nacd.data import load_corpus
from nacd.less import less_scores
cfg = load_config(None, sys.argv[2:])
examples, _ = load_corpus(cfg.data)
ex = examples[int(sys.argv[1])]
targets = [dataclasses.replace(ex, id="target/" + ex.id, source="arc_easy")]
for workdir in ("copied_warmup", "fresh"):
    scores = less_scores(cfg, examples, targets, Path(workdir))
    Path(workdir, "scores.json").write_text(json.dumps(scores))
"""


def test_two_processes_compute_the_same_features_as_one(reference, tmp_path):
    cfg, _, _, ref_dir, ref_scores = reference
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun is installed with torch"
    # copied_warmup/ holds the 1-process warm-up, so its features must match the 1-process ones;
    # fresh/ also trains the warm-up on 2 processes (data-parallel, equal up to summation order)
    shutil.copytree(ref_dir / "warmup", tmp_path / "copied_warmup" / "warmup")
    (tmp_path / "driver.py").write_text(DRIVER)
    overrides = [f"model.spec={cfg.model.spec}", f"data.root={cfg.data.root}", *LESS_OVERRIDES]
    overrides += multiprocess_overrides()  # the reference ran on the default device: CPU vs GPU on a 1-GPU machine
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29534", "driver.py", str(TARGET_INDEX), *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = _features(ref_dir)
    loose = 100 if torch.cuda.is_available() else 1  # other kernels, other summation orders
    for name, tol in (("copied_warmup", 1e-5 * loose), ("fresh", 1e-4 * loose)):
        workdir = tmp_path / name
        got = _features(workdir)
        assert sorted(ref) == sorted(got)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=tol)
        ranks = set()
        for path in workdir.rglob("shard_*"):
            with safe_open(path, "pt") as fh:
                ranks.add(fh.metadata()["rank"])
        assert ranks == {"0", "1"}  # both processes computed shards
        scores = json.loads((workdir / "scores.json").read_text())
        assert scores == pytest.approx(ref_scores, abs=tol)
    for epoch in (1, 2):
        a, b = (load_file(d / "warmup" / f"epoch_{epoch:03d}.safetensors") for d in (ref_dir, tmp_path / "fresh"))
        assert sorted(a) == sorted(b)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-7)
