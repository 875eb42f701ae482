"""Can the prompt vectors lower L_distill on one fixed sample? A sanity probe of the distillation.

Fixes everything a distillation iteration draws at random (the expert run, the start epoch, the N
student batches) and takes ``--iterations`` Adam steps on the prompt vectors alone (beta = 0,
alpha fixed at the experts' lr, the student clipped as in ``nacd distill``). On a smooth objective
L_distill on that one sample falls step after step; the probe prints L_distill, the norm of its
gradient w.r.t. the prompts and the mean prompt norm per step, as JSON lines.

The placement is the config's: ``distill.prompt_offset=1`` (an override) puts the prompt after the
first text token (``<|im_start|>`` or BOS, the position most models use as an attention sink).

Needs a run folder with ``select/`` and ``experts/`` (``nacd run configs/demo.yaml`` makes one)::

    .venv/bin/python bench/probe_prompt_landscape.py -c configs/demo.yaml --run-dir runs/demo \\
        --lr-syn 1e-3 --iterations 10 distill.prompt_offset=1
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--run-dir", required=True, help="a run folder with select/ and experts/")
    ap.add_argument("--lr-syn", type=float, default=1e-3)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--start-epoch", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. distill.lr_init=0.1)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the fixed student batches")
    ap.add_argument(
        "--steps-along-gradient",
        type=float,
        nargs="*",
        default=[],
        help="before the Adam steps: central differences of L_distill along -grad/|grad| at these step norms, "
        "against the directional derivative the unroll's gradient predicts (how far the loss is linear)",
    )
    args = ap.parse_args()

    import torch
    from _student import load_student

    import nacd.tm as tm
    from nacd.tm import TOKEN_INITS, candidate_rows, instruction_rows
    from nacd.unrolls import unroll

    cfg, store, student, device = load_student(args.config, args.run_dir, args.overrides)
    data = student.data
    vocab = candidate_rows(student)
    dc = cfg.distill
    n = len(data)
    rows = instruction_rows(data, student.vocab_ids) if dc.init in TOKEN_INITS else None
    init = tm.initial_prompts(dc.init, vocab, n, dc.num_prompt_tokens, cfg.run.seed, rows)
    syn = torch.nn.Parameter(init.to(device))
    opt = torch.optim.Adam([syn], lr=args.lr_syn)
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randperm(n, generator=gen)[: min(dc.batch_size, n)].to(device) for _ in range(dc.syn_steps)]
    run = store.runs[0]
    train = store.manifest(run)["train"]

    def snapshot(epoch):
        snap = store.snapshot(run, epoch, device=device)
        return [snap[name].to(dtype) for name, dtype in zip(student.names, student.dtypes, strict=True)]

    theta0, target = snapshot(args.start_epoch), snapshot(args.start_epoch + dc.expert_epochs)
    alpha = torch.tensor(float(dc.lr_init or train["lr"]), device=device)
    clip = train.get("max_grad_norm") if dc.student_clip else None
    print(json.dumps({"machine": platform.processor() or platform.machine(), **vars(args), "examples": n}))

    def matching(prompts):
        """L_distill on the fixed draw, differentiable in ``prompts``."""
        return tm.matching_loss(
            unroll(dc.unroll, student, theta0, alpha, prompts, batches, dc.fd_eps, clip), target, theta0
        )

    def l_distill(prompts):
        with torch.no_grad():
            return float(matching(prompts))

    if args.steps_along_gradient:
        x = syn.detach().clone().requires_grad_(True)
        matching(x).backward()
        direction = -x.grad / x.grad.norm()
        predicted = -float(x.grad.norm())
        for h in args.steps_along_gradient:
            plus, minus = l_distill(syn.detach() + h * direction), l_distill(syn.detach() - h * direction)
            fd = (plus - minus) / (2 * h)
            print(
                json.dumps(
                    {
                        "step_norm": h,
                        "central_difference": round(fd, 4),
                        "predicted": round(predicted, 4),
                        "l_distill_after_step": round(plus, 5),
                    }
                ),
                flush=True,
            )
    for i in range(args.iterations):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = matching(syn)
        loss.backward()
        grad_norm = float(syn.grad.norm())
        opt.step()
        row = {
            "step": i,
            "l_distill": round(float(loss.detach()), 5),
            "grad_norm": float(f"{grad_norm:.4g}"),
            "prompt_norm": round(float(syn.detach().norm(dim=-1).mean()), 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(row), flush=True)
    student.close()


if __name__ == "__main__":
    main()
