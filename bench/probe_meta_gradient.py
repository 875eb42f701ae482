"""Do the meta-gradients of different draws agree? The variance probe of the distillation.

Computes the prompt meta-gradient dL_distill/dD_syn (beta = 0, alpha fixed at alpha_0, prompts at
their initialisation) for ``--draws`` training draws (training's run(s)) and as many held-out draws
(the panel's run, as ``nacd distill`` splits them), one exact unroll each, then prints:

- ``train_pairwise``: the mean cosine between the gradients of two different training draws, over
  the prompt rows both touched (0: each draw asks for something else; prompts cannot learn);
- ``train_mean_vs_heldout``: the cosine between the mean training gradient and the mean held-out
  gradient over the rows both touched (> 0: a small step along the training gradient lowers the
  held-out loss: what the prompt gain measures, to first order);
- ``heldout_pairwise``: the same as the first, among held-out draws.

    .venv/bin/python bench/probe_meta_gradient.py -c configs/demo.yaml --run-dir runs/demo --draws 8 \\
        distill.lr_init=0.1
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--run-dir", required=True, help="a run folder with select/ and experts/")
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. distill.lr_init=0.1)")
    args = ap.parse_args()

    import torch
    from _student import load_student

    import nacd.tm as tm
    from nacd.panel import sample_draw, split_runs
    from nacd.tm import TOKEN_INITS, candidate_rows, instruction_rows
    from nacd.unrolls import unroll

    cfg, store, student, device = load_student(args.config, args.run_dir, args.overrides)
    data = student.data
    dc = cfg.distill
    n = len(data)
    rows = instruction_rows(data, student.vocab_ids) if dc.init in TOKEN_INITS else None
    syn0 = tm.initial_prompts(dc.init, candidate_rows(student), n, dc.num_prompt_tokens, cfg.run.seed, rows)
    train = store.manifest(store.runs[0])["train"]
    alpha = torch.tensor(float(dc.lr_init or train["lr"]), device=device)
    clip = train.get("max_grad_norm") if dc.student_clip else None
    train_runs, held_runs = split_runs(store.runs, dc.holdout_run)
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "date": time.strftime("%Y-%m-%d"),
                "overrides": args.overrides,
                "alpha": float(alpha),
                "train_runs": train_runs,
                "held_runs": held_runs,
                "examples": n,
            }
        ),
        flush=True,
    )

    def snapshot(run, epoch):
        snap = store.snapshot(run, epoch, device=device)
        return [snap[name].to(dtype) for name, dtype in zip(student.names, student.dtypes, strict=True)]

    def gradient(draw):
        syn = syn0.clone().to(device).requires_grad_(True)
        theta_t = snapshot(draw.run, draw.start_epoch)
        target = snapshot(draw.run, draw.start_epoch + dc.expert_epochs)
        batches = [b.to(device) for b in draw.batches]
        loss = tm.matching_loss(
            unroll(dc.unroll, student, theta_t, alpha, syn, batches, dc.fd_eps, clip), target, theta_t
        )
        loss.backward()
        touched = torch.zeros(n, dtype=torch.bool)
        touched[torch.cat(draw.batches)] = True
        return syn.grad.detach().cpu(), touched, float(loss)

    def cos(a, ta, b, tb):
        both = ta & tb
        if not both.any():
            return None
        x, y = a[both].flatten().double(), b[both].flatten().double()
        return float(x @ y / (x.norm() * y.norm() + 1e-30))

    gen = torch.Generator().manual_seed(cfg.run.seed + 7)
    batch = min(dc.batch_size, n)
    sets = {}
    for name, runs in (("train", train_runs), ("heldout", held_runs)):
        sets[name] = [
            gradient(sample_draw(gen, runs, dc.max_start_epoch, n, batch, dc.syn_steps)) for _ in range(args.draws)
        ]

    def pairwise(items):
        cs = [cos(a, ta, b, tb) for (a, ta, _), (b, tb, _) in itertools.combinations(items, 2)]
        cs = [c for c in cs if c is not None]
        return sum(cs) / len(cs) if cs else None, len(cs)

    def mean_grad(items):
        g = sum(a for a, _, _ in items) / len(items)
        touched = torch.stack([t for _, t, _ in items]).any(0)
        return g, touched

    (gt, tt), (gh, th) = mean_grad(sets["train"]), mean_grad(sets["heldout"])
    out = {
        "train_pairwise": pairwise(sets["train"]),
        "heldout_pairwise": pairwise(sets["heldout"]),
        "train_mean_vs_heldout": cos(gt, tt, gh, th),
        "l_distill_train": [round(x, 4) for _, _, x in sets["train"]],
        "l_distill_heldout": [round(x, 4) for _, _, x in sets["heldout"]],
        "grad_norms": [round(float(a.norm()), 3) for a, _, _ in sets["train"] + sets["heldout"]],
    }
    print(json.dumps(out), flush=True)
    student.close()


if __name__ == "__main__":
    main()
