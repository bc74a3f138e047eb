import json

import pytest
import torch

from helpers import random_model, small_config
from speedec import LoopedLM, ModelLoadError, generate
from speedec.storage import CONFIG_FILE, WEIGHTS_FILE


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip(tmp_path, tie):
    model = random_model(small_config(tie_embeddings=tie), dtype=torch.float32)
    model.save_pretrained(tmp_path / "m")
    loaded = LoopedLM.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert generate(loaded, [1, 2], 10).tokens == generate(model, [1, 2], 10).tokens
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_load_in_float64(tmp_path):
    random_model(small_config(), dtype=torch.float32).save_pretrained(tmp_path)
    assert LoopedLM.from_pretrained(tmp_path, dtype=torch.float64).dtype == torch.float64


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LoopedLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        LoopedLM.from_pretrained(tmp_path)
    random_model(small_config()).save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors is missing"):
        LoopedLM.from_pretrained(tmp_path)


def test_truncated_weights(tmp_path):
    random_model(small_config()).save_pretrained(tmp_path)
    data = (tmp_path / WEIGHTS_FILE).read_bytes()
    (tmp_path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors is truncated or corrupt"):
        LoopedLM.from_pretrained(tmp_path)


def test_bad_config_file(tmp_path):
    random_model(small_config()).save_pretrained(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        LoopedLM.from_pretrained(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"vocab_size": 3}))
    with pytest.raises(ModelLoadError, match="not a speedec model config"):
        LoopedLM.from_pretrained(tmp_path)


def test_config_that_does_not_match_weights(tmp_path):
    random_model(small_config()).save_pretrained(tmp_path / "a")
    random_model(small_config(ffn_dim=24)).save_pretrained(tmp_path / "b")
    # weights of b with the config of a: a mixed or interrupted save
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes((tmp_path / "b" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ModelLoadError, match="different config"):
        LoopedLM.from_pretrained(tmp_path / "a")


def test_impossible_config_in_file(tmp_path):
    random_model(small_config()).save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_FILE).read_text())
    data["exit_loop"] = 7
    (tmp_path / CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="exit_loop"):
        LoopedLM.from_pretrained(tmp_path)


def test_failed_save_leaves_previous_model_loadable(tmp_path, monkeypatch):
    model = random_model(small_config(), dtype=torch.float32)
    model.save_pretrained(tmp_path)
    import speedec.storage as storage

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        random_model(small_config(), seed=9).save_pretrained(tmp_path)
    loaded = LoopedLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.embed.weight, model.embed.weight)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
