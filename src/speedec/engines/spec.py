"""Engine specs: an engine and its options named in one word, such as ``speed+correction+guesses=2``.

A spec is an engine name followed by options joined with ``+``. The words
each engine takes are listed below: a flag (``correction``) turns an option
on, ``word=N`` sets an integer option. Benchmark and study rows are written
this way on the command line, and a server can take the same words.
The engine itself still checks the values (``guesses=0`` is refused when the
engine is built, with the engine's own message).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import GenerationError
from . import ENGINES, Engine, engine_class

# Per engine: spec word -> engine option set to True.
FLAGS: dict[str, dict[str, str]] = {
    "speed": {"correction": "early_correction", "adaptive": "adaptive"},
}
# Per engine: spec word (written word=N) -> integer engine option.
COUNTS: dict[str, dict[str, str]] = {
    "speed": {"guesses": "guesses"},
}


@dataclass(frozen=True)
class EngineVariant:
    """What a spec names."""

    # The registered engine name, e.g. "speed".
    engine: str
    # Keyword options for the engine, e.g. {"early_correction": True, "guesses": 2}.
    options: dict = field(default_factory=dict)


def parse_engine_spec(spec: str, engines: Mapping[str, type[Engine]] = ENGINES) -> EngineVariant:
    """The engine and options of ``spec``; a GenerationError names what is wrong.

    ``engines`` restricts the engines a caller offers (all of them by default).
    """
    name, *words = spec.split("+")
    engine_class(name, engines)
    flags, counts = FLAGS.get(name, {}), COUNTS.get(name, {})
    options: dict = {}
    for word in words:
        key, sep, value = word.partition("=")
        if sep and key in counts:
            if not value.isdigit():
                raise GenerationError(f"{key} must be an integer in {spec!r}, got {value!r}")
            options[counts[key]] = int(value)
        elif not sep and word in flags:
            options[flags[word]] = True
        else:
            choices = [*flags, *(f"{c}=N" for c in counts)]
            hint = f"choose from: {', '.join(choices)}" if choices else "it takes none"
            raise GenerationError(f"unknown {name} option {word!r} in {spec!r}; {hint}")
    return EngineVariant(name, options)
