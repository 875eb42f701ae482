"""The real command line: help, errors, unbuilt stages, models, and the smoke run end to end."""

import json
import subprocess
import sys

import pytest

from nacd.cli import STAGE_COMMANDS, main

ALL_COMMANDS = [*STAGE_COMMANDS, "models", "config", "inspect", "report", "export"]


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in ALL_COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "-h"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: nacd {command}" in out
    if command in STAGE_COMMANDS:  # what it reads and writes, its config sections, an example of it
        assert "KEY=VALUE" in out and "--config" in out
        assert "reads:" in out and "writes:" in out and "config:" in out and f"example: nacd {command} " in out


def test_run_checks_every_stage_before_any_work(tmp_path, capsys):
    code = main(["run", f"run.out_dir={tmp_path / 'run'}", "eval.benchmarks=['missing.jsonl']"])
    err = capsys.readouterr().err
    assert code != 0 and "eval.benchmarks" in err and "missing.jsonl" in err
    assert not (tmp_path / "run").exists()
    code = main(["run", f"run.out_dir={tmp_path / 'run'}", "select.method=bm25"])
    assert code != 0 and "select.target" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_errors_exit_2_without_traceback(capsys):
    code = main(["config", "distill.syn_steps=zero"])
    err = capsys.readouterr().err
    assert code == 2
    assert (
        err.strip()
        == "nacd config: error: config key 'distill.syn_steps': expected int, got 'zero' (from the command-line override 'distill.syn_steps=zero')"
    )


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "distill.syn_steps=8"]) == 0
    out = capsys.readouterr().out
    assert "syn_steps: 8" in out and "spec: smollm2-135m" in out
    assert main(["config", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "distill.beta (float) = 1.0" in out
    assert main(["config", "--explain", "lora"]) == 0
    out = capsys.readouterr().out
    keys = [line.split(" ")[0] for line in out.splitlines() if not line.startswith(" ")]
    assert keys and all(key.startswith("lora.") for key in keys) and "lora.r" in keys
    assert main(["config", "--explain", "nope"]) == 2
    assert "no such section; sections: compare, data, distill" in capsys.readouterr().err


def test_models_list_and_errors(capsys, tmp_path):
    assert main(["models", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma3-270m" in out
    assert main(["models", "prepare", "nope", "--cache-dir", str(tmp_path)]) == 1
    assert "unknown built-in model(s) nope" in capsys.readouterr().err
    assert main(["models", "prepare", "--cache-dir", str(tmp_path)]) == 1


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "nacd", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("nacd ")


def test_smoke_end_to_end_on_a_tiny_model(tiny_llama_dir, shared_data, tmp_path):
    run_dir = tmp_path / "smoke"
    cmd = [
        sys.executable,
        "-m",
        "nacd",
        "smoke",
        f"model.spec={tiny_llama_dir}",
        f"data.root={shared_data}",
        "data.max_seq_len=64",
        "data.sources.0.max_examples=5",
        "data.sources.1.max_examples=5",
        "data.sources.2.max_examples=5",
        "data.sources.3.max_examples=5",
        f"run.out_dir={run_dir}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((run_dir / "smoke.json").read_text())
    assert result["corpus"]["n"] == 20
    assert result["loaded"] == {"dolly": 5, "oasst1": 5, "flan_cot": 5, "sni": 5}
    assert result["model"]["architecture"] == "LlamaForCausalLM"
    assert "[[" in result["example"]["marked"]  # the loss tokens are marked
    assert (run_dir / "config.yaml").is_file() and f"spec: {tiny_llama_dir}" in (run_dir / "config.yaml").read_text()
    assert "tokenized  20 examples" in proc.stdout


def test_a_first_argument_without_equals_is_the_config_file(capsys):
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert main(["config", str(demo), "run.seed=3"]) == 0
    out = capsys.readouterr().out
    assert "builtin:demo/corpus.jsonl" in out and "seed: 3" in out
    assert main(["config", "-c", str(demo), str(demo)]) == 2
    assert "overrides are KEY=VALUE" in capsys.readouterr().err


def test_a_stopped_or_orphaned_process_says_so_in_one_line(monkeypatch, capsys):
    """Issue #13: SIGTERM (a launcher stopping every process when one failed, or a user's kill) and a
    collective that fails because another process is gone each end in one line that says what happened
    and that the same command resumes; a RuntimeError of any other kind is still a bug (traceback)."""
    import os
    import signal

    from nacd import cli

    def killed(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(cli, "_dispatch", killed)
    assert main(["distill"]) == 143
    assert "nacd distill: stopped (SIGTERM); finished work is kept" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler lives only for the command

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["distill"]) == 143
    assert "nacd distill (process 1 of 2): stopped by the launcher (SIGTERM)" in capsys.readouterr().err

    def orphaned(args):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:1")

    monkeypatch.setattr(cli, "_dispatch", orphaned)
    assert main(["distill"]) == 1
    err = capsys.readouterr().err
    assert "nacd distill (process 1 of 2): error: lost contact with another process (RuntimeError: [" in err
    assert "Traceback" not in err

    def bug(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(cli, "_dispatch", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["distill"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(cli, "_dispatch", orphaned)  # one process: no other process to lose
    with pytest.raises(RuntimeError, match="Connection closed"):
        main(["distill"])
