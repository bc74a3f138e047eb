"""--model takes a Hugging Face model id: found in the local Hugging Face cache (laid out
here on disk, never fetched), downloaded when online, a one-line error when offline."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from click.testing import CliRunner
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError

from speedec.bundled import HUB_FILES, hub_reference, resolve_model_dir
from speedec.cli import cli
from speedec.errors import ModelLoadError

FIXTURE = Path(__file__).parent / "data" / "ouro-tiny"
REPO = "speedec-test/ouro-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# What a download of the fixture's repository would bring (no README, no reference outputs).
FILES = ("config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
         "tokenizer.json", "tokenizer_config.json")


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _no_network(*args, **kwargs):
    raise AssertionError("a test reached for the Hugging Face Hub")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding REPO at COMMIT (refs/main names it), online mode, and
    a Hub that fails the test if asked."""
    cache = tmp_path / "hf" / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in FILES:
        shutil.copy(FIXTURE / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    # huggingface_hub reads its environment when imported: set both.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", _no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", _no_network)
    return snapshot


@pytest.mark.parametrize("text, expected", [
    ("ByteDance/Ouro-1.4B", ("ByteDance/Ouro-1.4B", None)),
    ("owner/name@main", ("owner/name", "main")),
    ("owner/name@refs/pr/1", ("owner/name", "refs/pr/1")),
    ("owner/my_model.v2", ("owner/my_model.v2", None)),
    ("name", None),
    ("/abs/path", None),
    ("./models/tiny", None),
    ("~/models", None),
    ("a/b/c", None),
    ("owner/name@", None),
    ("owner/a--b", None),
    ("owner/a..b", None),
])
def test_what_reads_as_a_hub_id(text, expected):
    assert hub_reference(text) == expected


def test_allow_patterns_take_weights_config_tokenizer_and_chat_files_not_code():
    from huggingface_hub.utils import filter_repo_objects

    files = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
             "modeling_ouro.py", "README.md", "pytorch_model.bin", "original/model.safetensors"]
    kept = list(filter_repo_objects(files, allow_patterns=HUB_FILES, ignore_patterns=["*/*"]))
    assert kept == files[:8]


def test_cache_hit_loads_and_generates(hub_cache):
    assert resolve_model_dir(REPO) == hub_cache
    assert resolve_model_dir(f"{REPO}@{COMMIT}") == hub_cache
    assert resolve_model_dir(f"{REPO}@main") == hub_cache
    code, stdout, err = run("generate", "--model", REPO, "--prompt-ids", "1,2", "--max-new-tokens", 3)
    assert code == 0, err
    assert (code, stdout) == run("generate", "--model", FIXTURE, "--prompt-ids", "1,2", "--max-new-tokens", 3)[:2]
    code, stdout, err = run("generate", "--model", REPO, "--prompt-ids", "1,2", "--max-new-tokens", 3, "--json")
    assert code == 0 and len(json.loads(stdout)["tokens"]) == 3


def test_cache_hit_with_a_chat_message(hub_cache):
    """--chat prints the user's message on a line of its own, then the answer."""
    code, stdout, err = run("generate", "--model", REPO, "--chat", "2+2?", "--max-new-tokens", 4)
    assert code == 0, err
    assert stdout.startswith("2+2?\n") and len(stdout) > len("2+2?\n\n")


def test_offline_cache_hit(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_dir(REPO) == hub_cache


def test_offline_miss_is_one_line_naming_the_id_and_hf_hub_offline(hub_cache, monkeypatch):
    # Set after huggingface_hub was imported: speedec reads it when it resolves.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model in ("speedec-test/absent", f"{REPO}@v9"):
        with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as info:
            resolve_model_dir(model)
        assert model in str(info.value) and "\n" not in str(info.value)
        code, stdout, err = run("generate", "--model", model, "--prompt-ids", "1,2", "--max-new-tokens", 3)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
        assert model in err and "HF_HUB_OFFLINE" in err and "Traceback" not in err + stdout


def test_hub_out_of_reach_is_one_line(hub_cache, monkeypatch):
    """Online, a miss downloads; when the Hub cannot be reached the error says so in one line."""
    asked = []

    def unreachable(repo_id, **kwargs):
        asked.append(kwargs)
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ModelLoadError) as info:
        resolve_model_dir("speedec-test/absent")
    message = str(info.value)
    assert "speedec-test/absent" in message and "HF_HUB_OFFLINE" in message and "\n" not in message
    # the cache first, then a download, both of the same files
    assert [a.get("local_files_only", False) for a in asked] == [True, False]
    assert all(a["allow_patterns"] == HUB_FILES for a in asked)


def test_missing_paths_keep_the_directory_error(hub_cache, tmp_path, monkeypatch):
    for model in (tmp_path / "missing", "./missing/model", "a/b/c"):
        code, _, err = run("generate", "--model", model, "--prompt-ids", "1")
        assert code == 2 and "does not exist" in err and err.count("\n") == 1
    # an existing directory that reads like an id is a directory
    local = tmp_path / "speedec-test" / "ouro-tiny"
    shutil.copytree(hub_cache, local)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir(REPO) == Path(REPO)


def test_console_reads_the_environment_at_start(hub_cache, tmp_path):
    """A fresh process: huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when imported."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache.parents[2]), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "speedec.cli", "generate", "--model", REPO, "--prompt-ids", "1,2",
               "--max-new-tokens", "3", "--engine", "autoregressive"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stderr and "no drafts" in proc.stderr
    proc = subprocess.run(command[:5] + ["speedec-test/absent"] + command[6:], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "speedec-test/absent" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
