"""GGUF loading: tiny files written with `gguf.GGUFWriter` must give the same model as the
equivalent HF safetensors directory; quantized types dequantize exactly like `gguf.quants`;
bad inputs fail with errors that name the offending value; tokenizers from GGUF metadata."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from safetensors.numpy import save_file

import wgkv_jax

# ----------------------------------------------------------------------------- a tiny byte-level BPE vocabulary


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


BYTE_TOKENS = [_bytes_to_unicode()[b] for b in range(256)]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "t h", "th e"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = BYTE_TOKENS + [m.replace(" ", "") for m in MERGES] + SPECIALS
TOKEN_TYPES = [1] * (len(TOKENS) - len(SPECIALS)) + [3] * len(SPECIALS)  # 1 NORMAL, 3 CONTROL
BOS_ID, EOS_ID = TOKENS.index("<|im_start|>"), TOKENS.index("<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB = len(TOKENS)  # 270

# ----------------------------------------------------------------------------- tiny model specs


@dataclasses.dataclass(frozen=True)
class Spec:
    arch: str = "llama"
    d: int = 64
    layers: int = 2
    heads: int = 4
    kv: int = 2
    head_dim: int = 16
    ffn: int = 96
    theta: float = 10000.0
    eps: float = 1e-5
    tie: bool = False
    pre: str = "default"

    @property
    def bias(self) -> bool:
        return self.arch == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.arch == "qwen3"


SPECS = {
    "llama": Spec("llama", tie=False),
    "qwen2": Spec("qwen2", theta=1e6, tie=True, pre="qwen2"),
    "qwen3": Spec("qwen3", head_dim=24, theta=1e6, tie=False, eps=1e-6),
}
HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# HF suffix -> GGUF suffix, per layer
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf: str) -> str:
    if hf in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf]
    _, _, idx, rest = hf.split(".", 3)
    return f"blk.{idx}.{LAYER_NAMES[rest]}"


def random_state(spec: Spec, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-layout float32 tensors (non-unit norms, non-zero biases)."""
    rng = np.random.default_rng(seed)
    D, H, K, E, F = spec.d, spec.heads, spec.kv, spec.head_dim, spec.ffn

    def w(*shape, std=0.15):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.3 * rng.standard_normal(n)).astype(np.float32)

    sd = {"model.embed_tokens.weight": w(VOCAB, D, std=0.3), "model.norm.weight": norm(D)}
    if not spec.tie:
        sd["lm_head.weight"] = w(VOCAB, D)
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        sd |= {
            p + "input_layernorm.weight": norm(D),
            p + "post_attention_layernorm.weight": norm(D),
            p + "self_attn.q_proj.weight": w(H * E, D),
            p + "self_attn.k_proj.weight": w(K * E, D),
            p + "self_attn.v_proj.weight": w(K * E, D),
            p + "self_attn.o_proj.weight": w(D, H * E),
            p + "mlp.gate_proj.weight": w(F, D),
            p + "mlp.up_proj.weight": w(F, D),
            p + "mlp.down_proj.weight": w(D, F, std=0.1),
        }
        if spec.bias:
            sd |= {p + f"self_attn.{x}_proj.bias": w(n, std=0.5) for x, n in (("q", H * E), ("k", K * E), ("v", K * E))}
        if spec.qk_norm:
            sd |= {p + "self_attn.q_norm.weight": norm(E), p + "self_attn.k_norm.weight": norm(E)}
    return sd


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` of q/k rows (HF rotate-half -> interleaved pairs)."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(stored: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `llama_cpp_permute`, computed from the permutation of row indices (independent of the library)."""
    perm = llama_cpp_permute(np.arange(stored.shape[0]), n_head)
    return stored[np.argsort(perm)]


def raw_k_quant(shape: tuple[int, int], qtype: QT, rng) -> np.ndarray:
    """Random K-quant block bytes [rows, bytes per row] with small finite fp16 scales."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)

    def f16(lo, hi):
        return rng.uniform(lo, hi, size=(*raw.shape[:2], 1)).astype(np.float16).view(np.uint8)

    if qtype == QT.Q4_K:  # d, dmin (fp16), scales[12], qs[128]
        raw[..., 0:2], raw[..., 2:4] = f16(2e-4, 1e-3), f16(2e-4, 1e-3)
    elif qtype == QT.Q6_K:  # ql[128], qh[64], scales[16] (int8), d (fp16)
        raw[..., 208:210] = f16(5e-5, 2e-4)
    else:
        raise ValueError(qtype)
    return raw.reshape(rows, -1)


def encode_tensor(x: np.ndarray, qtype: QT, rng) -> tuple[np.ndarray, np.ndarray]:
    """(array to hand to GGUFWriter.add_tensor, float32 values the loader must produce)."""
    if qtype == QT.F32:
        return x, x
    if qtype == QT.F16:
        h = x.astype(np.float16)
        return h, h.astype(np.float32)
    q = raw_k_quant(x.shape, qtype, rng) if qtype in (QT.Q4_K, QT.Q6_K) else quantize(x, qtype)
    assert q.dtype == np.uint8
    return q, dequantize(q, qtype).reshape(x.shape).astype(np.float32)


def write_gguf(
    path: Path,
    spec: Spec,
    sd: dict[str, np.ndarray],
    *,
    qtype: QT = QT.F32,
    arch: str | None = None,
    overrides: dict[str, tuple[np.ndarray, QT]] | None = None,
    tokenizer_model: str = "gpt2",
    ffn_length: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write `sd` as a llama.cpp-style GGUF; returns the HF-layout float32 values the loader must produce.

    Matrices get `qtype` where their row length is a multiple of its block size (else F32); 1-D tensors
    stay F32 like llama.cpp. `overrides` maps a GGUF tensor name to raw bytes and their type.
    """
    arch = arch or spec.arch
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_block_count(spec.layers)
    w.add_context_length(256)
    w.add_embedding_length(spec.d)
    w.add_feed_forward_length(ffn_length or spec.ffn)
    w.add_head_count(spec.heads)
    w.add_head_count_kv(spec.kv)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(spec.theta)
    w.add_layer_norm_rms_eps(spec.eps)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(spec.pre)
    w.add_token_list(TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    expected = {}
    for hf, x in sd.items():
        name = gguf_name(hf)
        permuted = arch == "llama" and (".q_proj." in hf or ".k_proj." in hf)
        n_head = spec.heads if ".q_proj." in hf else spec.kv
        stored = llama_cpp_permute(x, n_head) if permuted else x
        if overrides and name in overrides:
            raw, t = overrides[name]
            w.add_tensor(name, raw, raw_dtype=t)
            expected[hf] = None
            continue
        t = qtype if x.ndim == 2 and x.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else QT.F32
        data, values = encode_tensor(np.ascontiguousarray(stored), t, rng)
        w.add_tensor(name, data, raw_dtype=None if t in (QT.F32, QT.F16) else t)
        expected[hf] = unpermute_rows(values, n_head) if permuted else values
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def hf_config(spec: Spec, **overrides) -> dict:
    return {
        "architectures": [HF_ARCH[spec.arch]],
        "model_type": spec.arch,
        "vocab_size": VOCAB,
        "hidden_size": spec.d,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.ffn,
        "rope_theta": spec.theta,
        "rms_norm_eps": spec.eps,
        "tie_word_embeddings": spec.tie,
        "max_position_embeddings": 256,
        "hidden_act": "silu",
    } | overrides


def write_hf_dir(path: Path, spec: Spec, sd: dict[str, np.ndarray], **config_overrides) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf_config(spec, **config_overrides)))
    return path


def random_ids(seed: int = 0, shape=(2, 33)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=shape, dtype=np.int32)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_same_params(a, b):
    la, ta = jax.tree.flatten_with_path(a)
    lb, tb = jax.tree.flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def comparable(cfg: wgkv_jax.ModelConfig) -> wgkv_jax.ModelConfig:
    """Config without the fields that legitimately differ between sources (name; eps stored as float32)."""
    return dataclasses.replace(cfg, name="", rms_eps=round(cfg.rms_eps, 12))


# ----------------------------------------------------------------------------- GGUF path == safetensors path


@pytest.mark.parametrize("arch", list(SPECS))
def test_gguf_matches_safetensors(arch, tmp_path):
    spec = SPECS[arch]
    sd = random_state(spec, seed=1)
    expected = write_gguf(tmp_path / "m.gguf", spec, sd)
    for hf, x in sd.items():
        np.testing.assert_array_equal(expected[hf], x, err_msg=hf)  # F32: the permutation round-trips exactly

    g = wgkv_jax.load_model(str(tmp_path / "m.gguf"))
    s = wgkv_jax.load_model(str(write_hf_dir(tmp_path / "hf", spec, sd)))
    assert g.config.arch == arch
    assert comparable(g.config) == comparable(s.config)
    assert g.config.tie_embeddings == spec.tie
    assert g.config.qkv_bias == spec.bias and g.config.qk_norm == spec.qk_norm
    assert g.config.head_dim == spec.head_dim
    assert g.config.name == "tiny-test"
    assert_same_params(g.params, s.params)

    ids = random_ids()
    lg = np.asarray(g.logits(ids))
    assert np.abs(lg).max() > 1.0
    diff = max_diff(lg, s.logits(ids))
    print(f"{arch}: GGUF vs safetensors max |logit diff| = {diff:.2e}")
    assert diff <= 1e-5


def test_llama_gguf_without_unpermute_would_differ(tmp_path):
    """Guards the test above: the q/k permutation must actually matter for the logits."""
    spec = SPECS["llama"]
    sd = random_state(spec, seed=1)
    write_gguf(tmp_path / "m.gguf", spec, sd)
    permuted = dict(sd)
    for hf in sd:
        if ".q_proj." in hf or ".k_proj." in hf:
            permuted[hf] = llama_cpp_permute(sd[hf], spec.heads if ".q_proj." in hf else spec.kv)
    g = wgkv_jax.load_model(str(tmp_path / "m.gguf"))
    wrong = wgkv_jax.load_model(str(write_hf_dir(tmp_path / "hf", spec, permuted)))
    ids = random_ids()
    assert max_diff(g.logits(ids), wrong.logits(ids)) > 1e-2


# ----------------------------------------------------------------------------- quantized tensor types

QUANT_TYPES = [QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q6_K]


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quantized_types_dequantize_exactly(qtype, tmp_path):
    spec = Spec("llama", ffn=256, tie=False)  # ffn_down rows of 256 values: one K-quant super-block
    sd = random_state(spec, seed=2)
    expected = write_gguf(tmp_path / "q.gguf", spec, sd, qtype=qtype, seed=3)

    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    types = {t.name: QT(t.tensor_type) for t in reader.tensors}
    n_typed = sum(t == qtype for t in types.values())
    assert n_typed >= (2 if qtype in (QT.Q4_K, QT.Q6_K) else 2 * 7 + 2), types
    if qtype in (QT.Q4_K, QT.Q6_K):
        assert types["blk.0.ffn_down.weight"] == qtype
        down = expected["model.layers.0.mlp.down_proj.weight"]
        assert np.isfinite(down).all() and 0.05 < np.abs(down).max() < 2.0 and np.unique(down).size > 100
    else:  # every matrix, including the permuted q/k and both embeddings
        assert types["blk.1.attn_q.weight"] == types["blk.1.attn_k.weight"] == types["token_embd.weight"] == qtype

    m = wgkv_jax.load_model(str(tmp_path / "q.gguf"))
    ref = wgkv_jax.load_model(str(write_hf_dir(tmp_path / "hf", spec, expected)))
    assert_same_params(m.params, ref.params)
    # spot-check one permuted tensor against the layout directly
    wq = expected["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(np.asarray(m.params["layers"]["wq"][1]), wq.T.reshape(spec.d, spec.heads, -1))

    ids = random_ids(1)
    logits = np.asarray(m.logits(ids))
    assert np.isfinite(logits).all()
    diff = max_diff(logits, ref.logits(ids))
    print(f"{qtype.name}: GGUF vs dequantized safetensors max |logit diff| = {diff:.2e}")
    assert diff <= 1e-5
    if qtype not in (QT.Q4_K, QT.Q6_K):  # quantization error stays near the original weights
        tol = {QT.F16: 1e-3, QT.BF16: 1e-2, QT.Q8_0: 0.02, QT.Q4_0: 0.2, QT.Q4_1: 0.2}[qtype]
        hf = "model.layers.0.self_attn.k_proj.weight"
        assert max_diff(expected[hf], sd[hf]) <= tol * 0.5


# ----------------------------------------------------------------------------- error paths


def test_unsupported_tensor_type(tmp_path):
    spec = SPECS["llama"]
    sd = random_state(spec)
    name = "blk.1.ffn_up.weight"
    block, nbytes = gguf.GGML_QUANT_SIZES[QT.IQ4_NL]
    raw = np.zeros((spec.ffn, spec.d // block * nbytes), np.uint8)
    write_gguf(tmp_path / "iq.gguf", spec, sd, overrides={name: (raw, QT.IQ4_NL)})
    with pytest.raises(wgkv_jax.UnsupportedModelError) as e:
        wgkv_jax.load_model(str(tmp_path / "iq.gguf"))
    assert "IQ4_NL" in str(e.value) and name in str(e.value)


@pytest.mark.parametrize("arch", ["gpt2", "falcon"])
def test_unsupported_gguf_architecture(arch, tmp_path):
    spec = SPECS["llama"]
    write_gguf(tmp_path / "a.gguf", spec, random_state(spec), arch=arch)
    with pytest.raises(wgkv_jax.UnsupportedModelError, match=repr(arch)):
        wgkv_jax.load_model(str(tmp_path / "a.gguf"))


def test_unsupported_gguf_tokenizer_model(tmp_path):
    spec = SPECS["llama"]
    write_gguf(tmp_path / "t.gguf", spec, random_state(spec), tokenizer_model="llama")
    with pytest.raises(wgkv_jax.UnsupportedModelError, match="'llama'"):
        wgkv_jax.load_model(str(tmp_path / "t.gguf"))


def test_gguf_metadata_disagrees_with_tensors(tmp_path):
    spec = SPECS["llama"]
    write_gguf(tmp_path / "f.gguf", spec, random_state(spec), ffn_length=128)
    with pytest.raises(wgkv_jax.WeightsMismatchError) as e:
        wgkv_jax.load_model(str(tmp_path / "f.gguf"))
    msg = str(e.value)
    assert "mlp." in msg and "(96, 64)" in msg and "(128, 64)" in msg, msg


def test_safetensors_wrong_shape(tmp_path):
    spec = SPECS["qwen2"]
    sd = random_state(spec)
    name = "model.layers.1.mlp.up_proj.weight"
    sd[name] = sd[name][:95]
    write_hf_dir(tmp_path, spec, sd)
    with pytest.raises(wgkv_jax.WeightsMismatchError) as e:
        wgkv_jax.load_model(str(tmp_path))
    msg = str(e.value)
    assert name in msg and "(95, 64)" in msg and "(96, 64)" in msg, msg


def test_safetensors_missing_and_unexpected_tensors(tmp_path):
    spec = SPECS["llama"]
    sd = random_state(spec)
    missing = "model.layers.0.self_attn.v_proj.weight"
    write_hf_dir(tmp_path / "missing", spec, {k: v for k, v in sd.items() if k != missing})
    with pytest.raises(wgkv_jax.WeightsMismatchError, match=missing):
        wgkv_jax.load_model(str(tmp_path / "missing"))
    extra = "model.layers.0.mlp.extra_proj.weight"
    write_hf_dir(tmp_path / "extra", spec, sd | {extra: np.zeros((4, 4), np.float32)})
    with pytest.raises(wgkv_jax.WeightsMismatchError, match=extra):
        wgkv_jax.load_model(str(tmp_path / "extra"))


def test_missing_path(tmp_path):
    path = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        wgkv_jax.load_model(str(path))
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        wgkv_jax.load_model(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("arch_name", ["GPT2LMHeadModel", "GemmaForCausalLM"])
def test_unsupported_hf_architecture(arch_name, tmp_path):
    spec = SPECS["llama"]
    write_hf_dir(tmp_path, spec, random_state(spec), architectures=[arch_name], model_type="other")
    with pytest.raises(wgkv_jax.UnsupportedModelError, match=arch_name):
        wgkv_jax.load_model(str(tmp_path))


# ----------------------------------------------------------------------------- tokenizer from GGUF metadata


@pytest.fixture(scope="module")
def gguf_tokenizer(tmp_path_factory):
    spec = SPECS["llama"]
    path = tmp_path_factory.mktemp("tok") / "t.gguf"
    write_gguf(path, spec, random_state(spec))
    return wgkv_jax.load_model(str(path)).tokenizer


def test_gguf_tokenizer_merges_and_specials(gguf_tokenizer):
    tok = gguf_tokenizer
    assert tok.vocab_size == VOCAB
    assert tok.bos_id == BOS_ID and tok.eos_ids == (EOS_ID,)
    assert not tok.add_bos
    assert tok.encode("hello world") == [TOKENS.index("hello"), TOKENS.index("Ġworld")]
    assert tok.encode("the") == [TOKENS.index("t"), TOKENS.index("he")]  # merge rank: "h e" before "t h"
    assert tok.encode("th") == [TOKENS.index("th")]
    assert tok.encode("<|im_start|>") == [BOS_ID]
    assert tok.encode("a<|im_end|>b") == [TOKENS.index("a"), EOS_ID, TOKENS.index("b")]


ROUND_TRIP = [
    "hello world",
    "the theme of hello\n\n  world!",
    "café naïve 東京 😀 $3.14\n\ttab",
    "",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_gguf_tokenizer_round_trip(gguf_tokenizer, text):
    ids = gguf_tokenizer.encode(text)
    assert all(0 <= i < VOCAB for i in ids)
    assert gguf_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_gguf_chat_template(gguf_tokenizer):
    tok = gguf_tokenizer
    assert tok.chat_template == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    text = tok.render_chat(messages)
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.render_chat(messages, add_generation_prompt=False).endswith("hello<|im_end|>\n")
    ids = tok.encode_chat("hello", system="be brief")
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids[0] == BOS_ID and ids.count(EOS_ID) == 2 and TOKENS.index("hello") in ids


def test_gguf_qwen2_pretokenizer_splits_digits(tmp_path):
    spec = SPECS["qwen2"]
    write_gguf(tmp_path / "q.gguf", spec, random_state(spec))
    tok = wgkv_jax.load_model(str(tmp_path / "q.gguf")).tokenizer
    ids = tok.encode("2024")
    assert [tok.token_str(i) for i in ids] == ["2", "0", "2", "4"]


# ----------------------------------------------------------------------------- the real SmolLM2 tokenizer (slow)


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2):
    tok = smollm2.tokenizer
    assert tok.encode("<|im_start|>") == [1]
    assert 2 in tok.eos_ids
    digits = tok.encode("2024")
    assert len(digits) == 4 and [tok.decode([i]) for i in digits] == ["2", "0", "2", "4"]
    for text in ["café naïve 東京 $3.14\n\ttab", "  leading spaces and a trailing newline\n"]:
        assert tok.decode(tok.encode(text)) == text
    chat = tok.encode_chat("hi")
    assert chat[0] == 1 and tok.decode(chat, skip_special_tokens=False).startswith("<|im_start|>system\n")
