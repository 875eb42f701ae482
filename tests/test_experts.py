"""Expert trajectories: snapshots, the store, skipping, mismatches, kill -9 resume, 2 processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import multiprocess_overrides
from safetensors.torch import load_file

from nacd import experts
from nacd.artifacts import RunDir
from nacd.config import load_config
from nacd.errors import NacdError
from nacd.lora import lora_state
from nacd.train import setup_training


def _snapshots(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.relative_to(folder).as_posix(): load_file(p) for p in sorted(folder.rglob("*.safetensors"))}


def _assert_same_snapshots(a: Path, b: Path, exact: bool = True) -> None:
    sa, sb = _snapshots(a), _snapshots(b)
    assert sorted(sa) == sorted(sb) and sa
    for name in sa:
        for key in sa[name]:
            if exact:
                assert torch.equal(sa[name][key], sb[name][key]), (name, key)
            else:
                torch.testing.assert_close(sa[name][key], sb[name][key], rtol=1e-5, atol=1e-6)


def test_experts_record_snapshots_that_reload_exactly(tiny_overrides, tmp_path):
    cfg = load_config(None, [*tiny_overrides, "experts.save_every_steps=3"])
    run_dir = RunDir(cfg.run.out_dir)
    run_dir.init(cfg)
    setup = setup_training(cfg)
    manifests = [experts.train_expert(cfg, setup, run_dir.expert_run_dir(i), i) for i in range(2)]
    store = experts.ExpertStore(run_dir.experts_dir)
    assert store.runs == [0, 1]
    assert store.epochs(0) == [0, 1, 2]
    # the last snapshot is exactly the model's final LoRA state in memory
    final = lora_state(setup.model)
    snap = store.snapshot(1, 2)
    assert sorted(snap) == sorted(final)
    assert all(torch.equal(snap[k], final[k]) for k in final)
    # step 0: B is zero (LoRA starts at the base model); A differs between experts (seeds)
    s00, s10 = store.snapshot(0, 0), store.snapshot(1, 0)
    b_keys = [k for k in s00 if "lora_B" in k]
    a_keys = [k for k in s00 if "lora_A" in k]
    assert b_keys and all(torch.count_nonzero(s00[k]) == 0 for k in b_keys)
    assert all(not torch.equal(s00[k], s10[k]) for k in a_keys)
    assert all(not torch.equal(s00[k], store.snapshot(0, 2)[k]) for k in b_keys)  # training moved B
    m = manifests[0]
    assert m["complete"] and m["seed"] == 0 and manifests[1]["seed"] == 1
    assert m["steps_per_epoch"] == 5 and m["total_steps"] == 10 and m["n_examples"] == 40
    assert m["lora"]["target_modules"] == ["q_proj", "v_proj"] and m["train"]["optimizer"] == "sgd"
    assert m["parameters"] == {k: list(v.shape) for k, v in s00.items()}
    assert len(m["base_model"]["fingerprint"]) == 64 and len(m["data_hash"]) == 64
    steps = [(s["epoch"], s["step"]) for s in m["snapshots"]]
    assert steps == [(0, 0), (None, 3), (1, 5), (None, 6), (None, 9), (2, 10)]
    assert all(isinstance(s["loss"], float) and s["loss"] > 0 for s in m["snapshots"][1:])
    assert store.snapshot_at_step(0, 3).keys() == s00.keys()
    assert not (run_dir.expert_run_dir(0) / "checkpoint").exists()
    with pytest.raises(NacdError, match=r"no snapshot for epoch 7 \(has \[0, 1, 2\]\)"):
        store.snapshot(0, 7)


def test_store_loads_lazily(tiny_overrides, monkeypatch):
    cfg = load_config(None, [*tiny_overrides, "experts.num_experts=1"])
    experts.run(cfg, RunDir(cfg.run.out_dir))
    calls = []
    from nacd import artifacts

    real = artifacts.read_verified
    monkeypatch.setattr(artifacts, "read_verified", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    store = experts.ExpertStore(RunDir(cfg.run.out_dir).experts_dir)
    assert calls == []
    store.snapshot(0, 1)
    assert [Path(c).name for c in calls] == ["epoch_001.safetensors"]


def test_complete_runs_are_skipped_and_mismatches_refused(tiny_overrides, tiny_gemma_dir):
    cfg = load_config(None, [*tiny_overrides, "experts.num_experts=1"])
    run_dir = RunDir(cfg.run.out_dir)
    experts.run(cfg, run_dir)
    manifest = run_dir.expert_run_dir(0) / "manifest.json"
    before = manifest.read_text()
    mtime = os.path.getmtime(manifest)
    experts.run(cfg, run_dir)
    assert manifest.read_text() == before and os.path.getmtime(manifest) == mtime
    with pytest.raises(
        NacdError, match=r"manifest.json: field 'lora.r' was 8 when this was made, now 4; delete .*run_000 or choose"
    ):
        experts.run(load_config(None, [*tiny_overrides, "experts.num_experts=1", "lora.r=4"]), run_dir)
    with pytest.raises(NacdError, match=r"manifest.json: field 'data_hash'"):
        experts.run(load_config(None, [*tiny_overrides, "experts.num_experts=1", "data.max_seq_len=48"]), run_dir)
    other_model = [*tiny_overrides, "experts.num_experts=1", f"model.spec={tiny_gemma_dir}"]
    with pytest.raises(NacdError, match=r"manifest.json: field 'base_model.spec' was .*tiny_llama.* now .*tiny_gemma"):
        experts.run(load_config(None, other_model), run_dir)


def test_cli_refuses_zero_epochs(tiny_overrides, capsys):
    from nacd.cli import main

    assert main(["experts", *tiny_overrides, "experts.train.epochs=0"]) == 2
    assert "config key 'experts.train.epochs': must be at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------- real processes

LONG = ["experts.train.epochs=4", "experts.train.batch_size=4", "experts.train.micro_batch_size=2"]


def _cli(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "nacd", "experts", *overrides]


def test_kill_9_then_rerun_gives_the_same_snapshots(tiny_overrides, tmp_path):
    clean = [*tiny_overrides[:2], f"run.out_dir={tmp_path / 'clean'}", *tiny_overrides[3:], *LONG]
    killed = [*tiny_overrides[:2], f"run.out_dir={tmp_path / 'killed'}", *tiny_overrides[3:], *LONG]
    subprocess.run(_cli(clean), check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(_cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "experts" / "run_000" / "checkpoint" / "state.json"
    deadline = time.time() + 240
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            try:
                step = json.loads(state.read_text())["state"]["step"]
            except (json.JSONDecodeError, KeyError, FileNotFoundError):
                step = 0
            if step >= 12:  # past the first epoch (10 steps), in the middle of the second
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifests = sorted((tmp_path / "killed" / "experts").glob("run_*/manifest.json"))
    assert not all(json.loads(m.read_text())["complete"] for m in manifests), "the run ended before the kill"

    rerun = subprocess.run(_cli(killed), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr
    for i in range(2):
        _assert_same_snapshots(
            tmp_path / "clean" / "experts" / f"run_{i:03d}", tmp_path / "killed" / "experts" / f"run_{i:03d}"
        )
        a = json.loads((tmp_path / "clean" / "experts" / f"run_{i:03d}" / "manifest.json").read_text())
        b = json.loads((tmp_path / "killed" / "experts" / f"run_{i:03d}" / "manifest.json").read_text())
        # the tensors are bitwise equal (above); the files' sha256 may differ, since safetensors writes its
        # metadata map in an order that varies between processes: hashes vouch for a file, not for a result
        assert [{k: v for k, v in s.items() if k != "sha256"} for s in a["snapshots"]] == [
            {k: v for k, v in s.items() if k != "sha256"} for s in b["snapshots"]
        ]


def test_ctrl_c_exits_130_and_resumes(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, *LONG, "experts.num_experts=1", "experts.train.checkpoint_every=1"]
    proc = subprocess.Popen(_cli(overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "run" / "experts" / "run_000" / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not state.is_file():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode != 0:  # finished before the signal otherwise
        assert proc.returncode == 130
        assert "interrupted; finished work is kept; run the same command again" in err
    done = subprocess.run(_cli(overrides), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stderr or proc.returncode == 0
    assert json.loads((state.parent.parent / "manifest.json").read_text())["complete"]


def test_two_processes_match_one(tiny_overrides, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun is installed with torch"
    common = [*tiny_overrides[3:], "experts.num_experts=1", *multiprocess_overrides()]  # one device for both
    one = [*tiny_overrides[:2], f"run.out_dir={tmp_path / 'one'}", *common]
    two = [*tiny_overrides[:2], f"run.out_dir={tmp_path / 'two'}", *common]
    subprocess.run(_cli(one), check=True, capture_output=True, timeout=300)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "nacd", "experts", *two],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_snapshots(
        tmp_path / "one" / "experts" / "run_000", tmp_path / "two" / "experts" / "run_000", exact=False
    )
    # and the 2-process run really moved the parameters (the comparison is not between two initial states)
    snaps = _snapshots(tmp_path / "two" / "experts" / "run_000")
    key = next(k for k in snaps["epoch_002.safetensors"] if "lora_B" in k)
    assert torch.count_nonzero(snaps["epoch_002.safetensors"][key]) > 0
