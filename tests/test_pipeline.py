"""nacd run end to end on tiny models: every artifact, the report, numbers from the run, resume."""

import json

import numpy as np
import pytest

from nacd import cli
from nacd.artifacts import RunDir, read_jsonl
from nacd.config import load_config
from nacd.errors import ConfigError, NacdError
from nacd.evaluate import model_name
from nacd.pipeline import Cell, CostBook, cell_configs, needed_stages, plan
from nacd.report import summarize
from nacd.stats import paired_bootstrap

RUN = (
    "data.sources=[{path: 'builtin:demo/corpus.jsonl', name: demo, max_examples: 24}]",
    "data.max_seq_len=48",
    "select.budget=8",
    "experts.num_experts=1",
    "experts.train.epochs=2",
    "experts.train.batch_size=8",
    "experts.train.optimizer=sgd",
    "experts.train.lr=0.5",
    "experts.train.lr_schedule=constant",
    "experts.train.warmup_ratio=0",
    "distill.syn_steps=2",
    "distill.batch_size=4",
    "distill.iterations=3",
    "distill.max_start_epoch=1",
    "finetune.train.epochs=1",
    "finetune.train.batch_size=8",
    "eval.benchmarks=['builtin:demo/mc']",
    "eval.limits={demo_mc: 12}",
    "compare.seeds=[0, 1]",
    "compare.bootstrap_samples=200",
)


def test_paired_bootstrap_is_centered_and_paired():
    rng = np.random.default_rng(0)
    b = rng.integers(0, 2, size=(2, 400)).astype(float)
    same = paired_bootstrap(b, b, 300)
    assert same["diff"] == same["lo"] == same["hi"] == 0.0  # paired: identical variants never differ
    a = b.copy()
    a[:, :40] = 1 - b[:, :40]  # flip 10% of answers: a known difference
    res = paired_bootstrap(a, b, 500, 0.9, seed=1)
    assert res["diff"] == pytest.approx((a - b).mean())
    assert res["lo"] < res["diff"] < res["hi"]
    better = np.maximum(a, b)
    res = paired_bootstrap(better, b, 500)
    assert res["lo"] > 0 and res["p_le_0"] == 0.0
    with pytest.raises(ValueError):
        paired_bootstrap(a[:, :3], b, 10)


def test_gap_closed_against_hand_values_signs_and_no_gap():
    from nacd.stats import gap_closed

    q = np.arange(200)
    sel, nacd, full = (q < 100).astype(float), (q < 140).astype(float), (q < 180).astype(float)
    res = gap_closed(full, sel, nacd, samples=400)  # 50 -> 70 of the way to 90: half the gap
    assert res["status"] == "ok" and res["ratio"] == pytest.approx(0.5)
    assert 0 < res["lo"] < 0.5 < res["hi"] < 1
    assert res["gap"]["diff"] == pytest.approx(0.4) and res["recovered"]["diff"] == pytest.approx(0.2)
    # a loss: lower is better; the ratio is the same formula, and only "FULL is worse" needs the sign
    rng = np.random.default_rng(0)
    base = rng.uniform(1.0, 3.0, size=(2, 300))
    sel_l, full_l, nacd_l = base, base - 0.5, base - 0.2
    res = gap_closed(full_l, sel_l, nacd_l, higher_is_better=False, samples=300)
    assert res["status"] == "ok" and res["ratio"] == pytest.approx(0.4)
    assert res["lo"] == pytest.approx(0.4) and res["hi"] == pytest.approx(0.4)  # the same shift on every question
    assert gap_closed(full_l, sel_l, nacd_l, higher_is_better=True, samples=300)["status"] == "full_worse"
    # FULL indistinguishable from SEL: no ratio to read
    noisy = base + rng.normal(0, 0.3, size=base.shape)
    res = gap_closed(noisy, base, nacd_l, higher_is_better=False, samples=300)
    assert res["status"] == "no_gap" and res["ratio"] is None and res["gap"]["lo"] < 0 < res["gap"]["hi"]
    # FULL with one seed against two: resampled on its own
    res = gap_closed(full_l[:1], sel_l, nacd_l, higher_is_better=False, paired_full=False, samples=300)
    assert res["n_full_seeds"] == 1 and res["status"] == "ok"
    with pytest.raises(ValueError):
        gap_closed(full_l[:1], sel_l, nacd_l)


def test_crossing_interpolates_and_says_below_or_beyond():
    from nacd.stats import crossing

    curve = [(20, 60.0), (10, 50.0), (40, 70.0), (200, 80.0)]
    assert crossing(curve, 65.0) == {"size": pytest.approx(30.0), "where": "between"}
    assert crossing(curve, 75.0)["size"] == pytest.approx(120.0)
    assert crossing(curve, 45.0) == {"size": None, "where": "below"}
    from nacd.sizes import effective_line, fmt_effective

    flat = {"where": "no_gap", "size": None, "selected": 8, "smallest": 4, "largest": 16, "full_in_curve": True}
    assert fmt_effective(flat) == "no gap to close"
    assert "not defined for m (FULL does not beat SEL" in effective_line("m", "b", flat)
    assert fmt_effective({**flat, "where": "full_worse"}) == "FULL worse than SEL"
    assert crossing(curve, 85.0) == {"size": None, "where": "beyond"}
    loss = [(10, 2.0), (20, 1.8), (40, 1.6)]
    assert crossing(loss, 1.7, higher_is_better=False)["size"] == pytest.approx(30.0)
    assert crossing(loss, 2.1, higher_is_better=False)["where"] == "below"
    # not monotone: the first size that reaches the target
    assert crossing([(1, 0.0), (2, 10.0), (3, 5.0), (4, 20.0)], 8.0)["size"] == pytest.approx(1.8)


def test_size_variants_are_named_by_ranking_and_multiple(tiny_overrides):
    from nacd.sizes import size_count, variants

    cfg = load_config(None, [*tiny_overrides, "compare.sizes=[4, 0.5, 2]", "compare.size_methods=[select, random]",
                             "select.method=bm25", "select.target=arc_easy"])  # fmt: skip
    assert [v.name for v in variants(cfg)] == ["sel_0.5x", "sel_2x", "sel_4x", "random_0.5x", "random_1x",
                                              "random_2x", "random_4x"]  # fmt: skip
    random = load_config(None, [*tiny_overrides, "compare.sizes=[2]", "compare.size_methods=[select, random]"])
    assert [v.name for v in variants(random)] == ["sel_2x"]  # select.method is random: one ranking
    assert size_count(0.5, 0.1, 290) == 14 and size_count(4, 8, 20) == 20 and size_count(0.01, 8, 20) == 1
    with pytest.raises(ConfigError, match="compare.sizes"):
        load_config(None, [*tiny_overrides, "compare.sizes=[1, 2]"])
    with pytest.raises(NacdError, match="needs the variant sel"):
        plan(load_config(None, [*tiny_overrides, "compare.sizes=[2]", "compare.variants=[full, sel_nacd]"]))


def test_plan_covers_models_variants_and_seeds(tiny_overrides, tiny_gemma_dir):
    cfg = load_config(None, [*tiny_overrides, f"compare.receivers=['{tiny_gemma_dir}']", "compare.seeds=[3, 4]"])
    cells = plan(cfg)
    assert len(cells) == (1 + 4 * 2) + (1 + 3 * 2)  # sel_soft: the distilling model only
    assert cells[0] == Cell(cfg.model.spec, "distilling", "baseline", None)
    assert {c.role for c in cells if c.model == str(tiny_gemma_dir)} == {"receiver"}
    assert cells[1].name == f"{model_name(cfg.model.spec)}/full/seed3"
    assert needed_stages(cfg) == ["select", "experts", "distill"]
    assert needed_stages(load_config(None, [*tiny_overrides, "compare.variants=[sel, sel_soft]"])) == [
        "select",
        "experts",
    ]
    init = load_config(
        None, [*tiny_overrides, "compare.variants=[sel, sel_init]", f"compare.receivers=['{tiny_gemma_dir}']"]
    )
    assert needed_stages(init) == ["select", "experts", "distill"]
    assert {(c.role, c.variant) for c in plan(init)} == {
        (r, v) for r in ("distilling", "receiver") for v in ("sel", "sel_init")
    }
    ft, _ = cell_configs(init, plan(init)[-1], RunDir(init.run.out_dir))
    assert ft.finetune.dataset == "distilled" and ft.finetune.prompts == "initial"
    drop = load_config(None, [*tiny_overrides, "compare.variants=[sel, sel_init, sel_nacd]",
                              f"compare.receivers=['{tiny_gemma_dir}']", "finetune.prompt_dropout=0.5"])  # fmt: skip
    dropped = {(c.role, c.variant): cell_configs(drop, c, RunDir(drop.run.out_dir))[0].finetune.prompt_dropout
               for c in plan(drop)}  # fmt: skip
    assert dropped == {("distilling", "sel"): 0.0, ("distilling", "sel_init"): 0.5, ("distilling", "sel_nacd"): 0.5,
                       ("receiver", "sel"): 0.0, ("receiver", "sel_init"): 0.5, ("receiver", "sel_nacd"): 0.5}  # fmt: skip
    cfg = load_config(None, [*tiny_overrides, "compare.variants=[baseline, full]"])
    assert needed_stages(cfg) == []
    with pytest.raises(NacdError, match="compare.variants"):
        load_config(None, [*tiny_overrides, "compare.variants=[full, nacd]"])


def test_nacd_run_end_to_end_on_tiny_models(tiny_overrides, tiny_gemma_dir, capsys):
    args = [
        *tiny_overrides,
        *RUN,
        f"compare.receivers=['{tiny_gemma_dir}']",
        "data.heldout=4",
        "eval.benchmarks=['builtin:demo/mc', heldout]",
        "compare.sizes=[0.5, 2]",
        "compare.size_models=distilling",
    ]
    assert cli.main(["run", *args]) == 0
    out = capsys.readouterr().out
    cfg = load_config(None, args)
    run_dir = RunDir(cfg.run.out_dir)
    root = run_dir.root
    assert (root / "config.yaml").is_file() and not list(root.glob("config.*.yaml"))  # saved once, not per cell
    assert json.loads((root / "select" / "manifest.json").read_text())["complete"]
    assert (run_dir.expert_run_dir(0) / "manifest.json").is_file()
    assert (root / "distill" / "prompts.safetensors").is_file()
    cells = plan(cfg)
    for cell in cells:
        if cell.variant != "baseline":
            manifest = json.loads((run_dir.finetune_dir(cell.name) / "manifest.json").read_text())
            assert manifest["complete"] and manifest["seed"] == cell.seed
            assert (run_dir.finetune_dir(cell.name) / "adapter" / "adapter_config.json").is_file()
            if cell.variant == "sel_nacd":
                assert manifest["prompt_mode"] == ("embeddings" if cell.role == "distilling" else "text")
        assert (run_dir.eval_dir(cell.name) / "samples.jsonl").is_file()
    costs = json.loads((root / "costs.json").read_text())
    assert {"select", "experts", "distill"} <= set(costs)
    bad = {k: v for k, v in costs.items() if not (v["status"] == "ran" and v["seconds"] > 0 and v["peak_rss_mb"] > 0)}
    assert not bad, bad
    assert len(costs) == 3 + len(cells) + sum(c.variant != "baseline" for c in cells)
    tag = model_name(cfg.model.spec)
    report = root / "report"
    for name in ("report.md", "report.html", "results.json", "distill_curves.png", "nearest_distances.png"):
        assert (report / name).is_file(), name
    html = (report / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html and 'src="distill' not in html
    md = (report / "report.md").read_text()
    for label in ("Baseline (no tuning)", "FULL", "SEL", "SEL+NACD", "paired bootstrap", "Cost of each stage"):
        assert label in md
    # the table holds the run's numbers: recompute one cell from samples.jsonl
    tag = model_name(cfg.model.spec)
    accs = []
    for seed in (0, 1):
        rows = read_jsonl(run_dir.eval_dir(f"{tag}/sel_nacd/seed{seed}") / "samples.jsonl")
        rows = [r for r in rows if r["benchmark"] == "demo_mc"]
        assert len(rows) == 12
        accs.append(100 * sum(r["acc"] for r in rows) / len(rows))
    summary = json.loads((report / "results.json").read_text())["summary"]
    entry = summary["table"][cfg.model.spec]["sel_nacd"]["demo_mc"]
    assert entry["mean"] == pytest.approx(sum(accs) / 2)
    assert entry["per_seed"] == {"0": pytest.approx(accs[0]), "1": pytest.approx(accs[1])}
    assert f"{sum(accs) / 2:.2f} ±" in md and f"{sum(accs) / 2:.2f} ±" in out
    assert "report:" in out and str(report / "report.md") in out
    assert "prompt gain on" in out and "prompt vectors left their initial token" in out
    assert set(summary["bootstrap"]) == {cfg.model.spec, str(tiny_gemma_dir)}
    # the held-out loss: a column in loss units, and the gap closed of every model x benchmark
    assert summary["loss_benchmarks"] == ["heldout"] and "heldout (loss)" in out
    losses = [read_jsonl(run_dir.eval_dir(f"{tag}/full/seed{seed}") / "samples.jsonl") for seed in (0, 1)]
    held = [[r["loss"] for r in rows if r["benchmark"] == "heldout"] for rows in losses]
    assert len(held[0]) == 4 and summary["table"][cfg.model.spec]["full"]["heldout"]["mean"] == pytest.approx(
        sum(map(sum, held)) / 8
    )
    gaps = summary["gap_closed"]
    assert set(gaps) == {cfg.model.spec, str(tiny_gemma_dir)} and set(gaps[cfg.model.spec]) == {"demo_mc", "heldout"}
    assert gaps[cfg.model.spec]["heldout"]["higher_is_better"] is False
    gap_row = next(line for line in out.splitlines() if line.startswith("| Gap closed by SEL+NACD |"))
    assert gap_row.count("|") == 2 + 4 and ("no gap to close" in gap_row or "%" in gap_row)
    # SEL at other sizes: prefixes of the selection's ranking, tuned on the distilling model only
    ranking = json.loads((run_dir.select_dir / "ranking.json").read_text())["ids"]
    selected = json.loads((run_dir.select_dir / "selection.json").read_text())["ids"]
    assert len(ranking) == 24 and ranking[:8] == selected
    for name, count in (("sel_0.5x", 4), ("sel_2x", 16)):
        body = json.loads((run_dir.select_dir / "sizes" / f"{name}.json").read_text())
        assert body["ids"] == ranking[:count] and body["count"] == count
        manifest = json.loads((run_dir.finetune_dir(f"{tag}/{name}/seed1") / "manifest.json").read_text())
        assert manifest["n_examples"] == count
    assert {c.variant for c in cells if c.role == "receiver"} == {"baseline", "full", "sel", "sel_nacd"}
    effective = summary["effective_size"][cfg.model.spec]["demo_mc"]
    means = summary["table"][cfg.model.spec]
    assert [p[0] for p in effective["curves"]["select"]] == [4, 8, 16, 24]
    assert [p[1] for p in effective["curves"]["select"]] == [
        means[v]["demo_mc"]["mean"] for v in ("sel_0.5x", "sel", "sel_2x", "full")
    ]
    assert "| SEL + expert soft labels |" in md
    soft = json.loads((run_dir.finetune_dir(f"{tag}/sel_soft/seed0") / "manifest.json").read_text())
    assert soft["soft_labels"]["run"] == 0 and soft["ids"] == selected
    assert "| SEL 0.5x |" in md and "| SEL 2x |" in md and "| Effective data size of SEL+NACD |" in out
    status = gaps[cfg.model.spec]["demo_mc"]["status"]  # no curve to read where FULL does not beat SEL
    assert (effective["where"] in ("no_gap", "full_worse")) == (status in ("no_gap", "full_worse"))
    line = "effective data size: 8 distilled examples tune" if status == "ok" else "effective data size on demo_mc"
    assert line in out and (report / "effective_size.png").is_file()

    # a rerun does no work: every stage's outputs are complete and the recorded costs are kept
    stamps = {p: p.stat().st_mtime for p in root.rglob("manifest.json")}
    assert cli.main(["run", *args]) == 0
    assert {p: p.stat().st_mtime for p in root.rglob("manifest.json")} == stamps
    again = json.loads((root / "costs.json").read_text())
    assert all(again[k]["seconds"] == costs[k]["seconds"] and again[k].get("reused") for k in costs)
    assert summarize(cfg, run_dir, cells)["table"] == summary["table"]

    # nacd report rebuilds the report from the folder as it is: a cell not done shows as "-"
    import shutil

    shutil.rmtree(run_dir.eval_dir(f"{model_name(str(tiny_gemma_dir))}/baseline"))
    capsys.readouterr()
    assert cli.main(["report", *args]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| Baseline (no tuning) |"))
    assert row.endswith("| - | - |") and not row.endswith(
        "| - | - | - |"
    )  # the distilling model's cells are still there
    assert (
        json.loads((report / "results.json").read_text())["summary"]["table"][str(tiny_gemma_dir)].get("baseline")
        is None
    )


def test_cost_book_records_a_positive_time_for_a_stage_of_microseconds(tmp_path):
    # CI once saw a 'random' selection of 24 examples finish in under 5 ms, which rounded to 0.00 s
    book = CostBook(tmp_path / "costs.json", "cpu")
    with book.measure("fast", tmp_path / "stage"):
        (tmp_path / "stage").mkdir()
        (tmp_path / "stage" / "manifest.json").write_text("{}")
    entry = json.loads((tmp_path / "costs.json").read_text())["fast"]
    assert entry["status"] == "ran" and 0 < entry["seconds"] < 1 and entry["peak_rss_mb"] > 0
    with book.measure("fast", tmp_path / "stage"):
        pass
    assert json.loads((tmp_path / "costs.json").read_text())["fast"]["reused"] is True


def test_nacd_run_under_torchrun_gives_the_one_process_table(tiny_overrides, tmp_path):
    """Issue #13: every stage runs on every process (DDP tunings, distill's meta-batch and eval's batches
    split), each artifact is written once, and the table is the one-process table."""
    from conftest import multiprocess_overrides, torchrun_nacd

    common = [a for a in tiny_overrides if not a.startswith("run.out_dir=")]
    common += [*RUN, "compare.receivers=[]", "compare.seeds=[0]", "distill.meta_batch=2", *multiprocess_overrides()]
    assert cli.main(["run", *common, f"run.out_dir={tmp_path / 'one'}"]) == 0
    proc = torchrun_nacd("run", [*common, f"run.out_dir={tmp_path / 'two'}"], 29551, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report:") == 1  # printed once, by the main process
    one = json.loads((tmp_path / "one" / "report" / "results.json").read_text())["summary"]["table"]
    two = json.loads((tmp_path / "two" / "report" / "results.json").read_text())["summary"]["table"]
    assert two == one
    assert json.loads((tmp_path / "two" / "distill" / "manifest.json").read_text())["processes"]["count"] == 2
    assert not list((tmp_path / "two").glob("config.*.yaml"))
