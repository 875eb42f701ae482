"""Atomic writes, manifests, metrics and the run folder."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from nacd.artifacts import (
    MetricsWriter,
    RunDir,
    atomic_dir,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    read_jsonl,
    read_manifest,
    sha256_json,
    write_manifest,
)
from nacd.config import load_config
from nacd.errors import NacdError


def test_atomic_write_replaces_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "a" / "x.json"
    atomic_write_json(path, {"v": 1})
    atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o044  # readable by others, unlike mkstemp's 0600


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"v": 1})

    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # fails while writing the temporary file
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_atomic_dir(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("ok")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "f").read_text() == "ok"
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("half")
        raise RuntimeError
    assert (tmp_path / "out" / "f").read_text() == "ok"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_killed_between_its_renames_leaves_a_whole_version(tmp_path, monkeypatch):
    """A kill between renaming the old folder aside and the new one in: the folder is missing, its
    previous version whole aside; a reader (recover_dir) and the next write put it back."""
    import os

    from nacd import artifacts

    out = tmp_path / "ck"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("v1")
        (tmp / "b").write_text("v1")
    real = os.replace
    calls = []

    def killed_after_the_first_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder's rename never happens
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", killed_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt), atomic_dir(out) as tmp:
        (tmp / "a").write_text("v2")
    monkeypatch.setattr(artifacts.os, "replace", real)
    assert not out.exists() and (tmp_path / ".ck.old" / "b").read_text() == "v1"
    assert artifacts.recover_dir(out) == out
    assert (out / "a").read_text() == "v1" and (out / "b").read_text() == "v1"  # the previous version, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    (tmp_path / ".ck.old").mkdir()  # left by a kill after a swap: stale, removed by the next write
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("v3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and sorted(p.name for p in out.iterdir()) == ["a"]


def test_safetensors_with_metadata(tmp_path):
    t = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    atomic_save_safetensors(t, tmp_path / "t.safetensors", {"epoch": "1"})
    back = load_file(tmp_path / "t.safetensors")
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])


def test_manifest_kind_and_schema(tmp_path):
    write_manifest(tmp_path, "expert_run", seed=3)
    body = read_manifest(tmp_path, "expert_run")
    assert body["seed"] == 3 and body["schema_version"] == 1
    with pytest.raises(NacdError, match=r"manifest.json: field 'kind' is 'expert_run', expected 'selection'"):
        read_manifest(tmp_path, "selection")
    assert read_manifest(tmp_path / "nothing") is None
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(NacdError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_metrics_jsonl(tmp_path):
    m = MetricsWriter(tmp_path / "metrics.jsonl")
    m.write(step=1, loss=torch.tensor(2.5).item())
    m.write(step=2, loss=2.0)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == 2.5


def test_sha256_json_ignores_key_order():
    assert sha256_json({"a": 1, "b": 2}) == sha256_json({"b": 2, "a": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})


def test_run_dir_saves_resolved_config_and_keeps_a_changed_one(tmp_path):
    rd = RunDir(tmp_path / "run")
    assert not rd.root.exists()  # constructing touches nothing
    rd.init(load_config(None, ["distill.syn_steps=5"]))
    assert "syn_steps: 5" in rd.config_path.read_text()
    rd.init(load_config(None, ["distill.syn_steps=5"]))
    assert [p.name for p in rd.root.iterdir()] == ["config.yaml"]  # same config: nothing kept aside
    rd.init(load_config(None, ["distill.syn_steps=7"]))
    assert "syn_steps: 7" in rd.config_path.read_text()
    kept = [p for p in rd.root.iterdir() if p.name != "config.yaml"]
    assert len(kept) == 1 and "syn_steps: 5" in kept[0].read_text()
    assert rd.expert_run_dir(2).name == "run_002"


def test_remove_dir_leaves_a_folder_whole_or_gone(tmp_path):
    """A finished stage's checkpoint goes by a rename first: a kill mid-removal leaves a hidden folder the
    next removal finishes, never a half checkpoint under the real name."""
    from nacd.artifacts import remove_dir

    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    (ckpt / "state.json").write_text("{}")
    half = tmp_path / ".checkpoint.removed"  # a removal a kill interrupted
    half.mkdir()
    (half / "state.safetensors").write_text("x")
    (tmp_path / ".checkpoint.old").mkdir()  # a previous version atomic_dir left aside
    remove_dir(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    remove_dir(ckpt)  # nothing there: nothing to do
