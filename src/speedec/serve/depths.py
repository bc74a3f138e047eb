"""One model id per depth: a looped model of ``L`` loops is served as ``NAME`` (all
its loops) and as ``NAME@loops=d`` for ``d = 1 .. L - 1`` (its first ``d`` loops),
so that a client such as lm-evaluation-harness evaluates every depth by the
model's name alone (docs/serving.md, "One model id per depth").

A request at depth ``d`` is decoded by the model's view at that depth
(:meth:`speedec.model.LoopedLM.at_depth`: the same weights, ``n_loops = d``,
the early exit at ``min(exit_loop, d - 1)``, none at depth 1): its prefill, its
KV cache and its pipeline are the view's, so it gives what ``speedec.generate``
gives on the view alone. Its rows still share the scheduler's batched step with
every other request's: a step runs each row through its own loop of the shared
layers whatever depth its request stops at, and a row retires when its own
pipeline says so.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError, GenerationError, SpeedecError

# NAME@loops=d: the suffix and what follows it (digits, or anything, which is then refused).
LOOPS_SUFFIX = "@loops="
_DEPTH = re.compile(r"[0-9]+")


class UnknownModel(SpeedecError, LookupError):
    """A request names a model (or a depth of it) that the server does not serve (HTTP 404)."""


def model_ids(name: str, n_loops: int | None) -> list[tuple[str, int]]:
    """The ids a server of model ``name`` with ``n_loops`` loops answers to, as
    ``(id, loops)``: ``name`` at full depth first, then ``name@loops=d`` for
    ``d = 1 .. n_loops - 1`` (``n_loops`` None: ``name`` alone, depth unknown: 0)."""
    if not n_loops:
        return [(name, 0)]
    return [(name, n_loops)] + [(f"{name}{LOOPS_SUFFIX}{d}", d) for d in range(1, n_loops)]


def requested_depth(requested: str | None, name: str, n_loops: int | None, *,
                    any_depth: bool = False) -> int | None:
    """The depth a request's ``model`` asks for: None for ``name`` (or no model: the
    served model at full depth), ``d`` for ``name@loops=d`` with ``1 <= d <= n_loops``
    (``d == n_loops`` is the full model too; ``any_depth``, a recurrent-depth model: any
    ``d >= 1``). Raises :class:`UnknownModel`, one line naming the model, for any other
    name or depth."""
    if requested is None or requested == name:
        return None
    if not requested.startswith(name + LOOPS_SUFFIX):
        raise UnknownModel(f"the model {requested!r} does not exist; this server serves {name!r}"
                           + (f" and {name}{LOOPS_SUFFIX}d for d = 1..{n_loops - 1}" if n_loops and n_loops > 1
                              else ""))
    text = requested[len(name + LOOPS_SUFFIX):]
    depth = int(text) if _DEPTH.fullmatch(text) else None
    if not n_loops or depth is None or depth < 1 or (depth > n_loops and not any_depth):
        known = ("an integer >= 1" if any_depth else f"an integer from 1 to {n_loops}") if n_loops else (
            "not available for this model")
        raise UnknownModel(f"the model {requested!r} does not exist: the depth after {LOOPS_SUFFIX!r} must be "
                           f"{known} ({name} has {n_loops or 'no known number of'} loops)")
    return None if depth == n_loops else depth


def model_at(model: Any, loops: int | None) -> Any:
    """``model`` at depth ``loops`` (None: ``model`` itself), through its ``at_depth``;
    a GenerationError naming ``loops`` when the model has no such depth."""
    if loops is None:
        return model
    at_depth = getattr(model, "at_depth", None)
    if at_depth is None:
        raise GenerationError(f"loops: this model ({type(model).__name__}) cannot run at another depth")
    try:
        return at_depth(loops)
    except ConfigError as exc:
        raise GenerationError(str(exc)) from None
