"""``GET /metrics``: the scheduler's counters in Prometheus text format."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and not (
        isinstance(value, float) and not math.isfinite(value))


# scheduler.metrics() key -> (Prometheus name, type, help)
_METRICS = {
    "requests_total": ("speedec_requests_total", "counter", "Requests accepted by the scheduler."),
    "tokens_total": ("speedec_tokens_total", "counter", "Tokens generated (verified) for all requests."),
    "steps_total": ("speedec_steps_total", "counter", "Scheduler steps (one batched pass over the layers each)."),
    "rows_total": ("speedec_rows_total", "counter", "Rows run, summed over steps."),
    "step_seconds_total": ("speedec_step_seconds_total", "counter", "Seconds spent in scheduler steps."),
    "drafts_launched": ("speedec_drafts_launched_total", "counter", "Guesses launched from the early exit."),
    "drafts_accepted": ("speedec_drafts_accepted_total", "counter", "Guesses that verification kept."),
    "drafts_rejected": ("speedec_drafts_rejected_total", "counter", "Guesses that verification replaced."),
    "requests_failed": ("speedec_requests_failed_total", "counter", "Requests that ended with an error."),
    "requests_cancelled": ("speedec_requests_cancelled_total", "counter",
                           "Requests cancelled (client gone, stop string, shutdown)."),
    "requests_finished": ("speedec_requests_finished_total", "counter", "Requests that ran to their end."),
    "requests_active": ("speedec_requests_active", "gauge", "Requests holding rows now."),
    "queue_depth": ("speedec_queue_depth", "gauge", "Requests waiting for rows."),
}
_NAME = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_text(values: Mapping[str, Any]) -> str:
    """Prometheus text exposition (format 0.0.4) of ``scheduler.metrics()``, with two derived
    gauges: draft acceptance (accepted / verified, the engines' definition) and rows per step; keys this module
    does not know are exported as ``speedec_<key>`` (a counter when the key ends in
    ``_total``, else a gauge)."""
    def number(key: str) -> float:
        value = values.get(key, 0)
        return float(value) if _is_number(value) else 0.0

    lines: list[str] = []

    def emit(name: str, kind: str, help_text: str, value: float) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_format(value)}"])

    for key, (name, kind, help_text) in _METRICS.items():
        emit(name, kind, help_text, number(key))
    verified, steps = number("drafts_accepted") + number("drafts_rejected"), number("steps_total")
    emit("speedec_draft_acceptance", "gauge", "Fraction of verified guesses kept (0 before any).",
         number("drafts_accepted") / verified if verified else 0.0)
    emit("speedec_rows_per_step", "gauge", "Mean rows per scheduler step (0 before any step).",
         number("rows_total") / steps if steps else 0.0)
    for key in sorted(set(values) - set(_METRICS)):
        if _is_number(values[key]) or isinstance(values[key], bool):
            name = "speedec_" + _NAME.sub("_", str(key))
            emit(name, "counter" if name.endswith("_total") else "gauge", f"Scheduler metric {key}.",
                 float(values[key]))
    return "\n".join(lines) + "\n"


def _format(value: float) -> str:
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    if value == int(value) and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(float(value))
