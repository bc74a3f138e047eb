"""The model bundled with the package: `speedec generate "..."` works right after install."""

import json

from click.testing import CliRunner

from speedec import LoopedLM
from speedec.bundled import bundled_model_dir
from speedec.cli import cli
from speedec.tokenizer import BPETokenizer, load_tokenizer


def test_bundled_model_is_present_and_loads():
    directory = bundled_model_dir()
    assert directory is not None, "the package ships no default model"
    model = LoopedLM.from_pretrained(directory)
    c = model.config
    assert (c.n_unique_layers, c.n_loops, c.exit_loop, c.exit_readout_rank) == (2, 4, 2, 64)
    tok = load_tokenizer(directory, c.vocab_size)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == c.vocab_size
    text = "Once upon a time, in a land far away."
    assert tok.decode(tok.encode(text)) == text
    size = sum(p.stat().st_size for p in directory.iterdir())
    assert size < 30e6


def test_generate_without_model_uses_bundled_and_engines_agree():
    outputs = {}
    for engine in ("speed", "autoregressive"):
        result = CliRunner().invoke(cli, ["generate", "Once upon a time", "--max-new-tokens", "24",
                                          "--engine", engine, "--dtype", "float64", "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["text"] and data["stats"]["new_tokens"] >= 1
        outputs[engine] = data["tokens"]
    assert outputs["speed"] == outputs["autoregressive"]
