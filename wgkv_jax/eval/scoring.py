"""RULER's scores for `Task` predictions, per sample in [0, 1].

RULER (the `nvidia-long-context-eval` package, `eval/synthetic/constants.py`) scores a prediction
against a list of references by case-insensitive containment after a light clean-up:

    string_match_all  = (# references contained in the prediction) / (# references)
                        niah, multikey, multivalue, multiquery, vt, cwe
    string_match_part = 1 if any reference is contained, else 0
                        qa (SQuAD, HotpotQA): RULER uses no token F1 or exact match

The clean-up (`postprocess`) strips the prediction and turns control characters into newlines.
RULER reports 100 x the mean over samples, rounded to 2 decimals: `ruler_percent`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from wgkv_jax.eval.tasks import Task

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str | None) -> str:
    """RULER's clean-up: None -> "", strip, control characters -> newline, strip."""
    if prediction is None:
        return ""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def _hits(prediction: str | None, references: Sequence[str]) -> list[bool]:
    if isinstance(references, str):
        raise ValueError(f"references must be a sequence of strings, got the string {references!r}")
    if len(references) == 0:
        raise ValueError("references is empty; a sample needs at least one reference answer")
    pred = postprocess(prediction).lower()
    return [r.lower() in pred for r in references]


def string_match_all(prediction: str | None, references: Sequence[str]) -> float:
    """The fraction of references contained in the prediction (case-insensitive)."""
    hits = _hits(prediction, references)
    return sum(hits) / len(hits)


def string_match_part(prediction: str | None, references: Sequence[str]) -> float:
    """1.0 if any reference is contained in the prediction (case-insensitive), else 0.0."""
    return float(any(_hits(prediction, references)))


METRIC_FNS: dict[str, Callable[[str | None, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}


def score(task: Task, prediction: str | None) -> float:
    """The task's own metric (`task.metric`) of one prediction, in [0, 1].

    Raises:
      ValueError: a perplexity task (score it from the model's log-likelihoods instead) or an
        unknown metric name.
    """
    if task.metric not in METRIC_FNS:
        raise ValueError(
            f"task {task.name!r} has metric {task.metric!r}, which is not scored from a prediction; "
            f"expected one of {list(METRIC_FNS)}"
        )
    return METRIC_FNS[task.metric](prediction, task.answers)


def ruler_percent(scores: Iterable[float]) -> float:
    """RULER's reported number: 100 x the mean of per-sample scores, rounded to 2 decimals."""
    scores = list(scores)
    if not scores:
        raise ValueError("scores is empty; nothing to average")
    return round(100.0 * sum(scores) / len(scores), 2)
