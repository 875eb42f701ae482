"""Step 4 of NACD: multiple-choice evaluation (ARC-Easy, ARC-Challenge, MMLU, any JSONL).

A benchmark is data, as in lm-evaluation-harness: a loader gives :class:`Doc` records (question,
choices, gold index, subject), and a protocol turns a doc into a context string and one
continuation per choice:

``text`` (zero-shot by default; the paper's protocol, lm-eval's ``arc_easy``)
    context ``"Question: {question}\\nAnswer:"``, continuations ``" {choice text}"``.
    ``acc`` takes the choice with the largest summed log-prob, ``acc_norm`` the largest
    log-prob per character of the choice text.
``letter`` (5-shot by default for MMLU; Hendrycks' and lm-eval's ``mmlu``)
    ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``, then
    each shot ``"{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n\\n"`` from the dev split,
    then the question ending ``"Answer:"``; continuations ``" A"``, ``" B"``, ...

Scoring reproduces lm-eval's ``HFLM.loglikelihood`` token for token (:func:`encode_pair`: the
context's trailing spaces move to the continuation, context + continuation are encoded together
and split, the tokenizer's own BOS handling), but runs each question's context once: the context
and all its choices are packed into one row with an attention mask that lets each choice see the
context and itself (:func:`score_loglikelihood`), several questions per forward pass, and the
vocabulary projection runs only at the positions that are scored.

Output, ``<run>/eval/<name>/``::

    results.json     per benchmark: n, acc, acc_norm, standard errors; per subject; macro average
    samples.jsonl    one line per question: gold, predictions, log-prob and tokens of each choice
    manifest.json    kind "eval": model, adapter, benchmarks, protocol, few-shot, split, limit

The package follows these steps, each module importing only the ones before it:

``benchmarks``
    :class:`Doc`, :class:`Benchmark`, the built-ins and :func:`load_benchmark` (benchmarks as data).
``prompts``
    contexts and continuations of a doc; lm-eval's tokenization (:func:`encode_pair`).
``scoring``
    :func:`score_loglikelihood`, packed and plain.
``heldout``
    the held-out instruction loss (``heldout``, ``heldout:<source>``): examples of D_full's sources that
    ``data.heldout`` keeps out of it, scored by their response loss; and the questions among them, scored by
    their options' labels (``heldout_mc``) or texts (``heldout_content``).
``evaluation``
    :func:`evaluate`: benchmarks -> metrics and samples.
``stage``
    ``nacd eval``: :func:`check` and :func:`run`.

A question's own format (:class:`Doc`, :func:`doc_from_record`, :func:`doc_to_text`, :func:`doc_to_choices`)
lives in :mod:`nacd.questions`, below the data layer and this package, and is re-exported here.

Every name of the former single module ``nacd/evaluate.py`` stays importable from ``nacd.evaluate``.
A name is looked up in the module that uses it: to patch one (``SHARED_PREFIX_MIN``, ``_score_packed``),
patch it there (``nacd.evaluate.scoring``), not here.

Importing this package does no work; torch, peft and datasets are imported where needed.
"""

from nacd.evaluate.benchmarks import (
    _HUB_ID,
    _HUB_SPLIT,
    _MMLU_DIR_SPLIT,
    BUILTINS,
    LETTERS,
    MMLU_LETTER_DESCRIPTION,
    MMLU_TEXT_DESCRIPTION,
    Benchmark,
    Doc,
    _bench_name,
    _Builtin,
    _docs_from_rows,
    _folder_benchmark,
    _hub_benchmark,
    _is_mmlu_rows,
    _load_datasets,
    _mmlu_benchmark,
    _mmlu_split_dir,
    _read_jsonl_records,
    _sort_by_subject,
    _unique_ids,
    load_benchmark,
    load_jsonl_docs,
    load_mmlu_csv,
)
from nacd.evaluate.evaluation import (
    _argmax,
    _limited,
    _mean_stderr,
    _metrics,
    aggregate,
    evaluate,
    resolve_protocol,
)
from nacd.evaluate.heldout import (
    HELDOUT,
    HeldoutBenchmark,
    aggregate_loss,
    check_disjoint,
    heldout_sources,
    is_heldout,
    load_heldout,
    score_heldout,
)
from nacd.evaluate.prompts import (
    DEFAULT_MAX_LENGTH,
    FEWSHOT_DELIMITER,
    TARGET_DELIMITER,
    _prefix_token_id,
    _tok_encode,
    build_context,
    encode_pair,
    fewshot_docs,
    model_max_length,
)
from nacd.evaluate.scoring import (
    SHARED_PREFIX_MIN,
    _additive,
    _close,
    _common_prefix,
    _forward,
    _Group,
    _group_requests,
    _packed_batch,
    _plan,
    _score_packed,
    _score_plain,
    _sliding,
    score_loglikelihood,
)
from nacd.evaluate.stage import (
    KIND,
    STAGE,
    _adapter_identity,
    _safe,
    apply_adapter,
    brief_error,
    check,
    eval_name,
    load_benchmarks,
    model_name,
    run,
    verify_adapter,
)
from nacd.questions import FieldError, _answer_index, doc_from_record, doc_to_choices, doc_to_text

# every name of the former module, private ones included (select.py, the tests and bench/ use some)
__all__ = [
    # benchmarks
    "LETTERS",
    "MMLU_LETTER_DESCRIPTION",
    "MMLU_TEXT_DESCRIPTION",
    "_MMLU_DIR_SPLIT",
    "_HUB_SPLIT",
    "_HUB_ID",
    "Doc",
    "Benchmark",
    "_Builtin",
    "BUILTINS",
    "_answer_index",
    "FieldError",
    "doc_from_record",
    "_read_jsonl_records",
    "load_jsonl_docs",
    "_unique_ids",
    "_mmlu_split_dir",
    "load_mmlu_csv",
    "_load_datasets",
    "_docs_from_rows",
    "_is_mmlu_rows",
    "_sort_by_subject",
    "_hub_benchmark",
    "_mmlu_benchmark",
    "_folder_benchmark",
    "load_benchmark",
    "_bench_name",
    # prompts
    "TARGET_DELIMITER",
    "FEWSHOT_DELIMITER",
    "DEFAULT_MAX_LENGTH",
    "doc_to_text",
    "doc_to_choices",
    "fewshot_docs",
    "build_context",
    "_prefix_token_id",
    "_tok_encode",
    "encode_pair",
    "model_max_length",
    # scoring
    "SHARED_PREFIX_MIN",
    "_Group",
    "_sliding",
    "_packed_batch",
    "_additive",
    "_forward",
    "_score_packed",
    "_score_plain",
    "_group_requests",
    "_common_prefix",
    "_plan",
    "_close",
    "score_loglikelihood",
    # evaluation
    "_mean_stderr",
    "_argmax",
    "_metrics",
    "aggregate",
    "_limited",
    "resolve_protocol",
    "evaluate",
    # held-out loss
    "HELDOUT",
    "HeldoutBenchmark",
    "aggregate_loss",
    "check_disjoint",
    "heldout_sources",
    "is_heldout",
    "load_heldout",
    "score_heldout",
    # stage
    "KIND",
    "load_benchmarks",
    "STAGE",
    "apply_adapter",
    "brief_error",
    "_safe",
    "eval_name",
    "model_name",
    "_adapter_identity",
    "verify_adapter",
    "check",
    "run",
]
