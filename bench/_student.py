"""Shared by the distillation probes: the student of a run folder's selection, as ``nacd distill`` builds it."""

from __future__ import annotations

from typing import Any


def load_student(config: str, run_dir: str, overrides: list[str]) -> tuple[Any, Any, Any, Any]:
    """(config, expert store, student, device) for the run folder's D_sel: the model with LoRA in train
    mode (LoRA dropout, if any, as ``nacd distill`` runs it) and the text-token candidate rows."""
    import torch

    import nacd.tm as tm
    from nacd.artifacts import RunDir
    from nacd.chat import tokenize_corpus
    from nacd.config import load_config
    from nacd.data import load_corpus
    from nacd.distill import selected_ids
    from nacd.experts import ExpertStore
    from nacd.lora import add_lora
    from nacd.models import load_model, resolve_device
    from nacd.select import select_examples
    from nacd.student import Student

    cfg = load_config(config, [*overrides, f"run.out_dir={run_dir}"])
    rd = RunDir(cfg.run.out_dir)
    ids, ids_path = selected_ids(cfg, rd)
    device = resolve_device(cfg.run.device)
    model, tok = load_model(cfg.model, device, needs_double_backward=True)
    data = tokenize_corpus(select_examples(load_corpus(cfg.data)[0], ids, str(ids_path)), tok, cfg.data)
    model = add_lora(model, cfg.lora)
    model.train()
    student = Student(model, data, tok.pad_token_id, prompt_offset=cfg.distill.prompt_offset)
    student.vocab_ids = torch.tensor(tm.text_token_ids(tok, student.vocab.shape[0]))
    return cfg, ExpertStore(rd.experts_dir), student, device
