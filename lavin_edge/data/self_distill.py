"""Text-only instructions answered by the frozen base LLM itself, so the text route learns to leave it as it was.

No instruction set (Alpaca) ships in a package here. LaVIN mixes text-only instructions into its training so the
text route keeps the LLM's language ability; the offline substitute is self-distillation: a few hundred varied
instructions (facts, writing, lists, maths, code, how-to) written below, each answered once by the frozen base
(the LaVIN model with zero adapters, i.e. SmolLM2-135M-Instruct in LaVIN's prompt format) with greedy decoding,
and stored as JSONL. Training on those answers pulls the adapted text route toward the base's own outputs.

A fixed, hash-chosen subset is held out (``split = "test"``) for measuring how close the demo stays
(``lavin_edge.bench.text_fidelity``). Regenerate the file with ``python scripts/make_self_distill.py``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# The shipped answers of SmolLM2-135M-Instruct (demo base) to ``instructions()``.
DEFAULT_PATH = Path(__file__).resolve().parent / "self_distill_smollm2.jsonl"
# 1 in HELD_OUT_EVERY instructions (by hash) is held out: 60-ish of ~370.
HELD_OUT_EVERY = 6

_COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "China", "India", "Brazil", "Canada", "Mexico",
              "Egypt", "Kenya", "Australia", "Russia", "Norway", "Sweden", "Greece", "Portugal", "Poland",
              "Turkey", "Argentina", "Peru", "Chile", "Ireland", "Austria", "Thailand", "Vietnam", "Nigeria",
              "Morocco", "the United Kingdom"]
_BOOKS = ["Romeo and Juliet", "Pride and Prejudice", "1984", "Hamlet", "The Odyssey", "Moby-Dick",
          "War and Peace", "Don Quixote", "Frankenstein", "The Origin of Species"]
_SCIENCE = ["Why is the sky blue?", "What is the largest planet in the solar system?",
            "How many legs does a spider have?", "What gas do plants take in from the air?",
            "What is the boiling point of water in Celsius?", "What is the closest star to Earth?",
            "How many continents are there?", "What is the chemical symbol for gold?",
            "What causes the seasons on Earth?", "What is the speed of light?", "How many days are in a leap year?",
            "What is the hardest natural material?", "What organ pumps blood through the body?",
            "Which planet is known as the red planet?", "What is the largest ocean on Earth?",
            "How many bones are in the adult human body?", "What is the freezing point of water in Fahrenheit?",
            "Why do we have day and night?", "What do bees make?", "What is the tallest mountain in the world?",
            "What is the longest river in the world?", "How does rain form?", "What is the main gas in the air?",
            "Why do leaves change color in autumn?", "What animal is the largest mammal?",
            "How many hours are in a week?", "What is the smallest prime number?",
            "Which metal is liquid at room temperature?", "What is the center of an atom called?",
            "How long does the Earth take to go around the Sun?"]
_TERMS = ["photosynthesis", "gravity", "democracy", "an atom", "a volcano", "inflation", "a computer",
          "the internet", "a vaccine", "evolution", "an ecosystem", "a metaphor", "a noun", "an algorithm",
          "electricity", "a galaxy", "climate change", "a triangle", "a prime number", "a fraction", "friction",
          "a habitat", "renewable energy", "a neuron", "a glacier", "a budget", "a poem", "a museum", "a desert",
          "a rainbow", "machine learning", "a database", "a protein", "an island", "a recipe", "the moon",
          "a library", "a battery", "an earthquake", "a symphony"]
_TOPICS = ["the sea", "a rainy day", "the mountains", "a cat", "autumn", "the city at night", "friendship",
           "a cup of coffee", "the desert", "a forest", "winter", "a train journey", "the stars", "a garden",
           "a lighthouse", "the first day of school", "a river", "a thunderstorm", "a birthday", "the wind",
           "a old book", "the morning", "a small village", "the ocean waves", "a dog", "the sun", "a bridge",
           "snow", "a market", "music"]
_POEMS = ["the sea", "the moon", "spring", "a lonely tree", "the night sky", "a bird", "rain", "time",
          "home", "the wind", "a candle", "summer", "a river", "dreams", "the city"]
_HAIKU = ["a frog", "cherry blossoms", "the winter sun", "a mountain lake", "falling leaves", "the ocean",
          "a quiet morning", "fireflies", "a snowy field", "the harvest moon"]
_STORIES = ["a lost key", "a robot who learns to paint", "a dragon who is afraid of fire", "a secret door",
            "a girl who can talk to birds", "a ship in a storm", "a time traveller", "an old clock",
            "a talking tree", "the last day of summer"]
_DESCRIBE = ["an apple", "a bicycle", "a beach", "an elephant", "a kitchen", "a rainforest", "a guitar", "a sunset",
             "a bakery", "a spaceship", "a waterfall", "a snowman", "a castle", "a busy street", "a classroom"]
_LISTS = ["fruits", "colors", "animals that live in the ocean", "countries in Europe", "planets",
          "musical instruments", "vegetables", "sports", "programming languages", "things to pack for a trip",
          "ways to save energy", "healthy breakfast foods", "birds", "famous scientists", "types of clouds",
          "things you find in a kitchen", "ways to stay healthy", "jobs in a hospital", "board games",
          "kinds of trees", "hobbies", "flowers", "tools for a garden", "words that rhyme with cat",
          "ways to be kind", "things that are cold", "insects", "rivers", "shapes", "reasons to read books"]
_ADD = [(2, 3), (7, 5), (12, 9), (15, 27), (100, 250), (8, 8), (34, 66), (1, 99), (45, 55), (19, 23),
        (6, 14), (31, 40), (72, 18), (11, 11), (250, 250), (3, 4), (9, 6), (13, 17), (21, 21), (50, 75)]
_MUL = [(3, 4), (6, 7), (9, 9), (12, 5), (8, 7), (11, 3), (10, 10), (4, 25), (7, 7), (2, 50), (5, 5),
        (6, 8), (3, 13), (9, 4), (20, 3)]
_SUB = [(10, 4), (20, 7), (100, 45), (50, 25), (9, 3), (30, 12), (81, 9), (64, 32), (15, 8), (1000, 1)]
_WORD = ["If I have 3 apples and buy 4 more, how many apples do I have?",
         "A train travels 60 kilometers in one hour. How far does it go in three hours?",
         "Tom has 10 candies and gives 4 to his sister. How many does he have left?",
         "What is half of 48?", "What is 10 percent of 200?", "What is the square root of 81?",
         "How many minutes are in two hours?", "If a pizza has 8 slices and 2 people share it equally, "
         "how many slices does each get?", "What is 2 to the power of 5?", "Is 17 a prime number?"]
_CODE = ["adds two numbers", "returns the largest number in a list", "reverses a string",
         "checks whether a number is even", "counts the vowels in a string", "computes the factorial of n",
         "returns the sum of a list", "checks whether a string is a palindrome", "converts Celsius to Fahrenheit",
         "returns the first element of a list", "squares every number in a list", "removes duplicates from a list",
         "finds the average of a list of numbers", "prints hello world", "returns the length of a string",
         "checks whether a list is empty", "multiplies two numbers", "returns the minimum of two numbers",
         "counts the words in a sentence", "returns the last character of a string",
         "sorts a list of numbers", "computes the n-th Fibonacci number", "capitalizes a word",
         "joins a list of words with spaces", "checks whether a year is a leap year"]
_PY = ["def", "return", "for", "while", "if", "import", "class", "lambda", "print", "len"]
_TIPS = ["sleeping better", "studying for an exam", "saving money", "staying focused", "learning a new language",
         "cooking rice", "writing an essay", "running a first marathon", "keeping a plant alive",
         "making friends at a new school", "giving a presentation", "drinking more water", "reading more books",
         "organizing a desk", "waking up early"]
_HOWTO = ["make a cup of tea", "boil an egg", "tie a shoelace", "plant a seed", "write a letter",
          "change a light bulb", "make a paper airplane", "wash my hands properly", "start a journal",
          "bake bread", "ride a bicycle", "make a sandwich", "clean a window", "learn to swim", "draw a circle"]
_SYN = ["happy", "big", "fast", "smart", "cold", "beautiful", "angry", "small", "tired", "brave", "quiet",
        "old", "strong", "funny", "rich"]
_OPP = ["hot", "up", "light", "early", "full", "open", "young", "win", "hard", "love", "day", "inside",
        "begin", "true", "loud"]


def instructions() -> list[str]:
    """The instruction set (~370, deterministic order): facts, definitions, writing, lists, maths, code, advice."""
    out = [f"What is the capital of {c}?" for c in _COUNTRIES]
    out += [f"Who wrote {b}?" for b in _BOOKS]
    out += list(_SCIENCE)
    out += [f"Explain what {t} is in one sentence." if i % 2 else f"What is {t}?" for i, t in enumerate(_TERMS)]
    out += [f"Write one sentence about {t}." for t in _TOPICS]
    out += [f"Write a short poem about {t}." for t in _POEMS]
    out += [f"Write a haiku about {t}." for t in _HAIKU]
    out += [f"Write the opening line of a story about {t}." for t in _STORIES]
    out += [f"Describe {t} in two sentences." for t in _DESCRIBE]
    out += [f"List three {t}." for t in _LISTS]
    out += [f"What is {a} plus {b}?" for a, b in _ADD]
    out += [f"What is {a} times {b}?" for a, b in _MUL]
    out += [f"What is {a} minus {b}?" for a, b in _SUB]
    out += list(_WORD)
    out += [f"Write a Python function that {c}." for c in _CODE]
    out += [f"What does the Python keyword `{k}` do?" if k not in ("print", "len") else
            f"What does the Python function `{k}` do?" for k in _PY]
    out += [f"Give me a tip for {t}." for t in _TIPS]
    out += [f"How do I {t}?" for t in _HOWTO]
    out += [f"Give a synonym for the word \"{w}\"." for w in _SYN]
    out += [f"What is the opposite of \"{w}\"?" for w in _OPP]
    return out


def split_of(instruction: str) -> str:
    """"test" for a fixed ~1/6 of instructions (by sha256 of the text, so adding instructions moves none), else
    "train"."""
    h = int.from_bytes(hashlib.sha256(instruction.encode()).digest()[:4], "little")
    return "test" if h % HELD_OUT_EVERY == 0 else "train"


@torch.no_grad()
def greedy_answers(model: Any, tok: Any, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int = 32,
                   log: Any = None) -> list[list[int]]:
    """Greedy answers of a text-only ``LaVIN`` to token-id prompts (stop token excluded). Prompts of equal
    length decode together in one batch (no padding, so every row is exactly its batch-1 computation up to
    float summation order)."""
    stop = set(getattr(tok, "stop_ids", {tok.eos_id}))
    by_len: dict[int, list[int]] = {}
    for n, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(n)
    out: list[list[int]] = [[] for _ in prompts]
    for length in sorted(by_len):
        idx = by_len[length]
        for s in range(0, len(idx), batch_size):
            rows = idx[s:s + batch_size]
            h = model.embed(torch.tensor([prompts[n] for n in rows]), torch.full((len(rows),), -1), None)
            for n, answer in zip(rows, model.llm.generate_greedy(h, None, max_new_tokens, stop), strict=True):
                out[n] = answer
            if log is not None:
                log(f"  {len(rows)} prompt(s) of {length} tokens answered")
    return out


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path
