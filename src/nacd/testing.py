"""Tiny random test models with tokenizers built offline.

The test-suite needs causal language models that load through the ordinary
``transformers`` entry points (``AutoModelForCausalLM`` / ``AutoTokenizer``)
but are small enough to train on a CPU in seconds and need no network.
:func:`build_tiny_model` builds one of two deliberately different kinds:

``"llama"``
    A ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads / 2 kv heads, untied
    embeddings) with a byte-level BPE tokenizer of 512 tokens and the
    SmolLM2 ChatML chat template; special tokens ``<|endoftext|>`` (0, unk),
    ``<|im_start|>`` (1, bos) and ``<|im_end|>`` (2, eos and pad), as in
    SmolLM2-135M-Instruct. Encoding adds no special tokens.

``"gemma3"``
    A ``Gemma3ForCausalLM`` (``gemma3_text``; hidden 48, 2 layers, one
    sliding-window and one full-attention layer, 4 heads / 1 kv head,
    head_dim 16, tied embeddings) with a Unigram tokenizer of 384 tokens
    (sentencepiece-style ``▁`` word boundaries); special tokens ``<pad>`` (0),
    ``<eos>`` (1), ``<bos>`` (2), ``<unk>`` (3), ``<start_of_turn>`` (4) and
    ``<end_of_turn>`` (5), as in Gemma 3. Like the Gemma3-270M base model it
    puts ``<bos>`` in front when encoding and has no chat template.

The two kinds differ in architecture, tokenizer type, vocabulary and hidden
size, so tests can exercise both "same embedding space" and "another
architecture with another tokenizer". Both tokenizers are fast (offsets
mapping is supported) and round-trip ordinary text exactly, including spaces
and newlines: ``decode(encode(text, add_special_tokens=False)) == text``. The
byte-level llama tokenizer round-trips any text; the gemma3 one has every
printable ASCII character, tab and newline as a piece but no byte fallback, so
other characters become ``<unk>``.

Note that ``Gemma3ForCausalLM`` scales its input embeddings by
``sqrt(hidden_size)`` inside ``get_input_embeddings()``; ``inputs_embeds``
taken from that layer give the same logits as ``input_ids``.

Importing this module does no work; ``torch``, ``tokenizers`` and
``transformers`` are imported inside the functions.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

__all__ = ["TINY_KINDS", "TINY_CORPUS", "SMOLLM2_CHAT_TEMPLATE", "build_tiny_model", "build_tiny_tokenizer"]

#: The kinds :func:`build_tiny_model` accepts.
TINY_KINDS = ("llama", "gemma3")

#: Bump when the recipe changes, so that cached builds are rebuilt.
_RECIPE_VERSION = 1

_MARKER = "nacd_tiny.json"

#: Files ``save_pretrained`` may write; removed before a (re)build.
_ARTIFACTS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

#: The chat template of SmolLM2-135M-Instruct (ChatML with a default system prompt).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Plain English the tiny tokenizers are trained on: questions, answers,
#: instructions, numbers and punctuation, so that ordinary sentences split
#: into word-sized pieces rather than single characters or bytes.
TINY_CORPUS = """\
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
What is the capital of Spain? The capital of Spain is Madrid.
What is the capital of Japan? The answer is Tokyo.
Question: How many days are there in a week?
Answer: There are 7 days in a week.
Question: What is 2 + 3?
Answer: 2 + 3 = 5.
Question: What is 12 times 4?
Answer: 12 * 4 = 48, so the answer is 48.
Question: If a train travels 60 miles in 1 hour, how far does it travel in 3 hours?
Answer: It travels 60 * 3 = 180 miles.
Write a short poem about the sea.
The sea is wide, the sea is deep; it sings the sailors off to sleep.
Summarize the following text in one sentence.
The text says that water boils at 100 degrees Celsius at sea level.
Translate "good morning" into French. "Bonjour" means good morning.
Please list three colors: red, green, and blue.
Here is a list:
1. Apples
2. Bananas
3. Oranges
Can you help me with my homework? Of course! What is the question?
I think the answer is correct, but let me check it again.
She said, "It's a beautiful day, isn't it?" and he agreed.
The year 2024 had 366 days because it was a leap year.
A dog, a cat, and a bird live in the same house.
Why is the sky blue? The sky looks blue because air scatters blue light more than red light.
How do plants make food? Plants use sunlight, water, and carbon dioxide to make sugar.
Explain the difference between weather and climate.
Weather is what happens today; climate is the average over many years.
The quick brown fox jumps over the lazy dog.
Numbers: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100, 1000, 3.14, 42.
The price is $19.99 (about 18 euros) - a 10% discount!
Email me at hello@example.com or call 555-0123.
Step 1: Read the problem. Step 2: Think. Step 3: Write the answer.
First, we add the numbers. Then, we divide by two. Finally, we check the result.
The result is 7.5, which is the average of 5 and 10.
Is it true that the Earth goes around the Sun? Yes, it is true.
Is it true that the Moon is made of cheese? No, that is not true.
Who wrote "Romeo and Juliet"? William Shakespeare wrote it.
When did the Second World War end? It ended in 1945.
Where is the Great Wall? The Great Wall is in China.
Which is larger, 9 or 11? The number 11 is larger than 9.
Give me an example of a fruit. An apple is a fruit.
Tell me a fun fact. Octopuses have three hearts and blue blood.
The teacher asked the students to open their books to page 27.
My favorite food is pizza; my brother likes pasta more.
Let's think step by step: 5 apples minus 2 apples leaves 3 apples.
You are a helpful assistant. Answer the user's question clearly and briefly.
The user asked for a recipe. Here is a simple recipe for tea:
- Boil water.
- Add a tea bag.
- Wait three minutes.
Thank you! You're welcome. Have a nice day.
Sorry, I don't know the answer to that question.
def add(a, b):
    return a + b
The function add(a, b) returns the sum of a and b.
True or false: 10 is an even number? True.
The instructions are: choose one option (A, B, C or D) and explain why.
Option A is correct because it is the only one that matches the data.
In 1969, people walked on the Moon for the first time.
The river flows north for 6,650 kilometers before it reaches the sea.
The system message tells the assistant how to answer; the user message asks the question.
The assistant answers the user: "The capital of France is Paris."
This is the end of the text. Goodbye!
"""


def _ascii_alphabet() -> list[str]:
    """Printable ASCII plus newline and tab: every character the tiny tokenizers must round-trip."""
    return sorted(set(string.printable) - {"\r", "\x0b", "\x0c"})


def _training_texts() -> list[str]:
    """The corpus as training lines, each keeping its trailing newline so newlines get pieces of their own."""
    return TINY_CORPUS.splitlines(keepends=True)


def _build_llama_tokenizer() -> Any:
    """Byte-level BPE (GPT-2 / SmolLM2 style) with 512 tokens and the SmolLM2 ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps the leading space inside each token's offsets, as in SmolLM2.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
        chat_template=SMOLLM2_CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def _unigram_vocab(words: dict[str, int], size: int, alphabet: list[str], max_len: int = 12) -> list[tuple[str, float]]:
    """A Unigram vocabulary of ``size`` pieces for ``words`` (pre-tokenized word -> count), deterministically.

    ``tokenizers``' own ``UnigramTrainer`` is not reproducible from one process to the next (its
    hash maps are randomly seeded, which changes the summation order of its EM, hence scores and
    ids), so this is a small sentencepiece-like trainer in plain Python that uses the ``tokenizers``
    Unigram model for the Viterbi segmentations: frequent substrings are candidates, a few rounds
    of hard EM re-estimate their log-probabilities, and the most used pieces are kept. Every
    character of ``alphabet`` is always a piece. Ties are broken by the piece text.

    Returns ``(piece, log_prob)`` pairs, most probable first.
    """
    import math

    from tokenizers import Tokenizer, models

    counts: dict[str, int] = {}
    for word, freq in words.items():
        for i in range(len(word)):
            for j in range(i + 2, min(len(word), i + max_len) + 1):
                counts[word[i:j]] = counts.get(word[i:j], 0) + freq
    ranked = sorted((p for p, c in counts.items() if c >= 2), key=lambda p: (-counts[p] * len(p), p))
    n_multi = size - len(alphabet)
    candidates = ranked[: 2 * n_multi]
    chars = {c: sum(f * w.count(c) for w, f in words.items()) for c in alphabet}
    scores = {p: math.log(counts[p] * len(p)) for p in candidates} | {c: math.log(chars[c] + 1) for c in alphabet}

    def em_round(pieces: list[str]) -> dict[str, int]:
        """Viterbi-segment every word with the current scores; return how often each piece is used."""
        total = sum(math.exp(scores[p]) for p in pieces)
        vocab = [(p, scores[p] - math.log(total)) for p in sorted(pieces, key=lambda p: (-scores[p], p))]
        tok = Tokenizer(models.Unigram(vocab, unk_id=None, byte_fallback=False))
        used = dict.fromkeys(pieces, 0)
        for word, freq in sorted(words.items()):
            for piece in tok.encode(word).tokens:
                used[piece] += freq
        for p in pieces:
            # Unused pieces (single characters mostly) keep a small but finite probability.
            scores[p] = math.log(used[p] + 0.1)
        return used

    pieces = sorted(scores)
    for _ in range(2):
        used = em_round(pieces)
    multi = sorted((p for p in pieces if p not in chars), key=lambda p: (-used[p], p))[:n_multi]
    pieces = sorted([*multi, *alphabet])
    for _ in range(3):
        used = em_round(pieces)
    total = math.log(sum(used.values()) + 0.1 * len(pieces))
    return sorted(((p, round(scores[p] - total, 6)) for p in pieces), key=lambda ps: (-ps[1], ps[0]))


def _build_gemma_tokenizer() -> Any:
    """Unigram (sentencepiece-style) with 384 tokens; adds ``<bos>`` when encoding; no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    # prepend_scheme="never": no dummy prefix, so text that starts without a space decodes
    # back without one (the real Gemma tokenizer adds no prefix space either). Spaces become
    # "▁" and start a new piece; newlines stay characters of their own.
    pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    words: dict[str, int] = {}
    for line in _training_texts():
        for word, _ in pre_tokenizer.pre_tokenize_str(line):
            words[word] = words.get(word, 0) + 1
    # Every printable ASCII character (and "▁") is a piece, so ASCII text never hits <unk>.
    alphabet = sorted({*_ascii_alphabet(), "▁"} - {" "})
    vocab = _unigram_vocab(words, 384 - len(specials), alphabet)
    unk_id = specials.index("<unk>")
    tok = Tokenizer(models.Unigram([(t, 0.0) for t in specials] + vocab, unk_id=unk_id, byte_fallback=False))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    bos_id = specials.index("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_tokenizer(kind: str) -> Any:
    """Train and return the tokenizer of ``kind`` (a ``PreTrainedTokenizerFast``), deterministically.

    Raises ``ValueError`` for a kind not in :data:`TINY_KINDS`.
    """
    if kind == "llama":
        return _build_llama_tokenizer()
    if kind == "gemma3":
        return _build_gemma_tokenizer()
    raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {TINY_KINDS}")


def _build_config(kind: str, tokenizer: Any) -> Any:
    """The model config of ``kind``, with special-token ids taken from ``tokenizer``."""
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if kind == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **ids,
        )
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        intermediate_size=96,
        max_position_embeddings=512,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=True,
        **ids,
    )


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    """The build marker in ``out_dir``, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((out_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def build_tiny_model(kind: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny random causal LM of ``kind`` with its tokenizer and save both into ``out_dir``.

    The model (float32, safetensors) and tokenizer are written with ``save_pretrained``, so the
    folder loads with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    Weights depend only on ``seed`` (``torch.manual_seed``) and tokenizers are trained
    deterministically from :data:`TINY_CORPUS`, so equal arguments give identical folders.

    A marker file (``nacd_tiny.json``) records kind, seed and recipe version; when ``out_dir``
    already holds a ``config.json`` and a matching marker, nothing is built. The marker is written
    last, so an interrupted build is redone on the next call.

    Args:
        kind: one of :data:`TINY_KINDS` (``"llama"`` or ``"gemma3"``).
        out_dir: folder to write into (created if missing).
        seed: seed for the random weights.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: ``kind`` is not one of :data:`TINY_KINDS`.
    """
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {TINY_KINDS}")
    out_dir = Path(out_dir)
    marker = {"kind": kind, "seed": int(seed), "version": _RECIPE_VERSION}
    if (out_dir / "config.json").is_file() and _read_marker(out_dir) == marker:
        return out_dir

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from nacd.progress import hf_bars

    tokenizer = build_tiny_tokenizer(kind)
    config = _build_config(kind, tokenizer)
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        # Leave the caller's global RNG as it was.
        torch.random.set_rng_state(rng_state)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    # Drop what an earlier build of another kind may have left (a llama chat_template.jinja would
    # give the gemma3 tokenizer a chat template); other files in the folder are left alone.
    for name in (_MARKER, *_ARTIFACTS):
        (out_dir / name).unlink(missing_ok=True)
    with hf_bars(always=True):
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    (out_dir / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out_dir
