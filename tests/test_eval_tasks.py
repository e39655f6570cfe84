"""RULER-style task generators and scorers (wgkv_jax.eval.tasks, wgkv_jax.eval.scoring).

The tokenizer is a small byte-level BPE trained in a fraction of a second on the first 400k
characters of the essays (about 3.6 characters a token; SmolLM2's is 4.2), so token budgets are
real subword counts. Oracles: the RULER data files read directly, RULER's own metric functions
from the installed package, and brute force for the size search.
"""

from __future__ import annotations

import collections
import importlib
import json
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from wgkv_jax.eval import scoring, tasks
from wgkv_jax.eval.tasks import TASKS, make_task
from wgkv_jax.weights.tokenizer import TextTokenizer

N = 2048
SLACK = 40  # one filler unit: a vt noise line is about 30 tokens under this tokenizer


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([tasks.essay_text()[:400_000]], trainer)
    return TextTokenizer(bpe, bos_id=None, eos_ids=(), add_bos=False, chat_template=None, source="test-bpe")


def check_layout(task, tok, n):
    """Parts make the prompt; the prompt fits the budget within one filler unit."""
    cue = "" if task.chat else task.answer_prefix
    assert task.prompt == task.prefill + task.question + cue
    assert task.prefill == task.prefix + task.context
    tokens = len(tok.encode(task.prompt))
    assert tokens == task.metadata["prompt_tokens"]
    assert n - SLACK <= tokens <= n, (task.name, tokens, n)


# --------------------------------------------------------------------------- NIAH family

NIAH_CASES = [
    ("niah", {}),
    ("niah", {"haystack": "repeat"}),
    ("niah", {"haystack": "needle", "key_type": "uuids", "value_type": "uuids"}),
    ("multikey", {}),
    ("multivalue", {"value_type": "words"}),
    ("multiquery", {}),
]


@pytest.mark.parametrize(("name", "opts"), NIAH_CASES)
def test_niah_values_once_at_depth_and_fits(tok, name, opts):
    task = make_task(name, tok, N, seed=3, depth=0.3, **opts)
    check_layout(task, tok, N)
    meta = task.metadata
    n_ans = meta["n_answer_needles"]
    assert len(task.answers) == n_ans >= 1
    # every value of every key (asked or distractor) sits exactly once in the context, nowhere else
    all_values = [v for vs in meta["values"] for v in vs]
    assert len(set(all_values)) == len(all_values)
    for v in all_values:
        assert task.context.count(v) == 1 and task.prompt.count(v) == 1, v
    for needle in meta["needles"]:
        assert task.context.count(needle) == 1
    # the asked needles carry the answers and sit at the requested depth
    for needle, answer in zip(meta["needles"][:n_ans], task.answers, strict=True):
        assert needle.endswith(f"is: {answer}.")
        assert abs(task.context.index(needle) / len(task.context) - 0.3) < 0.05
    for key in meta["queries"]:
        assert key in task.question and key in task.answer_prefix
    if opts.get("haystack") == "needle":  # distractor lines never repeat an asked key
        lines = task.context.split("\n")
        assert len(lines) > 20
        assert sum(meta["queries"][0] in line for line in lines) == 1


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_niah_depth_is_the_character_fraction(tok, depth):
    task = tasks.niah_single(tok, N, depth=depth, seed=11)
    needle = task.metadata["needles"][0]
    at = task.context.index(needle)
    assert abs(at / len(task.context) - depth) < 0.03
    assert abs(task.metadata["needle_depths"][0] - depth) < 0.03
    if depth == 0.0:
        assert at == 0
    if depth == 1.0:
        assert task.context.endswith(needle)
    # inside the text, at a sentence boundary: what precedes the needle ends a sentence
    if 0 < depth < 1:
        assert re.search(r"[.!?][\"')\]]* $", task.context[:at])


def test_multikey_depth_per_needle_and_grid(tok):
    depths = [0.1, 0.4, 0.7, 0.9]
    task = tasks.niah_multikey(tok, N, depth=depths, seed=5)
    for needle, d in zip(task.metadata["needles"], depths, strict=True):
        assert abs(task.context.index(needle) / len(task.context) - d) < 0.05
    drawn = tasks.niah_multivalue(tok, 1024, seed=5)  # depth=None: RULER's grid, distinct
    assert len(set(drawn.metadata["needle_depths"])) == 4
    assert all(abs(d - round(d * 39) / 39) < 0.05 for d in drawn.metadata["needle_depths"])


def test_multiquery_question_lists_all_keys(tok):
    task = tasks.niah_multiquery(tok, 1024, seed=2, num_queries=3, num_keys=5)
    keys = task.metadata["queries"]
    assert len(keys) == 3 and len(task.metadata["keys"]) == 5
    assert f"{keys[0]}, {keys[1]}, and {keys[2]}" in task.question
    assert "What are all the special magic numbers" in task.question
    asked = [task.metadata["values"][task.metadata["keys"].index(k)][0] for k in keys]
    assert list(task.answers) == asked
    single = tasks.niah_single(tok, 1024, seed=2)
    assert "What is the special magic number for" in single.question and single.answer_prefix.endswith(" is")


# --------------------------------------------------------------------------- vt, cwe


@pytest.mark.parametrize("num_chains", [1, 2])
def test_vt_chain_in_order_once(tok, num_chains):
    task = tasks.variable_tracking(tok, N, seed=4, num_chains=num_chains, num_hops=4)
    check_layout(task, tok, N)
    meta = task.metadata
    names, values = meta["names"], meta["values"]
    assert task.answers == names[0] and len(names[0]) == 5
    assert len(set(values)) == num_chains
    flat = [n for chain in names for n in chain]
    assert len(set(flat)) == len(flat)
    for chain in meta["statements"]:
        offsets = [task.context.index(s) for s in chain]
        assert offsets == sorted(offsets)
        assert all(task.context.count(s) == 1 for s in chain)
    # the asked value: once in the context (its chain's first statement), and in the question
    assert task.context.count(values[0]) == 1 and values[0] in task.question
    assert meta["statements"][0][0] == f"VAR {names[0][0]} = {values[0]}"
    assert meta["statements"][0][1] == f"VAR {names[0][1]} = VAR {names[0][0]}"
    for name in flat:  # the worked example uses other names and values
        assert name not in task.prefix
    assert values[0] not in task.prefix
    assert re.search(r"they are: [A-Z]{3}( [A-Z]{3}){4}\n\nMemorize", task.prefix)
    assert list(meta["positions"]) == sorted(meta["positions"])
    no_example = tasks.variable_tracking(tok, N, seed=4, fewshot=False)
    assert no_example.prefix.startswith("Memorize") and no_example.prefix.count("Memorize") == 1
    assert no_example.metadata["filler_units"] > meta["filler_units"]


@pytest.mark.parametrize(("n", "freqs"), [(N, (6, 1)), (4096, (30, 3))])
def test_cwe_counts(tok, n, freqs):
    task = tasks.common_words(tok, n, seed=6)
    check_layout(task, tok, n)
    entries = re.findall(r"(\d+)\. ([a-z]+)", task.context)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    counts = collections.Counter(w for _, w in entries)
    fc, fu = freqs
    assert (task.metadata["freq_common"], task.metadata["freq_uncommon"]) == freqs
    assert sorted(task.answers) == sorted(w for w, c in counts.items() if c == fc)
    assert len(task.answers) == 10
    assert all(c == fu for w, c in counts.items() if w not in task.answers)
    assert len(counts) == task.metadata["num_words"] > 10
    # no common word hides inside (or contains) any other listed word
    for a in task.answers:
        assert all(a not in w and w not in a for w in counts if w != a)
    assert not set(task.metadata["example_words"]) & set(counts)
    assert "10 most common words" in task.question


def test_cwe_options(tok):
    task = tasks.common_words(tok, 1024, seed=1, num_common=5, freq_common=4, freq_uncommon=2, fewshot=False)
    counts = collections.Counter(re.findall(r"\d+\. ([a-z]+)", task.context))
    assert sorted(w for w, c in counts.items() if c == 4) == sorted(task.answers)
    assert len(task.answers) == 5 and set(counts.values()) == {2, 4}
    assert task.prefix.count("Below is a numbered list") == 1
    with pytest.raises(ValueError, match="freq_common=2 must be an integer >= 3"):
        tasks.common_words(tok, 1024, freq_common=2, freq_uncommon=2)


# --------------------------------------------------------------------------- qa, ppl


def squad_oracle(index):
    """The index-th answerable SQuAD question straight from the file: (question, answers, paragraph)."""
    data = json.loads((tasks.ruler_data_dir() / "squad.json").read_text())
    rows = [
        (q["question"], [a["text"] for a in q["answers"]], p["context"])
        for a in data["data"]
        for p in a["paragraphs"]
        for q in p["qas"]
        if not q["is_impossible"]
    ]
    return rows[index]


@pytest.mark.parametrize("depth", [None, 0.0, 0.5, 1.0])
def test_qa_squad_gold_once(tok, depth):
    task = tasks.qa(tok, N, seed=8, depth=depth)
    check_layout(task, tok, N)
    question, answers, paragraph = squad_oracle(task.metadata["index"])
    assert task.question.endswith(f"Question: {question}")
    assert set(task.answers) == set(answers)
    assert task.context.count(paragraph) == 1 and any(a in paragraph for a in task.answers)
    (gold,) = task.metadata["gold_docs"]
    assert f"Document {gold}:\n{paragraph}" in task.context
    assert task.context.count("Document ") == task.metadata["n_docs"] > 3
    if depth is not None:
        assert abs(task.metadata["depths"][0] - depth) < 0.2
        assert abs(task.context.index(paragraph) / len(task.context) - depth) < 0.2
    assert scoring.score(task, f"It is {answers[-1].upper()}.") == 1.0


def test_qa_hotpot_all_ten_paragraphs(tok):
    task = tasks.qa(tok, 4096, dataset="hotpotqa", index=0, seed=1)
    check_layout(task, tok, 4096)
    example = json.loads((tasks.ruler_data_dir() / "hotpotqa.json").read_text())[0]
    assert task.answers == (example["answer"],)
    assert example["question"] in task.question
    for title, sentences in example["context"]:
        assert task.context.count(f"{title}\n{''.join(sentences)}") == 1
    assert len(task.metadata["gold_docs"]) == len(example["context"])


def test_ppl_text_is_a_slice_of_the_source(tok):
    task = tasks.ppl_text(tok, N, seed=9)
    check_layout(task, tok, N)
    start = task.metadata["start_char"]
    text = tasks.essay_text()
    assert text[start:].startswith(task.context) and task.context[0].isupper()
    assert task.prompt == task.context and task.answers == () and task.metric == "perplexity"
    assert tasks.ppl_text(tok, N, seed=10).metadata["start_char"] != start


# --------------------------------------------------------------------------- all tasks


@pytest.mark.parametrize("name", list(TASKS))
def test_deterministic_by_seed_and_both_forms(tok, name):
    n = 1536
    a = make_task(name, tok, n, seed=1)
    assert make_task(name, tok, n, seed=1) == a
    assert make_task(name, tok, n, seed=2).prompt != a.prompt
    chat = make_task(name, tok, n, seed=1, chat=True)
    assert chat.chat and not a.chat
    check_layout(a, tok, n)
    check_layout(chat, tok, n)
    if name != "ppl":
        assert a.prompt.endswith(a.answer_prefix) and a.answer_prefix.strip()
        assert chat.prompt.endswith(chat.question) and not chat.prompt.endswith(chat.answer_prefix)
        assert chat.answers == a.answers and chat.question == a.question
        # the question comes after the query-agnostic part (cwe's worked example asks the same one)
        assert (a.question in a.prefill) == (name == "cwe")


def test_errors(tok):
    with pytest.raises(ValueError, match=r"unknown task 'needle'.*'niah'.*'ppl'"):
        make_task("needle", tok, N)
    with pytest.raises(ValueError, match=r"task 'vt' has no option\(s\) \['depth'\]; its options are"):
        make_task("vt", tok, N, depth=0.5)
    for bad in (0, -5, 1.5, True, "2048"):
        with pytest.raises(ValueError, match=r"n_tokens=.* must be an integer >= 1"):
            make_task("niah", tok, bad)
    with pytest.raises(ValueError, match=r"niah: n_tokens=40 is too small; the prompt without any filler"):
        make_task("niah", tok, 40)
    with pytest.raises(ValueError, match=r"depth=1.5 must be a number in \[0, 1\]"):
        make_task("niah", tok, N, depth=1.5)
    with pytest.raises(ValueError, match=r"depth has 2 entries; expected one per needle \(4"):
        make_task("multikey", tok, N, depth=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"haystack='pg' must be one of \['essay', 'repeat', 'needle'\]"):
        make_task("niah", tok, N, haystack="pg")
    with pytest.raises(ValueError, match=r"value_type='ints' must be one of"):
        make_task("niah", tok, N, value_type="ints")
    with pytest.raises(ValueError, match="num_queries=5 asks more keys than num_keys=4"):
        make_task("multiquery", tok, N, num_queries=5, num_keys=4)
    with pytest.raises(ValueError, match=r"dataset='nq' must be one of \['squad', 'hotpotqa'\]"):
        make_task("qa", tok, N, dataset="nq")
    with pytest.raises(ValueError, match=r"index=-1 must be an integer in \[0, "):
        make_task("qa", tok, N, index=-1)
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        make_task("ppl", tok, N, source="nope")


def test_fit_finds_the_largest_feasible_size():
    rng = np.random.default_rng(0)
    for _ in range(200):
        u_max = int(rng.integers(1, 400))
        f = np.cumsum(rng.integers(0, 30, u_max + 1))  # nondecreasing token counts, brute-forced
        n = int(rng.integers(f[0], f[-1] + 50))
        calls = []

        def build(u, calls=calls):
            calls.append(u)
            return str(u)

        def count(text, f=f):
            return int(f[int(text)])

        if n > f[-1]:  # the source runs out before the budget
            with pytest.raises(ValueError, match="t: the source is too short for n_tokens"):
                tasks._fit(build, count, n, u_max, "t")
            continue
        expected = int(np.flatnonzero(f <= n).max())
        assert tasks._fit(build, count, n, u_max, "t") == (expected, str(expected), int(f[expected]))
        assert len(calls) <= 8 + 2 * int(np.log2(u_max + 1))


# --------------------------------------------------------------------------- scoring


def test_string_match_by_hand():
    refs = ["7381920", "Blue-Heron"]
    assert scoring.string_match_all("7381920 and blue-heron", refs) == 1.0
    assert scoring.string_match_all("only 7381920", refs) == 0.5
    assert scoring.string_match_all("BLUE-HERON!", refs) == 0.5  # case-insensitive
    assert scoring.string_match_all("nothing here", refs) == 0.0
    assert scoring.string_match_all(None, refs) == 0.0
    assert scoring.string_match_all("  738\x001920 ", ["738\n1920"]) == 1.0  # RULER's control-char rule
    assert scoring.string_match_part("only 7381920", refs) == 1.0
    assert scoring.string_match_part("BLUE-heron", refs) == 1.0
    assert scoring.string_match_part("neither", refs) == 0.0
    assert scoring.ruler_percent([1.0, 0.5, 0.0]) == 50.0
    assert scoring.ruler_percent([1 / 3]) == 33.33
    with pytest.raises(ValueError, match="references is empty"):
        scoring.string_match_all("x", [])
    with pytest.raises(ValueError, match="got the string '7'"):
        scoring.string_match_part("7", "7")
    with pytest.raises(ValueError, match="scores is empty"):
        scoring.ruler_percent([])


def test_scores_match_ruler_own_functions():
    ruler = importlib.import_module("long_context_eval.eval.synthetic.constants")
    rng = np.random.default_rng(1)
    alphabet = list("abAB12 -\n")
    for _ in range(300):
        refs = ["".join(rng.choice(alphabet, int(rng.integers(1, 4)))) for _ in range(int(rng.integers(1, 5)))]
        pred = "".join(rng.choice(alphabet, int(rng.integers(0, 30))))
        pred = scoring.postprocess(pred)  # RULER cleans before scoring
        assert scoring.string_match_all(pred, refs) * 100 == pytest.approx(
            ruler.string_match_all_per_sample([pred], [refs])[0]
        )
        assert scoring.string_match_part(pred, refs) * 100 == ruler.string_match_part_per_sample([pred], [refs])[0]


def test_score_uses_the_task_metric(tok):
    task = tasks.niah_multivalue(tok, 1024, seed=1)
    a = task.answers
    assert scoring.score(task, " ".join(a)) == 1.0
    assert scoring.score(task, f"{a[0]}, {a[1]}") == 0.5
    assert scoring.score(task, "I do not know.") == 0.0
    assert scoring.score(task, a[2]) == 0.25
    ppl = tasks.ppl_text(tok, 256, seed=0)
    with pytest.raises(ValueError, match="metric 'perplexity', which is not scored from a prediction"):
        scoring.score(ppl, "anything")
