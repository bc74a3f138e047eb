"""Engine specs (``speed+correction+guesses=2``) and the engine registry's checks."""

import pytest

from speedec import ENGINES, PRESETS, GenerationError, LoopedLM
from speedec.engines import engine_class
from speedec.engines.spec import EngineVariant, parse_engine_spec


@pytest.mark.parametrize("spec,engine,options", [
    ("speed", "speed", {}),
    ("autoregressive", "autoregressive", {}),
    ("self-speculative", "self-speculative", {}),
    ("speed+correction", "speed", {"early_correction": True}),
    ("speed+guesses=2", "speed", {"guesses": 2}),
    ("speed+adaptive", "speed", {"adaptive": True}),
    ("speed+correction+guesses=12+adaptive", "speed",
     {"early_correction": True, "guesses": 12, "adaptive": True}),
])
def test_good_specs(spec, engine, options):
    assert parse_engine_spec(spec) == EngineVariant(engine, options)


@pytest.mark.parametrize("spec,message", [
    ("beam", "unknown engine 'beam'; choose one of: autoregressive, speed, self-speculative"),
    ("", "unknown engine ''"),
    ("beam+correction", "unknown engine 'beam'"),
    ("speed+beam", "unknown speed option 'beam' in 'speed+beam'; choose from: correction, adaptive, guesses=N"),
    ("speed+", "unknown speed option ''"),
    ("speed+guesses=x", "guesses must be an integer in 'speed+guesses=x', got 'x'"),
    ("speed+guesses=-1", "guesses must be an integer"),
    ("speed+guesses", "unknown speed option 'guesses'"),
    ("speed+correction=2", "unknown speed option 'correction=2'"),
    ("autoregressive+correction", "unknown autoregressive option 'correction'"),
])
def test_bad_specs(spec, message):
    with pytest.raises(GenerationError, match="^" + message.replace("+", r"\+")):
        parse_engine_spec(spec)


def test_specs_limited_to_the_engines_offered():
    offered = {"autoregressive": ENGINES["autoregressive"], "speed": ENGINES["speed"]}
    assert parse_engine_spec("speed+correction", offered).engine == "speed"
    with pytest.raises(GenerationError, match="unknown engine 'self-speculative'; choose one of: autoregressive, speed$"):
        parse_engine_spec("self-speculative", offered)


def test_engine_class():
    for name, cls in ENGINES.items():
        assert engine_class(name) is cls
    with pytest.raises(GenerationError, match="unknown engine 'beam'"):
        engine_class("beam")
    with pytest.raises(GenerationError, match="unknown engine"):
        engine_class(["speed"])  # unhashable: still a GenerationError


def test_create_checks_options_by_name():
    model = LoopedLM.random(PRESETS["tiny"], seed=0)
    assert ENGINES["autoregressive"].option_names() == frozenset()
    assert ENGINES["self-speculative"].option_names() == {"draft_tokens"}
    assert {"early_correction", "guesses", "adaptive"} <= ENGINES["speed"].option_names()
    for name, bad in (("autoregressive", "early_correction"), ("speed", "draft_tokens"),
                      ("self-speculative", "guesses")):
        with pytest.raises(GenerationError, match=f"^engine '{name}' takes no option '{bad}'$"):
            ENGINES[name].create(model, **{bad: 1})
    # The first unknown option is named; valid ones are passed on to the engine, which checks them.
    with pytest.raises(GenerationError, match="takes no option 'x'"):
        ENGINES["speed"].create(model, guesses=2, x=1, y=2)
    assert ENGINES["self-speculative"].create(model, draft_tokens=2).draft_tokens == 2
    with pytest.raises(GenerationError, match="guesses must be an integer from 1"):
        ENGINES["speed"].create(model, guesses=0)


def test_an_engine_taking_any_option_is_not_second_guessed():
    class Permissive(ENGINES["autoregressive"]):
        name = "permissive"

        def __init__(self, model, **options):
            super().__init__(model)
            self.options = options

    model = LoopedLM.random(PRESETS["tiny"], seed=0)
    assert Permissive.option_names() is None
    assert Permissive.create(model, anything=1).options == {"anything": 1}
