import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from speedec.cli import cli


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tiny"
    code, stdout, _ = run("init", "--preset", "tiny", "--out", out, "--seed", 1, "--residual-scale", 20)
    assert code == 0, stdout
    return out


def test_init_then_generate_engines_agree(tiny):
    outputs = {}
    for engine in ("speed", "autoregressive"):
        code, stdout, _ = run("generate", "--model", tiny, "--prompt-ids", "72,105,33", "--max-new-tokens", 24,
                              "--engine", engine, "--json")
        assert code == 0
        data = json.loads(stdout)
        assert len(data["tokens"]) == 24 and data["stats"]["new_tokens"] == 24
        assert data["engine"] == engine and isinstance(data["text"], str)
        outputs[engine] = data["tokens"]
    assert outputs["speed"] == outputs["autoregressive"]
    code, stdout, _ = run("generate", "--model", tiny, "--prompt-ids", "72,105,33", "--max-new-tokens", 24,
                          "--early-correction", "--adaptive", "--guesses", 3, "--json")
    assert code == 0 and json.loads(stdout)["tokens"] == outputs["speed"]


def test_text_prompt_plain_and_stream(tiny):
    code, plain, _ = run("generate", "--model", tiny, "--prompt", "Hello", "--max-new-tokens", 12)
    assert code == 0
    code, streamed, _ = run("generate", "Hello", "--model", tiny, "--max-new-tokens", 12, "--stream")
    assert code == 0 and streamed == plain


def test_init_refuses_to_overwrite(tiny):
    code, _, err = run("init", "--preset", "tiny", "--out", tiny)
    assert code == 2 and "already holds a model" in err


@pytest.mark.parametrize("args,message", [
    (["--engine", "beam", "--prompt-ids", "1,2"], "unknown engine 'beam'"),
    (["--prompt-ids", "1,300"], "outside the vocabulary"),
    (["--prompt-ids", "1,x"], "'x' is not an integer"),
    (["--prompt-ids", ""], "comma-separated integers"),
    (["--prompt", ""], "empty"),
    (["--prompt-ids", "1", "--max-new-tokens", "100000"], "max_seq_len"),
    (["--prompt-ids", "1", "--max-new-tokens", "0"], "max_new_tokens"),
    ([], "exactly one of"),
    (["--prompt-ids", "1", "--guesses", "0"], "guesses must be an integer from 1"),
    (["--prompt-ids", "1", "--engine", "autoregressive", "--early-correction"],
     "takes no option 'early_correction'"),
    (["--prompt-ids", "1", "--bogus"], "No such option"),
])
def test_bad_generate_input_is_one_line_exit_2(tiny, args, message):
    code, stdout, err = run("generate", "--model", tiny, *args)
    assert code == 2
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    assert "Traceback" not in err + stdout


def test_unreadable_model_dir(tmp_path):
    code, _, err = run("generate", "--model", tmp_path / "missing", "--prompt-ids", "1")
    assert code == 2 and "does not exist" in err
    (tmp_path / "config.json").write_text("garbage")
    code, _, err = run("generate", "--model", tmp_path, "--prompt-ids", "1")
    assert code == 2 and "not valid JSON" in err and err.count("\n") == 1


def test_impossible_init_config(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(dict(vocab_size=10, d_model=18, n_heads=4, n_kv_heads=2, ffn_dim=8,
                                   n_unique_layers=1, n_loops=2)))
    code, _, err = run("init", "--config", cfg, "--out", tmp_path / "m")
    assert code == 2 and "divisible by n_heads" in err
    code, _, err = run("init", "--preset", "nope", "--out", tmp_path / "m")
    assert code == 2 and "unknown preset" in err


def test_export_hf_command(tiny, tmp_path):
    code, stdout, _ = run("export-hf", tiny, tmp_path / "hf")
    assert code == 0 and "6 layers" in stdout
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 6


@pytest.mark.skipif(shutil.which("speedec") is None, reason="console script not installed")
def test_console_script_exit_code(tmp_path):
    proc = subprocess.run(["speedec", "generate", "--model", str(tmp_path), "--prompt-ids", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    proc = subprocess.run([sys.executable, "-m", "speedec.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "speedec" in proc.stdout


def test_generate_prints_the_prompt_then_a_stats_line(tiny):
    """stdout: the prompt and its continuation; stderr: one line of tokens/s, steps per
    token and acceptance (none with --quiet, whose stdout is the same)."""
    code, stdout, err = run("generate", "--model", tiny, "Hello", "--max-new-tokens", 12)
    assert code == 0 and stdout.startswith("Hello") and len(stdout) > len("Hello\n")
    assert err.count("\n") == 1 and err.startswith("speed: 12 tokens, ")
    assert "tokens/s" in err and "steps/token" in err and "of drafts accepted" in err
    code, quiet, err = run("generate", "--model", tiny, "Hello", "--max-new-tokens", 12, "--quiet")
    assert code == 0 and quiet == stdout and err == ""
    code, _, err = run("generate", "--model", tiny, "Hello", "--max-new-tokens", 12, "--engine", "autoregressive")
    assert code == 0 and err.startswith("autoregressive: 12 tokens, ") and err.endswith("no drafts\n")
    # --prompt-ids prints the continuation alone, as text when there is a tokenizer
    code, ids_out, _ = run("generate", "--model", tiny, "--prompt-ids", "72,101,108,108,111", "--max-new-tokens", 12)
    assert code == 0 and stdout == "Hello" + ids_out
    # --json: one JSON object on stdout and no stats line
    code, stdout, err = run("generate", "--model", tiny, "Hello", "--max-new-tokens", 12, "--json")
    assert code == 0 and json.loads(stdout)["stats"]["new_tokens"] == 12 and err == ""
