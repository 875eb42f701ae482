"""Throughput of LESS feature extraction: batched per-example gradients vs a per-example backward loop.

Same model, LoRA, examples, Adam moments and projection for every row: each computes the
Adam-preconditioned per-example LoRA gradients of ``--examples`` examples, projects them together
to ``--proj-dim`` dimensions (``--projection``: the sparse JL transform by default, as
``nacd.less`` uses; one pass of each projection kind is also timed) and normalizes them, as one
feature shard of ``nacd.less`` does. Rows:

* ``batched``: :func:`nacd.less_grads.batched_grads`, ``--grad-batch-size`` examples per forward and
  backward, logits only at loss positions (what ``less_scores`` runs);
* ``batched, full logits``: the same with the full output head, to separate the two effects;
* ``loop``: one forward and one backward per example (full logits), as the LESS code does.

The rows run alternately ``--repeats`` times in one process; the table gives the median.

    .venv/bin/python bench/bench_less.py --model smollm2-135m --examples 32 --max-seq-len 128 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def load_data(args: argparse.Namespace, tokenizer) -> list:
    from nacd.chat import tokenize_corpus
    from nacd.config import load_config
    from nacd.data import load_corpus

    per_source = args.examples // 4 + 1
    cfg = load_config(
        None,
        [f"data.root={args.data_root}", f"data.max_seq_len={args.max_seq_len}"]
        + [f"data.sources.{i}.max_examples={per_source}" for i in range(4)],
    )
    examples, _ = load_corpus(cfg.data)
    return tokenize_corpus(examples, tokenizer, cfg.data)[: args.examples]


def setup(args: argparse.Namespace):
    """The model with a LoRA whose B is not zero (so that every gradient is), and synthetic Adam moments."""
    from nacd.config import LoraConfig, ModelConfig
    from nacd.less_math import AdamMoments
    from nacd.lora import add_lora, init_lora, lora_parameters
    from nacd.models import load_model

    model, tokenizer = load_model(ModelConfig(spec=args.model, attn_implementation="sdpa"), torch.device("cpu"))
    model = add_lora(model, LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    init_lora(model, 0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if "lora_B" in name:
                p.copy_(1e-3 * torch.randn(p.shape, generator=gen))
    model.eval()
    n = sum(p.numel() for p in lora_parameters(model).values())
    m = 1e-4 * torch.randn(n, generator=gen)
    moments = AdamMoments(m, m.square() + 1e-9 * torch.rand(n, generator=gen), step=10)
    return model, tokenizer, moments, n


def main() -> None:
    from nacd.chat import collate
    from nacd.less_grads import shard_features
    from nacd.less_math import make_projection
    from nacd.train import SparseLogitsForward, default_forward

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--proj-dim", type=int, default=8192)
    parser.add_argument("--projection", choices=("sparse", "gaussian"), default="sparse")
    parser.add_argument("--grad-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_less")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    model, tokenizer, moments, n_params = setup(args)
    data = load_data(args, tokenizer)
    tokens = sum(len(ex.input_ids) for ex in data)

    def coll(batch):
        return collate(batch, tokenizer.pad_token_id)

    projection = make_projection(args.projection, n_params, args.proj_dim, seed=0)
    sparse = SparseLogitsForward()
    rows = {
        "batched": {"forward": sparse, "loop": False},
        "batched, full logits": {"forward": default_forward, "loop": False},
        "loop": {"forward": default_forward, "loop": True},
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    features: dict[str, torch.Tensor] = {}
    pass_seconds = {}
    for kind in ("sparse", "gaussian"):  # one projection pass of the shard's gradients, each kind
        start = time.perf_counter()
        make_projection(kind, n_params, args.proj_dim, seed=0)(torch.randn(len(data), n_params))
        pass_seconds[kind] = time.perf_counter() - start
    for r in range(args.repeats):
        for name, kw in rows.items():
            if kw["forward"] is sparse:  # swaps the head for an identity until removed
                assert sparse.install(model, coll(data[:2])), "the sparse-logits forward is exact on this model"
            start = time.perf_counter()
            features[name] = shard_features(
                model, data, coll, projection, adam=moments, grad_batch_size=args.grad_batch_size, **kw
            )
            seconds = time.perf_counter() - start
            sparse.remove()
            times[name].append(seconds)
            print(f"repeat {r + 1} {name:22s} {seconds:7.2f} s  {len(data) / seconds:6.2f} ex/s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = {k: float((features[k] - features["loop"]).abs().max()) for k in rows if k != "loop"}

    print(
        f"\n{len(data)} examples ({tokens} tokens, max_seq_len {args.max_seq_len}), {n_params:,} LoRA parameters "
        f"-> {args.proj_dim} dims, grad batch {args.grad_batch_size}, {torch.get_num_threads()} threads; "
        f"{args.projection} projection; one projection pass of the {len(data)} gradients (in every row): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in pass_seconds.items())
        + "\n"
    )
    print("| method | seconds (each repeat) | median examples/s | vs loop |")
    print("| --- | --- | --: | --: |")
    for name in rows:
        secs = ", ".join(f"{s:.1f}" for s in times[name])
        print(f"| {name} | {secs} | {len(data) / med[name]:.2f} | {med['loop'] / med[name]:.2f}x |")
    print(f"\nratio batched / loop: {med['loop'] / med['batched']:.2f}x; max |feature difference| vs loop: {diff}")
    result = {
        "model": args.model,
        "examples": len(data),
        "tokens": tokens,
        "max_seq_len": args.max_seq_len,
        "lora_parameters": n_params,
        "proj_dim": args.proj_dim,
        "grad_batch_size": args.grad_batch_size,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "projection": args.projection,
        "projection_pass_seconds": pass_seconds,
        "seconds": times,
        "median_examples_per_s": {k: len(data) / v for k, v in med.items()},
        "speedup_batched_over_loop": med["loop"] / med["batched"],
        "max_feature_difference_vs_loop": diff,
    }
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
