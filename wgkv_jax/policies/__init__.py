"""Eviction and selection policies: score -> select (exact budget) -> compact, over plain arrays.

    policy = policies.get("snapkv", keep_ratio=0.25)                # frozen, hashable, jit-static
    s_bkn = policy.score(pos=pos_bkn, valid=valid_bkn, k=k_bkne, q=q_btkge, q_pos=q_pos_bt)
    keep_bkn = policy.select(s_bkn, valid_bkn)                      # exactly k per (row, head)
    c_out = policy.budget.count(N)                                  # static: the per-head count
    k, v, pos, length = policies.compact(k_bkne, v_bkne, pos_bkn, keep_bkn, c_out)

    guarded = policies.Chain([policies.Protect(sinks=4), policy])  # never evicts the first 4 tokens
    keep = policies.select(s_lbkn, valid_lbkn, None, policies.Global(policies.KeepRatio(0.3)))

The shared interface of reference/baselines.md section 1.2, without the model: the functions take
keys [B, K, N, E], values, positions and validity masks, and queries [B, T, K, G, E] where needed,
so the same policy serves the full cache (`cache/full.py`, slot == position), a bucketed prefill,
or the WG-KV dual cache's global store (`cache/dual.py`: glob_pos / glob_score / length per head).

- budgets.py: `KeepRatio` / `Tokens` sizes; `PerHead`, `PerLayer` (AdaKV), `Global` (KVzip),
  `Threshold` kinds; counts are static ints derived from the static slot count.
- selection.py: `select` (exact top-k, protected first, ties to the older slot, padding never kept)
  and `compact` (stable gather into a static capacity). PerLayer / Global budgets leave ragged
  per-head counts: compact into the largest head's count, or keep the mask (section 1.3).
- scores.py: StreamingLLM, SnapKV, H2O and Quest scoring (papers, defaults and our choices there).
- policies.py: the policy dataclasses, `Protect` / `Chain`, and the registry (`get`, `available`).

Axis letters: l layer, b batch, k KV head, g query head within a group, t query time,
n/s key slot, c compacted slot, p page, e head dim.
"""

from wgkv_jax.policies.ahakv import AhaKV, RecentAccumulator, ahakv_scores
from wgkv_jax.policies.budgets import Budget, Global, KeepRatio, PerHead, PerLayer, Threshold, Tokens
from wgkv_jax.policies.policies import (
    H2O,
    POLICIES,
    Cascading,
    Chain,
    KVzip,
    KVzipHeads,
    Policy,
    Protect,
    Quest,
    SnapKV,
    StreamingLLM,
    WriteGate,
    available,
    get,
)
from wgkv_jax.policies.scores import (
    attention_probs,
    h2o_scores,
    kvzip_scores,
    pages_to_slots,
    quest_landmarks,
    quest_page_scores,
    snapkv_scores,
    streaming_llm_scores,
)
from wgkv_jax.policies.selection import compact, select

POLICIES[AhaKV.name] = AhaKV

__all__ = [
    "H2O",
    "POLICIES",
    "AhaKV",
    "Budget",
    "Cascading",
    "Chain",
    "Global",
    "KVzip",
    "KVzipHeads",
    "KeepRatio",
    "PerHead",
    "PerLayer",
    "Policy",
    "Protect",
    "Quest",
    "RecentAccumulator",
    "SnapKV",
    "StreamingLLM",
    "Threshold",
    "Tokens",
    "WriteGate",
    "ahakv_scores",
    "attention_probs",
    "available",
    "compact",
    "get",
    "h2o_scores",
    "kvzip_scores",
    "pages_to_slots",
    "quest_landmarks",
    "quest_page_scores",
    "select",
    "snapkv_scores",
    "streaming_llm_scores",
]
