import json

import pytest

from speedec import PRESETS, ConfigError, ModelConfig
from speedec.config import preset

BASE = dict(vocab_size=10, d_model=16, n_heads=4, n_kv_heads=2, ffn_dim=8, n_unique_layers=2, n_loops=3)


@pytest.mark.parametrize("changes,match", [
    (dict(d_model=18), "divisible by n_heads"),
    (dict(n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(d_model=12, n_heads=4), "must be even"),
    (dict(exit_loop=3), "exit_loop must satisfy"),
    (dict(exit_loop=0), "exit_loop must satisfy"),
    (dict(exit_loop=None), "exit_loop is required"),
    (dict(n_loops=1), "single-loop"),
    (dict(vocab_size=0), "vocab_size must be >= 1"),
    (dict(n_loops=2.0), "n_loops must be an integer"),
    (dict(d_model=True), "d_model must be an integer"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(tie_embeddings="yes"), "tie_embeddings"),
])
def test_impossible_configs_raise(changes, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{**BASE, **changes})
    assert issubclass(ConfigError, ValueError)


def test_single_loop_model_without_exit_is_valid():
    c = ModelConfig(**{**BASE, "n_loops": 1, "exit_loop": None})
    assert not c.has_early_exit and c.n_virtual_layers == 2


def test_dict_round_trip_and_unknown_fields(tmp_path):
    c = ModelConfig(**BASE)
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown config field"):
        ModelConfig.from_dict({**c.to_dict(), "n_layer": 3})
    with pytest.raises(ConfigError, match="missing config field"):
        ModelConfig.from_dict({"vocab_size": 3})
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(path)
    path.write_text(json.dumps(c.to_dict()))
    assert ModelConfig.from_file(path) == c
    with pytest.raises(ConfigError, match="cannot read"):
        ModelConfig.from_file(tmp_path / "missing.json")


def test_config_is_frozen_and_replace_validates():
    c = ModelConfig(**BASE)
    with pytest.raises(AttributeError):
        c.n_loops = 4
    assert c.replace(n_loops=4).n_loops == 4
    with pytest.raises(ConfigError):
        c.replace(exit_loop=5)
    with pytest.raises(ConfigError, match="unknown"):
        c.replace(bogus=1)


def test_presets():
    assert {"tiny", "membound", "membound-deep"} <= set(PRESETS)
    assert preset("membound").n_loops == 4 and preset("membound-deep").n_loops == 8
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
