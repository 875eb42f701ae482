"""Time and peak memory of one distillation outer step, per unroll mode, against N plain LoRA steps.

For each N and each mode a fresh worker process loads the model, builds the
same batches, runs one warm-up and ``--repeats`` timed outer steps
(unroll + matching loss + backward to D_syn and alpha), and reports the median
time and the peak resident memory of the timed part (Linux VmHWM, reset after
the warm-up through /proc/self/clear_refs). ``plain`` is N ordinary LoRA
training steps (forward, first-order backward, SGD update) on the same
batches: the reference of the targets "flat <= 2.0x the time of N plain steps"
and "flat peak memory <= 1.5x one plain step, flat in N".

    .venv/bin/python bench/bench_unroll.py --model smollm2-135m --steps 2 4 8 16 --batch-size 2 --max-seq-len 64

``--attns eager sdpa`` runs every mode with each attention (``model.attn_implementation``): with sdpa the
forward student steps and ``plain`` use the fast kernel and only the graphs differentiated twice run on
SDPA's math backend (:func:`nacd.models.double_backward_attention`); the ratios are against ``plain`` on
the first fast attention listed (sdpa), else on the same attention.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("plain", "flat", "naive", "fd")
#: Model shapes built with random weights (``--shape``), for the paper's scale without a download.
SHAPES = {
    "opt-1.3b": {
        "model_type": "opt",
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "ffn_dim": 8192,
        "num_attention_heads": 32,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": 2048,
        "pad_token_id": 1,
    },
    "opt-tiny": {  # the same architecture in miniature, to try the flag on a CPU in seconds
        "model_type": "opt",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "ffn_dim": 128,
        "num_attention_heads": 4,
        "vocab_size": 512,
        "max_position_embeddings": 256,
        "word_embed_proj_dim": 64,
        "pad_token_id": 1,
    },
}


def _vm(field: str) -> float:
    """A /proc/self/status field in MB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def timed(fn, repeats: int, sync) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn``, each ended by ``sync`` (a CUDA synchronize, or nothing)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def build(args: argparse.Namespace) -> tuple:
    """``(student, theta0, target, syn0, batches, device)`` of the benchmark: the model (or a random-weight
    shape) with LoRA r=8 on q/v, ``n_steps`` batches of full-length examples, prompts at the mean embedding."""
    import torch

    from nacd.chat import tokenize_corpus
    from nacd.config import LoraConfig, ModelConfig, load_config
    from nacd.data import load_corpus
    from nacd.lora import add_lora, init_lora, lora_parameters
    from nacd.models import load_model
    from nacd.student import Student

    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.shape:  # a paper-scale shape with random weights (speed does not depend on the values): no download
        from transformers import AutoConfig, AutoModelForCausalLM

        from nacd.chat import TokenizedExample

        mc = AutoConfig.for_model(**SHAPES[args.shape])
        dtype = getattr(torch, args.dtype)
        with device:  # random weights drawn where they are used, not on the CPU first (slow at 1.3B)
            model = AutoModelForCausalLM.from_config(mc, attn_implementation=args.attn, dtype=dtype)
        pad_id = mc.pad_token_id if mc.pad_token_id is not None else 0
        gen = torch.Generator().manual_seed(0)
        data = []
        for i in range(args.batch_size * args.n_steps):
            ids = torch.randint(3, mc.vocab_size, (args.max_seq_len,), generator=gen).tolist()
            half = args.max_seq_len // 2
            data.append(TokenizedExample(f"x/{i}", "x", ids, [-100] * half + ids[half:], False))
    else:
        mcfg = ModelConfig(spec=args.model, attn_implementation=args.attn, dtype=args.dtype)
        model, tok = load_model(mcfg, device, needs_double_backward=True)
        cfg = load_config(None, [f"data.root={args.data_root}", f"data.max_seq_len={args.max_seq_len}"])
        examples, _ = load_corpus(cfg.data)
        data = [ex for ex in tokenize_corpus(examples, tok, cfg.data) if len(ex.input_ids) == args.max_seq_len]
        data = data[: args.batch_size * args.n_steps]  # full-length examples: every batch costs the same
        pad_id = tok.pad_token_id
    model = add_lora(model, LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    init_lora(model, 0)
    student = Student(model, data, pad_id)
    g = torch.Generator().manual_seed(1)
    theta0 = [
        p.detach() + 0.01 * torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        for p in lora_parameters(model).values()
    ]
    target = [t + 0.01 * torch.randn(t.shape, generator=g).to(t.device, t.dtype) for t in theta0]
    d = student.vocab.shape[1]
    syn0 = student.vocab.detach().mean(0).expand(len(data), args.k, d).clone()
    batches = [torch.arange(i * args.batch_size, (i + 1) * args.batch_size, device=device) for i in range(args.n_steps)]
    return student, theta0, target, syn0, batches, device


def worker(args: argparse.Namespace) -> dict:
    import torch

    from nacd.tm import matching_loss
    from nacd.unrolls import unroll

    student, theta0, target, syn0, batches, device = build(args)
    alpha = 1.0

    def plain_steps() -> None:
        theta = [t.clone() for t in theta0]
        for idx in batches:
            th = [t.requires_grad_(True) for t in theta]
            loss = student.step_loss(th, syn0[idx], student.text_batch(idx.tolist()))
            grads = torch.autograd.grad(loss, th)
            theta = [t.detach() - alpha * gr for t, gr in zip(th, grads, strict=True)]

    def outer_step() -> None:
        syn = syn0.clone().requires_grad_(True)
        log_alpha = torch.tensor(0.0, device=device, requires_grad=True)
        theta_n = unroll(args.mode, student, theta0, log_alpha.exp(), syn, batches)
        matching_loss(theta_n, target, theta0).backward()
        assert syn.grad is not None and torch.isfinite(syn.grad).all()

    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    fn = plain_steps if args.mode == "plain" else outer_step
    fn()  # warm-up (also the one-time exactness check of the sparse-logits head)
    sync()
    rss_loaded = torch.cuda.memory_allocated(device) / 2**20 if cuda else _vm("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak()
    times = timed(fn, args.repeats, sync)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _vm("VmHWM")
    return {
        "mode": args.mode,
        "attn": args.attn,
        "N": args.n_steps,
        "seconds": times,
        "median_s": statistics.median(times),
        "peak_rss_mb": peak,  # GPU: peak allocated memory
        "rss_before_mb": rss_loaded,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--attns", nargs="+", default=["sdpa"], choices=["eager", "sdpa"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda; on cuda, memory is the peak allocated")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead of --model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="runs/bench_unroll")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="flat", help=argparse.SUPPRESS)
    parser.add_argument("--n-steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.steps:
        for attn in args.attns:
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--n-steps", str(n), "--attn", attn]
                for key in ("model", "data_root", "batch_size", "max_seq_len", "k", "repeats", "device", "dtype"):
                    cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
                if args.shape:
                    cmd += ["--shape", args.shape]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
                if proc.returncode != 0:
                    row = {"mode": mode, "attn": attn, "N": n, "error": proc.stderr.strip().splitlines()[-1][:200]}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    by = {(r["mode"], r["attn"], r["N"]): r for r in rows if "error" not in r}
    fast = "sdpa" if "sdpa" in args.attns else None
    print(f"\n{'N':>3} {'attn':>6} {'mode':>6} {'time s':>8} {'x plain':>8} {'peak MB':>8} {'x plain':>8}")
    for n in args.steps:
        for attn in args.attns:
            plain = by.get(("plain", fast or attn, n))
            for mode in args.modes:
                r = by.get((mode, attn, n))
                if r is None:
                    print(f"{n:>3} {attn:>6} {mode:>6} {'failed':>8}")
                    continue
                tx = r["median_s"] / plain["median_s"] if plain else float("nan")
                mx = r["peak_rss_mb"] / plain["peak_rss_mb"] if plain else float("nan")
                print(f"{n:>3} {attn:>6} {mode:>6} {r['median_s']:8.2f} {tx:8.2f} {r['peak_rss_mb']:8.0f} {mx:8.2f}")
    meta = {
        "model": args.shape or args.model,
        "device": args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "max_seq_len": args.max_seq_len,
        "k": args.k,
        "repeats": args.repeats,
        "attns": args.attns,
        "machine": platform.machine(),
        "rows": rows,
    }
    (Path(args.out) / "result.json").write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
