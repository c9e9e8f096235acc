"""Δm: the average relative change of every task metric against single-task baselines."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

__all__ = ["delta_m"]


def delta_m(
    scores: Mapping[str, float],
    baselines: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
    *,
    sign: Literal["lower_is_better", "higher_is_better"] = "lower_is_better",
) -> float:
    """Δm in percent: the mean over metrics of (-1)^{h_i} (score_i - baseline_i) / baseline_i x 100.

    h_i = 1 when metric i is higher-is-better, so with the default ``sign`` a negative Δm is an
    improvement over the single-task baselines: the convention of Navon et al., "Multi-Task
    Learning as a Bargaining Game", ICML 2022 and Liu et al., "FAMO", NeurIPS 2023, whose
    published Δm% tables then compare directly. Maninis et al. (CVPR 2019) and Vandenhende et
    al. (TPAMI 2021) report the opposite sign (positive is better): pass
    ``sign="higher_is_better"``.

    Args:
        scores: metric name -> the multi-task model's value (every metric of every task).
        baselines: metric name -> the single-task baseline's value.
        higher_is_better: metric name -> whether a larger value is better.
        sign: which direction of Δm means better.

    Raises:
        KeyError: a metric is missing from one of the mappings (named in the message).
        ValueError: a value is not finite, a baseline is 0, or ``scores`` is empty.
    """
    if sign not in ("lower_is_better", "higher_is_better"):
        raise ValueError(f"sign={sign!r} must be 'lower_is_better' or 'higher_is_better'")
    names = set(scores) | set(baselines) | set(higher_is_better)
    if not names:
        raise ValueError("delta_m needs at least one metric; scores is empty")
    for label, mapping in (
        ("scores", scores),
        ("baselines", baselines),
        ("higher_is_better", higher_is_better),
    ):
        missing = sorted(names - set(mapping))
        if missing:
            raise KeyError(
                f"metric(s) {missing} missing from {label}; scores, baselines and "
                "higher_is_better must name the same metrics"
            )
    total = 0.0
    for name in sorted(names):
        score, base, higher = scores[name], baselines[name], higher_is_better[name]
        if not isinstance(higher, bool):
            raise ValueError(f"higher_is_better[{name!r}]={higher!r} must be True or False")
        for label, value in (("score", score), ("baseline", base)):
            if not math.isfinite(float(value)):
                raise ValueError(f"{label} of metric {name!r} is {value}; it must be finite")
        if float(base) == 0.0:
            raise ValueError(
                f"baseline of metric {name!r} is 0, so its relative change is undefined; "
                "leave the metric out of Δm or report it in another unit"
            )
        change = (float(score) - float(base)) / float(base)
        total += -change if higher else change
    value = 100.0 * total / len(names)
    return value if sign == "lower_is_better" else -value
