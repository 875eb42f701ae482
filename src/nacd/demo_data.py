"""The demo data set that nacd generates itself: a small instruction corpus and a multiple-choice benchmark.

``configs/demo.yaml`` runs the whole protocol on it with no download and no shared data. It is
built from a few embedded fact tables (capitals, animal classes, antonyms, irregular verbs, units)
and rule-based tasks (arithmetic, string transforms), all seeded, so every machine generates the
same bytes. Paths of the form ``builtin:demo/<name>`` name it anywhere a data path is accepted:

* ``builtin:demo/corpus.jsonl``: D_full, chat records ``{id, messages}``: facts stated as answers
  to questions (on-target for the benchmark) mixed with off-target string and arithmetic chores;
* ``builtin:demo/mc``: a benchmark folder with ``validation.jsonl`` (the evaluated questions) and
  ``train.jsonl`` (target-task examples for the targeted selection methods), records
  ``{id, question, choices, answer}`` about the same facts, phrased differently from the corpus.

The files are written once into ``<cache>/data/demo/`` (atomically) and reused; :func:`builtin_path`
resolves a ``builtin:`` path to the file or folder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from nacd.errors import DataError

PREFIX = "builtin:"
#: Bump when the generator changes, so caches are rebuilt.
VERSION = 1

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Russia": "Moscow", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara", "Australia": "Canberra", "Ireland": "Dublin",
    "Austria": "Vienna", "Hungary": "Budapest", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Chile": "Santiago",
    "Cuba": "Havana", "Morocco": "Rabat", "Nigeria": "Abuja", "Ghana": "Accra", "Iran": "Tehran",
    "Iraq": "Baghdad", "Denmark": "Copenhagen", "Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Switzerland": "Bern", "South Korea": "Seoul",
}  # fmt: skip

ANIMALS = {
    "dog": "mammal", "whale": "mammal", "bat": "mammal", "elephant": "mammal", "dolphin": "mammal",
    "horse": "mammal", "tiger": "mammal", "rabbit": "mammal", "eagle": "bird", "penguin": "bird",
    "owl": "bird", "parrot": "bird", "ostrich": "bird", "sparrow": "bird", "salmon": "fish", "shark": "fish",
    "trout": "fish", "tuna": "fish", "goldfish": "fish", "snake": "reptile", "lizard": "reptile",
    "crocodile": "reptile", "turtle": "reptile", "iguana": "reptile", "frog": "amphibian", "toad": "amphibian",
    "salamander": "amphibian", "newt": "amphibian", "ant": "insect", "bee": "insect", "beetle": "insect",
    "butterfly": "insect", "mosquito": "insect", "grasshopper": "insect",
}  # fmt: skip

ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "full": "empty", "hard": "soft", "high": "low", "old": "young", "open": "closed", "rich": "poor",
    "strong": "weak", "thick": "thin", "wet": "dry", "loud": "quiet", "near": "far", "clean": "dirty",
    "heavy": "light", "long": "short", "deep": "shallow", "sharp": "dull", "brave": "cowardly",
    "true": "false", "win": "lose", "push": "pull", "buy": "sell", "first": "last",
}  # fmt: skip

VERBS = {
    "go": "went", "see": "saw", "eat": "ate", "take": "took", "give": "gave", "write": "wrote",
    "run": "ran", "swim": "swam", "sing": "sang", "drink": "drank", "speak": "spoke", "break": "broke",
    "choose": "chose", "drive": "drove", "fly": "flew", "grow": "grew", "know": "knew", "throw": "threw",
    "begin": "began", "ring": "rang", "teach": "taught", "catch": "caught", "buy": "bought", "think": "thought",
}  # fmt: skip

UNITS = {
    ("seconds", "minute"): 60, ("minutes", "hour"): 60, ("hours", "day"): 24, ("days", "week"): 7,
    ("months", "year"): 12, ("centimeters", "meter"): 100, ("meters", "kilometer"): 1000,
    ("grams", "kilogram"): 1000, ("years", "decade"): 10, ("years", "century"): 100,
    ("millimeters", "centimeter"): 10, ("days", "leap year"): 366, ("weeks", "year"): 52,
    ("sides", "triangle"): 3, ("sides", "hexagon"): 6, ("legs", "spider"): 8, ("legs", "insect"): 6,
}  # fmt: skip

WORDS = [
    "table", "garden", "window", "pencil", "river", "planet", "orange", "bridge", "candle", "forest",
    "market", "silver", "winter", "doctor", "rocket", "basket", "island", "monkey", "guitar", "castle",
]  # fmt: skip


def _chat(user: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _on_target(rng: random.Random) -> list[list[dict[str, str]]]:
    """Facts stated as instruction answers: the knowledge the benchmark asks about."""
    out = []
    for country, city in CAPITALS.items():
        q = rng.choice(["What is the capital of {c}?", "Name the capital city of {c}.", "{c}'s capital is which city?"])
        out.append(_chat(q.format(c=country), f"The capital of {country} is {city}."))
    for animal, cls in ANIMALS.items():
        q = rng.choice(
            ["What kind of animal is a {a}?", "Is a {a} a mammal, bird, fish, reptile, amphibian or insect?"]
        )
        out.append(_chat(q.format(a=animal), f"A {animal} is {'an' if cls[0] in 'aeiou' else 'a'} {cls}."))
    for word, opposite in ANTONYMS.items():
        out.append(_chat(f"Give the opposite of the word '{word}'.", f"The opposite of '{word}' is '{opposite}'."))
    for verb, past in VERBS.items():
        out.append(_chat(f"What is the past tense of '{verb}'?", f"The past tense of '{verb}' is '{past}'."))
    for (small, big), n in UNITS.items():
        out.append(_chat(f"How many {small} are in a {big}?", f"There are {n} {small} in a {big}."))
    return out


def _off_target(rng: random.Random, count: int) -> list[list[dict[str, str]]]:
    """Chores unrelated to the benchmark: string transforms and arithmetic."""
    out = []
    for i in range(count):
        kind = i % 5
        word = rng.choice(WORDS)
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        if kind == 0:
            out.append(_chat(f"Reverse the letters of the word '{word}'.", f"'{word}' reversed is '{word[::-1]}'."))
        elif kind == 1:
            out.append(_chat(f"Write the word '{word}' in capital letters.", word.upper()))
        elif kind == 2:
            out.append(_chat(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
        elif kind == 3:
            nums = rng.sample(range(1, 100), 5)
            out.append(_chat(f"Sort these numbers from smallest to largest: {nums}.", str(sorted(nums))))
        else:
            vowels = sum(ch in "aeiou" for ch in word)
            out.append(_chat(f"How many vowels are in the word '{word}'?", f"'{word}' has {vowels} vowels."))
    return out


def _choices(rng: random.Random, gold: str, pool: list[str]) -> tuple[list[str], int]:
    others = rng.sample(sorted({p for p in pool if p != gold}), 3)
    choices = [*others, gold]
    rng.shuffle(choices)
    return choices, choices.index(gold)


def _questions(rng: random.Random) -> list[dict[str, object]]:
    """Multiple-choice questions about the same facts, phrased unlike the corpus."""
    qs = []
    for country, city in CAPITALS.items():
        choices, gold = _choices(rng, city, list(CAPITALS.values()))
        qs.append({"question": f"Which city is the capital of {country}?", "choices": choices, "answer": gold})
    classes = sorted(set(ANIMALS.values()))
    for animal, cls in ANIMALS.items():
        choices, gold = _choices(rng, cls, classes)
        qs.append({"question": f"A {animal} belongs to which group of animals?", "choices": choices, "answer": gold})
    for word, opposite in ANTONYMS.items():
        choices, gold = _choices(rng, opposite, list(ANTONYMS.values()))
        qs.append({"question": f"Which word means the opposite of '{word}'?", "choices": choices, "answer": gold})
    for verb, past in VERBS.items():
        choices, gold = _choices(rng, past, list(VERBS.values()))
        qs.append({"question": f"Yesterday I ___ (to {verb}). Which form fills the gap?", "choices": choices,
                   "answer": gold})  # fmt: skip
    numbers = sorted({str(n) for n in UNITS.values()})
    for (small, big), n in UNITS.items():
        choices, gold = _choices(rng, str(n), numbers)
        qs.append({"question": f"A {big} has how many {small}?", "choices": choices, "answer": gold})
    return qs


def generate(seed: int = 0) -> dict[str, list[dict[str, object]]]:
    """The demo files' records: ``corpus.jsonl``, ``mc/train.jsonl``, ``mc/validation.jsonl``.

    The corpus holds every fact once plus as many off-target chores; the questions are split 1:2
    into train (target examples for selection) and validation (the evaluated set).
    """
    rng = random.Random(seed)
    on = _on_target(rng)
    chats = on + _off_target(rng, len(on))
    rng.shuffle(chats)
    corpus = [{"id": f"demo-{i:04d}", "messages": m} for i, m in enumerate(chats)]
    questions = _questions(rng)
    rng.shuffle(questions)
    for i, q in enumerate(questions):
        q["id"] = f"mc-{i:04d}"
    cut = len(questions) // 3
    return {"corpus.jsonl": corpus, "mc/train.jsonl": questions[:cut], "mc/validation.jsonl": questions[cut:]}


def demo_dir(cache_dir: str | Path | None = None) -> Path:
    """The demo data folder (written on first use)."""
    from nacd.artifacts import atomic_write_text, cache_root

    folder = Path(cache_root(cache_dir)) / "data" / f"demo-v{VERSION}"
    if not (folder / "complete").is_file():
        for name, records in generate().items():
            text = "".join(json.dumps({"id": r.pop("id"), **r}, ensure_ascii=False) + "\n" for r in records)
            atomic_write_text(folder / name, text)
        atomic_write_text(folder / "complete", "ok\n")
    return folder


def builtin_path(spec: str, cache_dir: str | Path | None = None) -> Path:
    """``builtin:demo/<name>`` -> the generated file or folder; other names are an error."""
    rest = spec[len(PREFIX) :].strip("/")
    group, _, name = rest.partition("/")
    if group != "demo" or name not in ("corpus.jsonl", "mc", "mc/train.jsonl", "mc/validation.jsonl"):
        raise DataError(
            f"{spec!r}: unknown built-in data; available: builtin:demo/corpus.jsonl, builtin:demo/mc "
            "(a benchmark folder with train.jsonl and validation.jsonl)"
        )
    return demo_dir(cache_dir) / name
