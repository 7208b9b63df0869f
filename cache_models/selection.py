"""Choosing among fitted methods by what leave-one-out said about them: the one rule `method=auto`
uses in the service and `shotcache eval` reports (callers never re-implement it)."""

from __future__ import annotations

from collections.abc import Mapping

from .tuning import TuneReport

ZERO_SHOT = "zero-shot"


def pick_best(reports: Mapping[str, TuneReport | None]) -> str | None:
    """The name with the lowest calibrated leave-one-out cross-entropy (ties to 1e-6: higher LOO
    accuracy, then the earlier name), or None when leave-one-out scored no cache method (one shot per
    class): zero-shot would then win by default, not by comparison. `None` reports (fitted with given
    hyper-parameters, not tuned) and unscored ones take no part."""
    scored = {
        name: report
        for name, report in reports.items()
        if report is not None and report.nll is not None and report.accuracy is not None
    }
    if not set(scored) - {ZERO_SHOT}:
        return None
    order = list(reports)
    return min(
        scored,
        key=lambda n: (round(scored[n].nll or 0.0, 6), -(scored[n].accuracy or 0.0), order.index(n)),
    )
