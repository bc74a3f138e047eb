"""Ouro checkpoints: import against the golden fixture (tests/data/ouro-tiny), exact
decoding, sharded and broken checkpoints, chat and export (issue 13)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from helpers import check_speed_on_random_prompt, random_model, vary_norm_gains
from speedec import LoopedLM, ModelLoadError, chat_prompt, export_hf, generate
from speedec.cache import KVCache
from speedec.cli import cli
from speedec.tokenizer import load_tokenizer, render_chat
from test_engines import configs

FIXTURE = Path(__file__).parent / "data" / "ouro-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """This tiny model's products are just big enough for PyTorch to split them over
    threads, which only adds waiting (badly so on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref():
    return load_file(str(FIXTURE / "reference.safetensors"))


@pytest.fixture(scope="module")
def model():
    return LoopedLM.from_pretrained(FIXTURE)


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_config_mapping(model):
    c = model.config
    assert (c.architecture, c.n_unique_layers, c.n_loops, c.exit_loop) == ("ouro", 3, 4, 1)
    assert (c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) == (64, 4, 2, 16, 96)
    assert (c.vocab_size, c.max_seq_len, c.rope_theta, c.norm_eps, c.tie_embeddings) == (300, 128, 10000.0, 1e-6,
                                                                                         False)
    assert LoopedLM.from_pretrained(FIXTURE, exit_loop=2).config.exit_loop == 2
    # The default architecture stays out of a speedec config file.
    assert "architecture" not in c.replace(architecture="llama").to_dict()


@pytest.mark.parametrize("prompt", ["a", "b"])
def test_logits_after_every_loop_match_reference(model, ref, prompt):
    ids = ref[f"{prompt}.prompt_ids"][None]
    with torch.no_grad():
        out = model(ids, output_loops=(1, 2, 3))
        forward = torch.stack([out.loop_logits[1][0], out.loop_logits[2][0], out.loop_logits[3][0], out.logits[0]])
        states = model.loop_states(ids)
        readout = model.head(states)[:, 0]
        lam, p = model.exit_probabilities(states)
        gate = model.exit_gate(states).squeeze(-1)[:, 0]
    expected = ref[f"{prompt}.loop_logits"]
    torch.testing.assert_close(forward, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(readout, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(gate, ref[f"{prompt}.gate_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(p[:, 0], ref[f"{prompt}.exit_pdf"], atol=1e-6, rtol=0)
    torch.testing.assert_close(lam[:, 0], torch.sigmoid(ref[f"{prompt}.gate_logits"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(p.sum(0), torch.ones_like(p[0]))
    if prompt == "a":
        torch.testing.assert_close(states[:, 0], ref["a.loop_hidden"], atol=1e-5, rtol=0)


def test_incremental_decoding_through_the_cache_matches_reference(model, ref):
    """The engines' cache path (prefill, then one token at a time, loop by loop)."""
    prompt, greedy = ref["a.prompt_ids"].tolist(), ref["a.greedy_ids"].tolist()
    T, L = len(prompt), model.config.n_loops
    cache = KVCache(model.config, 32, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        x = model.embed(torch.tensor([prompt]))
        x = model.run_loops(x, model.layout([list(range(T))], [0]), cache, L)
        assert int(model.head(x[0, -1]).argmax()) == greedy[0]
        for i in range(6):
            x = model.embed(torch.tensor([[greedy[i]]]))
            per_loop = []
            for loop in range(L):
                x = model.run_loops(x, model.layout([[T + i]], [loop]), cache, 1)
                per_loop.append(model.head(x[0, 0]))
            torch.testing.assert_close(torch.stack(per_loop), ref["a.incremental_loop_logits"][i], atol=1e-5, rtol=0)
            torch.testing.assert_close(per_loop[-1], ref["a.incremental_full_logits"][i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompt", ["a", "b"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_engines_reproduce_reference_greedy_ids(ref, prompt, dtype):
    model = LoopedLM.from_pretrained(FIXTURE, dtype=dtype)
    ids, greedy = ref[f"{prompt}.prompt_ids"].tolist(), ref[f"{prompt}.greedy_ids"].tolist()
    for engine, options in (("autoregressive", {}), ("speed", {}), ("speed", {"early_correction": True}),
                            ("speed", {"guesses": 2}), ("self-speculative", {"draft_tokens": 3})):
        assert generate(model, ids, 7, engine=engine, **options).tokens == greedy, (engine, options)


def test_speed_equals_autoregressive_float64_on_fixture(ref):
    accepted = rejected = 0
    for exit_loop in (1, 2, 3):
        model = LoopedLM.from_pretrained(FIXTURE, dtype=torch.float64, exit_loop=exit_loop)
        for prompt in ("a", "b"):
            ids = ref[f"{prompt}.prompt_ids"].tolist()
            expected = generate(model, ids, 48, engine="autoregressive").tokens
            for options in ({}, {"early_correction": True, "guesses": 3}):
                out = generate(model, ids, 48, engine="speed", **options)
                assert out.tokens == expected, (exit_loop, prompt, options)
                accepted += out.stats.drafts_accepted
                rejected += out.stats.drafts_rejected
    assert accepted > 0 and rejected > 0  # both paths of the pipeline were taken


def ouro_configs():
    """test_engines' random configs, as Ouro-style models."""
    return configs().map(lambda c: c.replace(architecture="ouro", loop_embedding=False, exit_readout_rank=None))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=ouro_configs(), seed=st.integers(0, 2**16), data=st.data())
def test_speed_equals_autoregressive_float64_random_ouro(config, seed, data):
    model = random_model(config, seed=seed, std=data.draw(st.sampled_from([0.3, 0.7, 1.5])),
                         residual_scale=data.draw(st.sampled_from([1.0, 4.0, 10.0])))
    vary_norm_gains(model, seed)  # the sandwich norms included
    check_speed_on_random_prompt(model, seed, data)


def _copy_fixture(tmp_path: Path, *, weights: bool = True) -> Path:
    out = tmp_path / "ouro"
    out.mkdir()
    for name in ("config.json", *TOKENIZER_FILES, *(("model.safetensors",) if weights else ())):
        shutil.copy(FIXTURE / name, out / name)
    return out


def _shard(tmp_path: Path) -> Path:
    """The fixture's tensors split into two files plus an index."""
    out = _copy_fixture(tmp_path, weights=False)
    tensors = load_file(str(FIXTURE / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def test_sharded_checkpoint_loads_like_single_file(tmp_path, model):
    sharded = LoopedLM.from_pretrained(_shard(tmp_path))
    single = model.state_dict()
    for name, tensor in sharded.state_dict().items():
        assert torch.equal(tensor, single[name]), name


def _missing_shard(tmp_path):
    out = _shard(tmp_path)
    (out / "model-00002-of-00002.safetensors").unlink()
    return out, "model-00002-of-00002.safetensors"


def _wrong_shape(tmp_path):
    out = _copy_fixture(tmp_path)
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 95)
    save_file(tensors, str(out / "model.safetensors"))
    return out, "model.safetensors"


def _edit_config(tmp_path, edit):
    out = _copy_fixture(tmp_path)
    data = json.loads((out / "config.json").read_text())
    edit(data)
    (out / "config.json").write_text(json.dumps(data))
    return out, "config.json"


@pytest.mark.parametrize("broken, message", [
    (_missing_shard, "is missing"),
    (_wrong_shape, "has shape (64, 95)"),
    (lambda tmp: _edit_config(tmp, lambda d: d.update(model_type="ouroboros")), "model_type 'ouroboros'"),
    (lambda tmp: _edit_config(tmp, lambda d: d.pop("total_ut_steps")), "no total_ut_steps"),
    (lambda tmp: (_edit_config(tmp, lambda d: d.update(num_hidden_layers=4))[0], "model.safetensors"),
     "lacks tensor(s): model.layers.3"),
])
def test_bad_checkpoint_is_one_line_error_naming_the_file(tmp_path, broken, message):
    directory, file = broken(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        LoopedLM.from_pretrained(directory)
    text = str(info.value)
    assert message in text and file in text and "\n" not in text
    code, stdout, err = run("generate", "--model", directory, "--prompt-ids", "1,2")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert message in err and file in err and "Traceback" not in err + stdout


def test_export_round_trip_is_bit_exact(tmp_path, model):
    out = export_hf(model, tmp_path / "export")
    written, original = load_file(str(out / "model.safetensors")), load_file(str(FIXTURE / "model.safetensors"))
    assert sorted(written) == sorted(original)
    for name, tensor in original.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    again = LoopedLM.from_pretrained(out)
    assert again.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    # speedec's own format keeps the architecture too.
    model.save_pretrained(tmp_path / "native")
    native = LoopedLM.from_pretrained(tmp_path / "native")
    assert native.config == model.config
    assert json.loads((tmp_path / "native" / "config.json").read_text())["architecture"] == "ouro"


def test_chat_template_and_im_end(ref):
    messages = [{"role": "system", "content": "Hi"}, {"role": "user", "content": "2+2?"}]
    assert chat_prompt(FIXTURE, messages) == ref["b.prompt_ids"].tolist()
    assert render_chat(FIXTURE, "2+2?") == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    # generation_config.json says eos = 0 (the upstream mistake); a chat turn ends at <|im_end|>.
    assert json.loads((FIXTURE / "generation_config.json").read_text())["eos_token_id"] == 0
    assert load_tokenizer(FIXTURE, 300).eos_token_id == 2


def test_cli_chat_stops_at_im_end(tmp_path, model):
    """A copy of the fixture whose head prefers <|im_end|> after a few tokens: --chat
    applies the template and generation stops there."""
    ids = chat_prompt(FIXTURE, "2+2?")
    first = generate(model, ids, 3, engine="autoregressive").tokens
    changed = LoopedLM.from_pretrained(FIXTURE)
    with torch.no_grad():  # <|im_end|> reads like the third token, twice as loud
        changed.lm_head[2] = 2 * changed.lm_head[first[2]]
    expected = generate(changed, ids, 20, engine="autoregressive", eos_token_id=2)
    assert expected.stop_reason == "eos" and expected.tokens[-1] == 2
    out = export_hf(changed, tmp_path / "chat")
    for name in TOKENIZER_FILES:
        shutil.copy(FIXTURE / name, out / name)
    code, stdout, err = run("generate", "--model", out, "--chat", "2+2?", "--max-new-tokens", 20, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["prompt_ids"] == ids
    assert result["tokens"] == expected.tokens and result["stop_reason"] == "eos"
    assert result["text"].endswith("<|im_end|>")


def test_cli_exit_loop(tmp_path):
    code, stdout, err = run("generate", "--model", FIXTURE, "--prompt-ids", "1,2", "--exit-loop", 3,
                            "--max-new-tokens", 4, "--json")
    assert code == 0, err
    assert json.loads(stdout)["tokens"] == generate(LoopedLM.from_pretrained(FIXTURE), [1, 2], 4,
                                                    engine="autoregressive").tokens
    code, _, err = run("generate", "--model", FIXTURE, "--prompt-ids", "1,2", "--exit-loop", 4)
    assert code == 2 and "exit_loop" in err and err.count("\n") == 1
    code, _, err = run("generate", "--model", FIXTURE, "--prompt-ids", "1,2", "--chat")
    assert code == 2 and "--chat" in err
