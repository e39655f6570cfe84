"""Tokenizers from `tokenizer.json` (HF directories) or from GGUF metadata, plus chat templates.

GGUF byte-level BPE vocabularies are rebuilt with the `tokenizers` library. The pre-tokenizer
follows llama.cpp's `tokenizer.ggml.pre` (e.g. `smollm` splits every digit before the GPT-2
regex), so token ids match what the model was trained with.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from wgkv_jax.weights.safetensors_io import UnsupportedModelError

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), byte_level])
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level])
    if pre not in ("gpt2", "default", ""):
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known; using the GPT-2 byte-level regex", stacklevel=3)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


class TextTokenizer:
    """Encode/decode text and render chat prompts the way the original model does.

    Attributes:
      bos_id: id of the BOS token or None; add_bos: whether plain `encode` prepends it.
      eos_ids: ids that end generation (EOS, end-of-turn, generation-config terminators).
      chat_template: the Jinja chat template, or None for base models.
    """

    def __init__(
        self,
        tok: Tokenizer,
        *,
        bos_id: int | None,
        eos_ids: tuple[int, ...],
        add_bos: bool,
        chat_template: str | None,
        source: str,
    ):
        self.tok = tok
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.source = source

    # --------------------------------------------------------------------- constructors

    @classmethod
    def from_gguf(cls, g) -> TextTokenizer:
        """Build from a `wgkv_jax.weights.gguf_io.GGUFFile`'s `tokenizer.ggml.*` metadata."""
        kind = g.field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(
                f"{g.path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')"
            )
        tokens = list(g.require("tokenizer.ggml.tokens"))
        merges = [tuple(m.split(" ", 1)) for m in g.require("tokenizer.ggml.merges")]
        types = list(g.field("tokenizer.ggml.token_type", [1] * len(tokens)))
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = _byte_level_pre_tokenizer(str(g.field("tokenizer.ggml.pre", "default")))
        tok.decoder = decoders.ByteLevel()
        # CONTROL (3) tokens are special; USER_DEFINED (4) must stay atomic but are printed
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty == 3]
        )
        tok.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty == 4]
        )
        bos = g.field("tokenizer.ggml.bos_token_id")
        eos = g.field("tokenizer.ggml.eos_token_id")
        eot = g.field("tokenizer.ggml.eot_token_id")
        return cls(
            tok,
            bos_id=None if bos is None else int(bos),
            eos_ids=tuple(int(i) for i in (eos, eot) if i is not None),
            add_bos=bool(g.field("tokenizer.ggml.add_bos_token", False)),
            chat_template=g.field("tokenizer.chat_template"),
            source=str(g.path),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> TextTokenizer:
        """Build from `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        tok = Tokenizer.from_file(str(tj))
        conf = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        model_cfg = _read_json(path / "config.json")

        def token_id(entry) -> int | None:
            if isinstance(entry, dict):
                entry = entry.get("content")
            return None if entry is None else tok.token_to_id(entry)

        bos = token_id(conf.get("bos_token"))
        if bos is None:
            bos = gen.get("bos_token_id", model_cfg.get("bos_token_id"))
        eos = [token_id(conf.get("eos_token"))]
        for src in (gen, model_cfg):
            ids = src.get("eos_token_id")
            eos += ids if isinstance(ids, list) else [ids]
        template = conf.get("chat_template")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        add_bos = bool(conf.get("add_bos_token", False))
        return cls(
            tok,
            bos_id=bos,
            eos_ids=tuple(i for i in eos if i is not None),
            add_bos=add_bos,
            chat_template=template,
            source=str(path),
        )

    # --------------------------------------------------------------------- use

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS is added as the original tokenizer would."""
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_str(self, i: int) -> str | None:
        return self.tok.id_to_token(int(i))

    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` ([{"role": ..., "content": ...}, ...])."""
        if not self.chat_template:
            raise ValueError(f"{self.source}: this tokenizer has no chat template; use chat=False")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.token_str(self.bos_id) if self.bos_id is not None else "",
            eos_token=self.token_str(self.eos_ids[0]) if self.eos_ids else "",
        )

    def encode_chat(self, user: str, *, system: str | None = None) -> list[int]:
        """Token ids of a one-turn chat prompt ending with the assistant header."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
