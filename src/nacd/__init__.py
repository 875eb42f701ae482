"""nacd: text data distillation for LLM instruction tuning (NACD, Yao et al. 2025).

Importing the package does no work: every stage lives in its own module
(``nacd.select``, ``nacd.experts``, ``nacd.distill``, ``nacd.finetune``,
``nacd.evaluate``) with a ``run(config, run_dir)`` entry point.
"""

__version__ = "0.1.0"
