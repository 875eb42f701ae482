"""Throughput of nacd's LoRA training loop against Hugging Face ``Trainer`` + peft.

Same model, same tokenized examples (one epoch over them), same batch, LoRA
config, optimizer (AdamW), lr schedule, clipping and attention kernel; the two
are run alternately ``--repeats`` times in one process and the median is
reported. Tokens/s counts the non-padding input tokens of the epoch, which are
the same for both.

    .venv/bin/python bench/bench_train.py --model smollm2-135m --steps 24 --batch-size 4 --max-seq-len 128
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

    n = args.steps * args.batch_size
    per_source = n // 4 + 1
    cfg = load_config(
        None,
        [f"data.root={args.data_root}", f"data.max_seq_len={args.max_seq_len}"]
        + [f"data.sources.{i}.max_examples={per_source}" for i in range(4)],
    )
    examples, _ = load_corpus(cfg.data)
    return tokenize_corpus(examples, tokenizer, cfg.data)[:n]


def fresh_model(args: argparse.Namespace):
    from nacd.config import LoraConfig, ModelConfig
    from nacd.lora import add_lora, init_lora
    from nacd.models import load_model

    model, tokenizer = load_model(ModelConfig(spec=args.model, attn_implementation="sdpa"), torch.device("cpu"))
    model = add_lora(model, LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    init_lora(model, 0)
    return model, tokenizer


def run_nacd(args, data) -> float:
    from nacd.chat import collate
    from nacd.config import TrainConfig
    from nacd.train import TrainLoop

    model, tok = fresh_model(args)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, optimizer="adamw", lr=2e-4, warmup_ratio=0.0)
    loop = TrainLoop(model=model, dataset=data, cfg=cfg, collate=lambda b: collate(b, tok.pad_token_id), progress=False)
    start = time.perf_counter()
    loop.run()
    return time.perf_counter() - start


def run_trainer(args, data) -> float:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tok = fresh_model(args)
    ds = Dataset.from_list([{"input_ids": ex.input_ids, "labels": ex.labels} for ex in data])
    targs = TrainingArguments(
        output_dir=str(Path(args.out) / "trainer_tmp"),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=2e-4,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/bench_train")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    _, tok = fresh_model(args)
    data = load_data(args, tok)
    tokens = sum(len(ex.input_ids) for ex in data)
    times: dict[str, list[float]] = {"nacd": [], "trainer": []}
    for r in range(args.repeats):
        for name, fn in (("nacd", run_nacd), ("trainer", run_trainer)):
            seconds = fn(args, data)
            times[name].append(seconds)
            print(f"repeat {r + 1} {name:8s} {seconds:7.2f} s  {tokens / seconds:8.1f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_seq_len": args.max_seq_len,
        "examples": len(data),
        "tokens": tokens,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "seconds": times,
        "median_tokens_per_s": {k: tokens / v for k, v in med.items()},
        "speedup_nacd_over_trainer": med["trainer"] / med["nacd"],
    }
    print(json.dumps(result, indent=2))
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
