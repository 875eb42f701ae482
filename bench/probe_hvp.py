"""What one reverse-walk step of the exact unroll costs, two ways, against one plain student step.

flat's reverse walk needs, per student step n, H_n u and the mixed product d<g_n, u>/dp (u: the
adjoint of theta_n). Two exact ways to get both:

- ``reverse-over-reverse`` (what ``flat`` does): rebuild the step's loss and its LoRA gradient with a
  graph (``create_graph=True``), then one double backward of <g, u> to theta and the prompts;
- ``forward-over-reverse``: ``torch.func.jvp`` of the gradient (``torch.func.grad`` w.r.t. theta and
  the prompts) along (u, 0): the tangent of grad_theta is H u, that of grad_p the mixed product.

The probe checks the two agree, then times each (median of ``--repeats`` after a warm-up) with the
model's attention as ``--attn`` sets it (eager or sdpa: only the math backend has a double backward
and forward-mode derivatives of attention's backward).

    PYTHONPATH=src .venv/bin/python bench/probe_hvp.py --model smollm2-135m --batch-size 2 --max-seq-len 64
"""

from __future__ import annotations

import argparse
import json
import statistics

from bench_unroll import SHAPES, build, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    args.n_steps = 1

    import torch
    from torch.func import grad, jvp

    from nacd.models import double_backward_attention
    from nacd.unrolls import _double_backward, _graph_step

    student, theta0, _, syn0, batches, device = build(args)
    student.model.eval()  # no dropout (OPT's shapes build in train mode): both products see one function
    idx = batches[0]
    g = torch.Generator().manual_seed(2)
    u = [1e-2 * torch.randn(t.shape, generator=g).to(t.device, t.dtype) for t in theta0]
    text = student.text_batch(idx.tolist())
    p0 = syn0[idx]
    student.step_loss(theta0, p0, text)  # the one-time sparse-logits check, outside any timing

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def plain() -> list:
        th = [t.detach().clone().requires_grad_(True) for t in theta0]
        return list(torch.autograd.grad(student.step_loss(th, p0, text), th))

    def rev_rev() -> list:
        th, p, _, gr = _graph_step(student, theta0, syn0, idx)
        return _double_backward(th, p, gr, u)

    def loss_of(theta: tuple, p: torch.Tensor) -> torch.Tensor:  # the student's own loss, as a function
        return student.step_loss(list(theta), p, text)

    def fwd_rev() -> list:
        with double_backward_attention():
            _, tangents = jvp(
                grad(loss_of, argnums=(0, 1)),
                (tuple(t.detach() for t in theta0), p0.detach()),
                (tuple(u), torch.zeros_like(p0)),
            )
        return [*tangents[0], tangents[1]]

    a, b = rev_rev(), fwd_rev()
    num = sum(float(((x - y).double() ** 2).sum()) for x, y in zip(a, b, strict=True)) ** 0.5
    den = sum(float((x.double() ** 2).sum()) for x in a) ** 0.5
    row = {"attn": args.attn, "relative_difference": num / den}
    for name, fn in (("plain", plain), ("reverse_over_reverse", rev_rev), ("forward_over_reverse", fwd_rev)):
        fn()  # warm-up
        sync()
        row[name] = statistics.median(timed(fn, args.repeats, sync))
    print(json.dumps(row))
    print(
        f"one step ({args.attn}): plain {row['plain']:.3f} s; reverse-over-reverse {row['reverse_over_reverse']:.3f} s "
        f"({row['reverse_over_reverse'] / row['plain']:.2f}x); forward-over-reverse {row['forward_over_reverse']:.3f} s "
        f"({row['forward_over_reverse'] / row['plain']:.2f}x); products differ by {row['relative_difference']:.1e}"
    )


if __name__ == "__main__":
    main()
