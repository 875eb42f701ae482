"""The fault suite (issue #14): damaged, missing and unwritable files in a run folder, and settings that
contradict it. Each case damages one copy of one complete tiny run folder, reruns a stage through the
command line and checks the documented outcome: a one-line error naming the file and how to rebuild
it, or a redo that equals the undamaged result; never a silent difference.
"""

import errno
import json
import re
import shutil

import pytest
import torch
from conftest import TINY_RUN_OVERRIDES

from nacd import cli, distill, evaluate, experts, finetune, train
from nacd import select as selection
from nacd.artifacts import RunDir, read_jsonl, recover_dir
from nacd.config import load_config

FAULT_RUN = (
    *TINY_RUN_OVERRIDES,
    "experts.num_experts=1",
    "distill.iterations=4",
    "distill.panel_size=0",
    "distill.syn_steps=2",
    "distill.batch_size=4",
    "distill.unroll=naive",
    "finetune.train.checkpoint_every=1",
    "eval.benchmarks=['builtin:demo/mc']",
    "eval.limit=8",
    "run.log_level=WARNING",
)


@pytest.fixture(scope="module")
def base_run(tiny_llama_dir, shared_data, tmp_path_factory):
    """One complete run folder: selection, one expert, a 4-iteration distillation, a FULL tuning and an
    evaluation of the base model; each test damages a copy."""
    root = tmp_path_factory.mktemp("fault_base") / "run"
    common = [f"model.spec={tiny_llama_dir}", f"data.root={shared_data}", *FAULT_RUN]
    cfg = load_config(None, [*common, f"run.out_dir={root}"])
    run_dir = RunDir(root)
    selection.run(cfg, run_dir)
    experts.run(cfg, run_dir)
    distill.run(cfg, run_dir)
    finetune.run(cfg, run_dir)
    evaluate.run(cfg, run_dir)
    return root, common


@pytest.fixture
def run_copy(base_run, tmp_path):
    """A copy of the complete run folder and the command-line overrides that point at it."""
    root, common = base_run
    copy = tmp_path / "run"
    shutil.copytree(root, copy, symlinks=True)
    return copy, [*common, f"run.out_dir={copy}"]


def damage(path, how):
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "delete":
        path.unlink()
    elif how == "flip":  # same size, one byte changed in the middle: only the sha256 can tell
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes([data[mid] ^ 0x55]) + data[mid + 1 :])
    else:
        raise ValueError(how)


def nacd(argv, capsys):
    """Run ``nacd ARGV``; returns (exit code, the error line or '')."""
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"nacd {argv[0]}: error:")]
    return code, (lines[-1] if lines else "")


WHAT = {"truncate": r"\d+ bytes, its manifest recorded \d+", "delete": "missing", "flip": "its sha256 differs"}

CASES = [
    # (command and extra overrides, damaged file, damage)
    (["select"], "select/selection.json", "truncate"),
    (["select"], "select/selected.jsonl", "flip"),
    (["experts"], "experts/run_000/epoch_001.safetensors", "truncate"),
    (["experts"], "experts/run_000/epoch_002.safetensors", "delete"),
    (["distill"], "select/selection.json", "flip"),
    (["distill"], "experts/run_000/epoch_001.safetensors", "truncate"),
    (["distill"], "distill/prompts.safetensors", "truncate"),
    (["distill"], "distill/records.jsonl", "flip"),
    (["finetune"], "finetune/full/adapter/adapter_model.safetensors", "truncate"),
    (["finetune", "finetune.dataset=distilled"], "distill/prompts.safetensors", "flip"),
    (["eval", "eval.adapter=ADAPTER"], "finetune/full/adapter/adapter_model.safetensors", "flip"),
]


@pytest.mark.parametrize(("command", "relative", "how"), CASES, ids=[f"{c[0]}-{r}-{h}" for c, r, h in CASES])
def test_a_damaged_artifact_stops_the_stage_with_its_path(run_copy, capsys, command, relative, how):
    root, overrides = run_copy
    damage(root / relative, how)
    extra = [a.replace("ADAPTER", str(root / "finetune/full/adapter")) for a in command[1:]]
    code, line = nacd([command[0], *overrides, *extra], capsys)
    assert code == 1, line
    assert f"{root / relative}: " in line
    assert re.search(WHAT[how], line), line
    assert "again" in line or "delete" in line  # says how to rebuild it
    log = (root / "nacd.log").read_text()
    assert line.split("error: ", 1)[1] in log and "Traceback" in log  # the error and its traceback are logged


def test_a_damaged_evaluation_is_evaluated_again_to_the_same_answers(run_copy, capsys):
    root, overrides = run_copy
    folder = next((root / "eval").iterdir())
    before = (folder / "samples.jsonl").read_bytes(), json.loads((folder / "results.json").read_text())
    damage(folder / "samples.jsonl", "truncate")
    code, line = nacd(["eval", *overrides], capsys)
    assert code == 0, line
    assert (folder / "samples.jsonl").read_bytes() == before[0]
    after = json.loads((folder / "results.json").read_text())["benchmarks"]["demo_mc"]
    timing = ("seconds", "questions_per_s")
    assert {k: v for k, v in after.items() if k not in timing} == {
        k: v for k, v in before[1]["benchmarks"]["demo_mc"].items() if k not in timing
    }


def test_a_checkpoint_with_a_lost_optimizer_state_is_refused(run_copy, capsys, monkeypatch):
    root, overrides = run_copy
    real = train.TrainLoop._step
    calls = {"n": 0}

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(train.TrainLoop, "_step", interrupted)
    argv = ["finetune", *overrides, "finetune.name=cut"]
    assert cli.main(argv) == 130
    monkeypatch.setattr(train.TrainLoop, "_step", real)
    folder = root / "finetune" / "cut"
    assert len(read_jsonl(folder / "metrics.jsonl")) == 3
    saved = (folder / "checkpoint" / "optimizer.safetensors").read_bytes()
    (folder / "checkpoint" / "optimizer.safetensors").unlink()
    code, line = nacd(argv, capsys)
    assert code == 1 and "checkpoint/optimizer.safetensors: missing" in line and "delete" in line
    assert not json.loads((folder / "manifest.json").read_text())["complete"]

    # intact again, it resumes; the metrics hold each step once, and the adapter equals the clean run's
    (folder / "checkpoint" / "optimizer.safetensors").write_bytes(saved)
    code, line = nacd(argv, capsys)
    assert code == 0, line
    steps = [row["step"] for row in read_jsonl(folder / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1)) == list(range(1, 6))
    from safetensors.torch import load_file

    a = load_file(folder / "adapter" / "adapter_model.safetensors")
    b = load_file(root / "finetune" / "full" / "adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_is_one_line_naming_the_file_and_recovers(
    tiny_llama_dir, shared_data, tmp_path, capsys, monkeypatch
):
    import nacd.artifacts as artifacts

    root = tmp_path / "run"
    overrides = [f"model.spec={tiny_llama_dir}", f"data.root={shared_data}", *FAULT_RUN, f"run.out_dir={root}"]
    real = artifacts.os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts.os, "fsync", full)
    code, line = nacd(["select", *overrides], capsys)
    assert code == 1 and f"{root}/" in line and "cannot write: No space left on device; free some space" in line
    assert "No space left" in (root / "nacd.log").read_text()
    assert not (root / "select" / "manifest.json").exists()
    monkeypatch.setattr(artifacts.os, "fsync", real)
    code, line = nacd(["select", *overrides], capsys)
    assert code == 0, line
    assert json.loads((root / "select" / "manifest.json").read_text())["complete"]


def test_a_refused_command_leaves_the_run_config_as_it_was(run_copy, capsys):
    root, overrides = run_copy
    before = (root / "config.yaml").read_bytes()
    backups = sorted(root.glob("config.*.yaml"))
    code, line = nacd(["distill", *overrides, "distill.iterations=2"], capsys)
    assert code == 1 and "finished distillation of 4 iterations" in line
    assert (root / "config.yaml").read_bytes() == before
    assert sorted(root.glob("config.*.yaml")) == backups


def test_experts_of_another_lora_rank_are_named_by_their_setting(run_copy, capsys):
    root, overrides = run_copy
    shutil.rmtree(root / "distill")
    code, line = nacd(["distill", *overrides, "lora.r=4"], capsys)
    assert code == 1 and "field 'lora.r' was 8 when this was made, now 4" in line
    assert len(line) < 400


def test_messages_that_point_at_the_fix(tiny_llama_dir, shared_data, tmp_path, capsys):
    overrides = [f"model.spec={tiny_llama_dir}", f"data.root={shared_data}", f"run.out_dir={tmp_path / 'r'}"]
    code, line = nacd(["config", "-c", "configs/demo.yaml", "distill.beta=abc"], capsys)
    assert code == 2 and "from the command-line override 'distill.beta=abc'" in line
    code, line = nacd(["select", *overrides, "select.method=bm25", "select.target=arc_hard"], capsys)
    assert code == 1 and "no known benchmark" in line and "did you mean 'arc_easy'" in line
    assert not (tmp_path / "r" / "select").exists()
    code, line = nacd(["eval", *overrides, f"eval.adapter={tmp_path / 'nowhere'}"], capsys)
    assert code == 1 and "no adapter_config.json" in line
    cfg = load_config(None, [*overrides, "select.method=bm25", "select.target=builtin:demo/mc"])
    assert selection.is_benchmark_target(cfg.select.target, cfg.select.target_split, cfg.data.root)


def test_brief_errors_and_json_faults():
    long = RuntimeError(
        "Error(s) in loading state_dict for PeftModelForCausalLM:\n"
        + "".join(f"\tsize mismatch for layer.{i}.lora_A.weight: copying a param with shape ...\n" for i in range(300))
    )
    text = evaluate.brief_error(long)
    assert len(text) < 500 and "and 299 more size mismatches" in text and "layer.0.lora_A" in text
    from nacd.sources import json_fault

    line = '{"instruction": "Describe the water cycle", "response": "Water evapor'
    try:
        json.loads(line)
    except json.JSONDecodeError as exc:
        message = json_fault(exc, line)
    assert f"the line ends at column {len(line)}" in message and "near" in message


# --------------------------------------------------------------------------- kill -9


#: Per stage: longer settings (so that a kill lands mid-run), the folder the stage writes, the checkpoint
#: file whose appearance arms the kill, and the files an uninterrupted run and a resumed one must share.
KILLED = {
    "experts": (
        ["experts.train.epochs=6", "experts.train.checkpoint_every=1"],
        "experts",
        "experts/run_000/checkpoint/state.json",
        [f"experts/run_000/epoch_{e:03d}.safetensors" for e in range(7)],
    ),
    "distill": (
        ["distill.iterations=16", "distill.checkpoint_every=1"],
        "distill",
        "distill/checkpoint/state.json",
        ["distill/prompts.safetensors"],
    ),
    "finetune": (
        ["finetune.train.epochs=6", "finetune.train.checkpoint_every=1", "finetune.name=long"],
        "finetune/long",
        "finetune/long/checkpoint/state.json",
        ["finetune/long/adapter/adapter_model.safetensors"],
    ),
}


def _same_tensors(a_path, b_path):
    from safetensors.torch import load_file

    a, b = load_file(a_path), load_file(b_path)
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _start_and_kill_9(command, args, armed, key):
    """Start ``nacd COMMAND ARGS`` as a process, wait until ``armed()``, sleep a random 0-0.4 s (seeded by
    ``key``, so that the kill lands mid-step or mid-write, reproducibly) and SIGKILL it."""
    import random
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "nacd", command, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not armed():
        assert proc.poll() is None, f"nacd {command} ended before it was armed: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "not armed within 300 s"
        time.sleep(0.02)
    time.sleep(random.Random(key).uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the stage finished before the kill: lengthen it"
    proc.stderr.close()


@pytest.mark.parametrize("command", sorted(KILLED))
def test_kill_9_at_a_random_point_resumes_to_the_uninterrupted_result(run_copy, tmp_path, command):
    """SIGKILL (no handler runs, a write may be cut anywhere) at a seeded random moment after the first
    checkpoint; the rerun resumes and ends bitwise where an uninterrupted run ends (CPU)."""
    root, overrides = run_copy
    longer, folder, armed, outputs = KILLED[command]
    reference = tmp_path / "reference"
    shutil.copytree(root, reference, symlinks=True)
    for run in (root, reference):
        shutil.rmtree(run / folder, ignore_errors=True)
    ref_args = [*overrides[:-1], f"run.out_dir={reference}", *longer]
    assert cli.main([command, *ref_args]) == 0

    args = [*overrides, *longer]
    _start_and_kill_9(command, args, lambda: (root / armed).is_file(), f"kill-{command}")
    manifest = root / folder / ("run_000" if command == "experts" else "") / "manifest.json"
    if json.loads(manifest.read_text())["complete"]:  # the kill landed after the end
        if command == "distill":  # its checkpoint stays, so that raising distill.iterations continues it
            assert (recover_dir((root / armed).parent) / "state.json").is_file()
        else:  # the checkpoint goes whole (remove_dir) after the manifest: gone, or whole where the kill
            ckpt = (root / armed).parent  # landed between the two, and then the rerun's skip removes it
            assert not ckpt.exists() or (ckpt / "state.json").is_file()
        assert cli.main([command, *args]) == 0
        assert command == "distill" or not (root / armed).parent.exists()
        assert all(_same_tensors(root / rel, reference / rel) for rel in outputs)
        return
    # a kill between atomic_dir's two renames leaves the checkpoint aside, not in place: the rerun puts it
    # back first (recover_dir), and so does the test before reading which step it holds
    ckpt = recover_dir((root / armed).parent)
    done = json.loads((ckpt / "state.json").read_text())["state"]["iteration" if command == "distill" else "step"]
    assert done >= 1  # the rerun resumes from a checkpoint, the one the kill left whole (or its predecessor)
    assert not json.loads((root / folder / ("run_000" if command == "experts" else "") / "manifest.json").read_text())[
        "complete"
    ]
    assert cli.main([command, *args, "run.log_level=INFO"]) == 0
    log = (root / "nacd.log").read_text()
    assert re.search(rf"resumed from {re.escape(str(ckpt))} at (step|iteration) {done}\b", log), log[-2000:]
    for rel in outputs:
        assert _same_tensors(root / rel, reference / rel), rel
    if command != "experts":  # each step or iteration once in the metrics, however the kill cut them
        name = "history.jsonl" if command == "distill" else "metrics.jsonl"
        key = "iteration" if command == "distill" else "step"
        steps = [row[key] for row in read_jsonl(root / folder / name)]
        assert steps == list(range(1, len(steps) + 1))


#: LESS on the fault run's 40 examples: a 2-epoch warm-up on 10, then features in shards of 2 examples
#: (20 corpus shards per warm-up epoch), so that a kill after the first shard lands among the others.
LESS_KILLED = [
    "select.method=less",
    "select.target=builtin:demo/mc",
    "select.budget=8",
    "select.less.warmup_fraction=0.25",
    "select.less.warmup.epochs=2",
    "select.less.warmup.batch_size=4",
    "select.less.proj_dim=256",
    "select.less.shard_size=2",
    "select.less.grad_batch_size=2",
    "select.less.feature_dtype=float32",
]


def test_kill_9_among_less_features_resumes_to_the_uninterrupted_selection(run_copy, tmp_path):
    """SIGKILL while LESS writes its feature shards: the rerun keeps the whole shards, computes the rest,
    and selects what an uninterrupted run selects, from bitwise the same features (CPU)."""
    root, overrides = run_copy
    reference = tmp_path / "reference"
    shutil.copytree(root, reference, symlinks=True)
    for run in (root, reference):
        shutil.rmtree(run / "select")
    assert cli.main(["select", *overrides[:-1], f"run.out_dir={reference}", *LESS_KILLED]) == 0
    features = root / "select" / "less" / "features"
    args = [*overrides, *LESS_KILLED]
    _start_and_kill_9("select", args, lambda: any(features.rglob("shard_*.safetensors")), "kill-less")
    kept = len(list(features.rglob("shard_*.safetensors")))
    total = len(list((reference / "select" / "less" / "features").rglob("shard_*.safetensors")))
    assert 1 <= kept < total, (kept, total)
    manifest = root / "select" / "manifest.json"
    assert not manifest.exists() or not json.loads(manifest.read_text())["complete"]
    assert cli.main(["select", *args, "run.log_level=INFO"]) == 0
    log = (root / "nacd.log").read_text()
    found = [int(k) for k in re.findall(r"(\d+) of \d+ shard\(s\) already in", log)]
    assert sum(found) == kept, log[-2000:]  # shards are written atomically: every one on disk is whole, and kept
    for shard in (reference / "select" / "less" / "features").rglob("shard_*.safetensors"):
        assert _same_tensors(shard, root / shard.relative_to(reference)), shard
    for name in ("selection.json",):
        assert (root / "select" / name).read_bytes() == (reference / "select" / name).read_bytes()


def test_a_moved_run_folder_keeps_its_evaluations(run_copy, tmp_path, capsys, caplog):
    """Paths inside a run folder are recorded relative to it: a copied folder reuses its finished
    evaluation of an adapter; a real change is redone, naming the field and both values."""
    copy, args = run_copy
    adapter = ["eval.name=full", f"eval.adapter={copy}/finetune/full/adapter"]
    assert cli.main(["eval", *args, *adapter]) == 0
    manifest = json.loads((copy / "eval" / "full" / "manifest.json").read_text())
    assert manifest["adapter"]["path"] == "finetune/full/adapter"
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(copy, moved, symlinks=True)
    samples = moved / "eval" / "full" / "samples.jsonl"
    stamp = samples.stat().st_mtime_ns
    moved_args = [*args[:-1], f"run.out_dir={moved}", "eval.name=full", f"eval.adapter={moved}/finetune/full/adapter"]
    assert cli.main(["eval", *moved_args]) == 0
    assert samples.stat().st_mtime_ns == stamp  # reused, not evaluated again
    caplog.clear()
    assert cli.main(["eval", *moved_args, "eval.limit=4"]) == 0
    assert "was made with other settings (limit was 8, now 4); evaluating again" in caplog.text


def test_report_inspect_and_export_refuse_a_config_that_contradicts_the_folder(
    run_copy, tiny_gemma_dir, tmp_path, capsys
):
    """A config naming another distilling model (here: the distilling model as a receiver) or another
    selection is refused before anything is written, naming the file, the field and both values."""
    copy, args = run_copy
    swapped = [a for a in args if not a.startswith("model.spec=")]
    distiller = next(a for a in args if a.startswith("model.spec=")).split("=", 1)[1]
    swapped += [f"model.spec={tiny_gemma_dir}", f"compare.receivers=['{distiller}']"]
    for argv in (
        ["report", *swapped],
        ["inspect", *swapped, "--no-plot"],
        ["export", *swapped, "--out", str(tmp_path / "x")],
    ):
        code, err = nacd(argv, capsys)
        assert code == 1 and "distill/manifest.json: field 'base_model.spec' is" in err, argv
        assert "as a receiving model" in err and f"nacd {argv[0]} {copy}" in err
    assert not (copy / "report").exists() and not (tmp_path / "x").exists()
    code, err = nacd(["report", *args, "select.budget=0.5"], capsys)
    assert code == 1 and "config.yaml: field 'select.budget' is" in err and "0.5 in the given config" in err


def test_a_non_finite_expert_snapshot_is_named_not_distilled_around(run_copy, capsys):
    """NaN in one tensor of an expert snapshot whose manifest vouches for it (size and sha256 rewritten):
    the distillation refuses, naming the file and the tensor, instead of skipping every iteration."""
    from safetensors.torch import load_file, save_file

    from nacd.artifacts import file_record

    copy, args = run_copy
    shutil.rmtree(copy / "distill")
    folder = next((copy / "experts").glob("run_*"))
    path = folder / "epoch_001.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, path)
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["snapshots"]:
        if entry["file"] == path.name:
            entry.update(file_record(path))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code, err = nacd(["distill", *args], capsys)
    assert code == 1 and f"{path}: tensor '{name}' holds 1 non-finite value(s) (NaN or Inf)" in err
    assert "run `nacd experts` again" in err and not (copy / "distill" / "prompts.safetensors").exists()


def test_report_says_when_the_distilled_set_cannot_be_read(run_copy, capsys, caplog):
    copy, args = run_copy
    (copy / "distill" / "records.jsonl").unlink()
    code, err = nacd(["report", *args], capsys)
    assert code == 0
    md = (copy / "report" / "report.md").read_text()
    assert "## Distillation" in md and "The distilled set cannot be read:" in md and "records.jsonl" in md
    assert "the distilled set cannot be read" in caplog.text
