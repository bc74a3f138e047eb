"""Huginn (recurrent-depth) checkpoints, issue 23: import against the golden fixture made by
the reference code (tests/data/huginn-tiny), exact decoding at any recurrence count with
every engine and the server, refusals, export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from helpers import (  # noqa: F401 (one_thread: a fixture)
    edit_config,
    edit_tensors,
    one_thread,
    random_model,
    run_cli,
    serve_requests,
    vary_norm_gains,
)
from speedec import GenerationError, LoopedLM, ModelConfig, ModelLoadError, export_hf, generate
from speedec.cache import KVCache
from speedec.engines.base import prefill
from speedec.model.rotary import float32_rope_table

FIXTURE = Path(__file__).parent / "data" / "huginn-tiny"
TOL = 1e-4  # float32 against the reference, fixed before the first comparison (issue 23)




@pytest.fixture(scope="module")
def ref():
    return load_file(str(FIXTURE / "reference.safetensors"))




def test_config_mapping():
    model = LoopedLM.from_pretrained(FIXTURE)
    c = model.config
    assert type(model).__name__ == "RecurrentDepthLM"
    assert (c.architecture, c.prelude_layers, c.n_unique_layers, c.coda_layers, c.n_loops) == ("huginn", 1, 3, 2, 4)
    assert (c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size) == (64, 4, 4, 16, 96, 300)
    assert (c.max_seq_len, c.rope_theta, c.norm_eps, c.tie_embeddings, c.qk_bias, c.exit_loop) == (
        128, 10000.0, 1e-6, True, True, 1)
    deeper = LoopedLM.from_pretrained(FIXTURE, loops=32)
    assert (deeper.config.n_loops, deeper.config.exit_loop) == (32, 1)
    assert LoopedLM.from_pretrained(FIXTURE, loops=32, exit_loop=8).config.exit_loop == 8


def test_rotary_table_is_the_checkpoints():
    model = LoopedLM.from_pretrained(FIXTURE)
    stored = load_file(str(FIXTURE / "model.safetensors"))["freqs_cis"]
    half = model.config.head_dim // 2
    assert torch.equal(model.rope[:, 0, :half], stored[0, :, 0, :, 0])
    assert torch.equal(model.rope[:, 1, half:], stored[0, :, 0, :, 1])
    # (here it is also what speedec computes in float32, bit for bit)
    assert torch.equal(model.rope, float32_rope_table(128, 16, 10000.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_readouts_match_reference(ref, dtype):
    """After the prelude, after every recurrence (1..6, past the config's 4: any r runs),
    and through the coda and head, on full sequences."""
    model = LoopedLM.from_pretrained(FIXTURE, dtype=dtype, loops=6)
    D = model.config.d_model
    for key in "ab":
        ids = ref[f"{key}.prompt_ids"][None]
        with torch.no_grad():
            rows = list(model._loops(ids))
        assert len(rows) == 6
        prelude = rows[0][0, :, D: 2 * D].float()
        assert (prelude - ref[f"{key}.prelude_hidden"]).abs().max() < TOL
        for r, row in enumerate(rows):
            logits = model.head(row)[0].float()
            assert (logits - ref[f"{key}.recurrence_logits"][r]).abs().max() < TOL, (key, r)
            latent = model.norm(row[0, :, :D]).float()  # the reference's latent_states: ln_f(state)
            assert (latent - ref[f"{key}.recurrence_latents"][r]).abs().max() < TOL, (key, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_incremental_decoding_matches_reference(ref, dtype):
    """The KV-cache path (prelude, core and coda caches) step by step, and greedy tokens."""
    model = LoopedLM.from_pretrained(FIXTURE, dtype=dtype)
    for key in "ab":
        prompt = ref[f"{key}.prompt_ids"].tolist()
        greedy = ref[f"{key}.greedy_ids"].tolist()
        T, steps = len(prompt), ref[f"{key}.incremental_logits"].shape[0]
        cache = KVCache(model.config, T + steps, dtype=model.dtype)
        with torch.no_grad():
            assert int(prefill(model, cache, prompt).argmax()) == greedy[0]
            for i in range(steps):
                x = model.embed_rows(torch.tensor([[greedy[i]]]))
                x = model.run_loops(x, model.layout([[T + i]], [0]), cache, model.config.n_loops)
                logits = model.head(x[0, 0]).float()
                assert (logits - ref[f"{key}.incremental_logits"][i]).abs().max() < TOL, (key, i)
        assert generate(model, prompt, len(greedy), engine="autoregressive").tokens == greedy


PROMPTS = [[115, 266, 271, 22, 120, 286, 170, 190], [1, 295, 215, 282, 2, 215, 1, 291, 215, 34]]


@pytest.mark.parametrize("loops, exits", [(4, (1, 2, 3)), (8, (2, 4)), (32, (4, 8, 16))])
def test_engines_equal_autoregressive_at_any_depth(loops, exits):
    model = LoopedLM.from_pretrained(FIXTURE, dtype=torch.float64, loops=loops)
    accepted = rejected = 0
    for ids in PROMPTS:
        expected = generate(model, ids, 24, engine="autoregressive").tokens
        for e in exits:
            deep = model.at_depth(loops)
            deep.config = deep.config.replace(exit_loop=e)
            for engine, options in (("speed", {}), ("speed", {"adaptive": True, "step_costs": [1.0] * 32}),
                                    ("self-speculative", {"draft_tokens": 3})):
                out = generate(deep, ids, 24, engine=engine, **options)
                assert out.tokens == expected, (loops, e, engine, options)
                accepted += out.stats.drafts_accepted
                rejected += out.stats.drafts_rejected
    assert accepted > 0 and rejected > 0  # both paths of the pipeline were taken


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_engines_equal_autoregressive_in_every_dtype(dtype):
    model = LoopedLM.from_pretrained(FIXTURE, dtype=dtype, loops=8, exit_loop=2)
    for ids in PROMPTS:
        expected = generate(model, ids, 24, engine="autoregressive").tokens
        for engine, options in (("speed", {}), ("self-speculative", {"draft_tokens": 3})):
            assert generate(model, ids, 24, engine=engine, **options).tokens == expected, (dtype, engine)


def test_server_equals_autoregressive():
    from speedec.serve.requests import ServeRequest

    model = LoopedLM.from_pretrained(FIXTURE, loops=8, exit_loop=2)
    prompts = [list(PROMPTS[i % 2][: 3 + i]) for i in range(6)]
    expected = [generate(model, p, 20, engine="autoregressive").tokens for p in prompts]
    for engine in ("speed", "autoregressive"):
        results, metrics = serve_requests(model, [ServeRequest(p, 20) for p in prompts], concurrency=4,
                                          engine=engine, step_costs=[1.0] * 16)
        assert results == expected, engine
        assert metrics["rows_total"] > metrics["steps_total"]  # rows of several requests shared steps


@pytest.mark.parametrize("engine", ["speed", "autoregressive"])
def test_server_mixed_depths_each_equal_their_depth_alone(engine):
    """Requests at r = 2, 4 (the model's), 8 and 32 share the scheduler's steps; each gives
    what its depth gives alone (the coda runs for a row when its own request's depth ends)."""
    from speedec.serve.depths import requested_depth
    from speedec.serve.requests import ServeRequest

    model = LoopedLM.from_pretrained(FIXTURE)
    depths = [2, None, 8, 32, 8, 2]
    prompts = [list(PROMPTS[i % 2][: 3 + i]) for i in range(len(depths))]
    expected = [generate(model.at_depth(d or 4), p, 16, engine="autoregressive").tokens
                for p, d in zip(prompts, depths)]
    results, metrics = serve_requests(model, [ServeRequest(p, 16, loops=d) for p, d in zip(prompts, depths)],
                                      concurrency=6, engine=engine, step_costs=[1.0] * 64)
    assert results == expected
    assert metrics["rows_total"] > metrics["steps_total"]
    assert requested_depth("hg@loops=64", "hg", 4, any_depth=True) == 64


def huginn_configs():
    return st.builds(
        lambda prelude, coda, core, loops, exit_frac, bias, heads: ModelConfig(
            vocab_size=40, d_model=32, n_heads=heads, n_kv_heads=heads, ffn_dim=48, n_unique_layers=core,
            n_loops=loops, exit_loop=max(1, int(loops * exit_frac)), max_seq_len=96, architecture="huginn",
            prelude_layers=prelude, coda_layers=coda, qk_bias=bias, tie_embeddings=bias),
        st.integers(0, 2), st.integers(0, 2), st.integers(1, 2), st.integers(2, 9), st.sampled_from([0.2, 0.5, 0.8]),
        st.booleans(), st.sampled_from([2, 4]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(config=huginn_configs(), seed=st.integers(0, 2**16), data=st.data())
def test_speed_equals_autoregressive_float64_random_huginn(config, seed, data):
    import random

    model = random_model(config, seed=seed, std=data.draw(st.sampled_from([0.1, 0.3])),
                         residual_scale=data.draw(st.sampled_from([0.3, 1.0, 3.0])))
    vary_norm_gains(model, seed)
    if config.qk_bias:
        with torch.no_grad():
            for layer in model.weight_layers():
                layer.qk_bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    rng = random.Random(seed)
    prompt = [rng.randrange(config.vocab_size) for _ in range(data.draw(st.integers(1, 10)))]
    n_new = data.draw(st.integers(1, 30))
    expected = generate(model, prompt, n_new, engine="autoregressive").tokens
    assert generate(model, prompt, n_new, engine="speed").tokens == expected
    assert generate(model, prompt, n_new, engine="self-speculative", draft_tokens=3).tokens == expected


def test_random_initial_state_is_the_same_for_every_engine():
    """The reference's random start (state_init_scale > 0), drawn per position from a seed:
    it changes the output, and every engine starts each position alike."""
    model = LoopedLM.from_pretrained(FIXTURE, dtype=torch.float64, loops=8)
    zero_start = generate(model, PROMPTS[0], 16, engine="autoregressive").tokens
    model.config = model.config.replace(exit_loop=2, state_init_scale=1.0, state_init_seed=3)
    start = model.initial_state([5, 6])
    std = (2 / (5 * 64)) ** 0.5 * 8.0  # std * sqrt(d_model), truncated at 3 std
    assert 0.5 * std < start.std() < 1.5 * std and start.abs().max() <= 3 * std
    expected = generate(model, PROMPTS[0], 16, engine="autoregressive").tokens
    assert expected != zero_start
    for engine, options in (("speed", {}), ("self-speculative", {"draft_tokens": 3})):
        assert generate(model, PROMPTS[0], 16, engine=engine, **options).tokens == expected
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0] + expected[:-1]])).logits[0]
    assert logits[len(PROMPTS[0]) - 1:].argmax(-1).tolist() == expected


def test_whole_sequence_forward_equals_decoding():
    """The training forward (whole sequence, no cache) reads what decoding reads."""
    model = LoopedLM.from_pretrained(FIXTURE, dtype=torch.float64)
    ids = PROMPTS[0]
    tokens = generate(model, ids, 6, engine="autoregressive").tokens
    with torch.no_grad():
        logits = model(torch.tensor([ids + tokens[:-1]])).logits[0]
    assert logits[len(ids) - 1:].argmax(-1).tolist() == tokens


def test_speed_options_that_read_every_loop_are_refused():
    model = LoopedLM.from_pretrained(FIXTURE)
    for options in ({"early_correction": True}, {"guesses": 2}):
        with pytest.raises(GenerationError, match="recurrent-depth"):
            generate(model, PROMPTS[0], 4, engine="speed", **options)


def _copy(tmp_path: Path) -> Path:
    directory = tmp_path / "huginn"
    shutil.copytree(FIXTURE, directory, ignore=shutil.ignore_patterns("reference.safetensors", "*.py"))
    return directory






@pytest.mark.parametrize("break_it, message", [
    (lambda d: edit_config(d, model_type="huginn_raven_v2"), "model_type 'huginn_raven_v2'"),
    (lambda d: edit_config(d, injection_type="add"), "injection_type 'add' is not supported"),
    (lambda d: edit_config(d, bias=True), "bias True is not supported"),
    (lambda d: edit_config(d, test_time_noise=0.5), "test_time_noise 0.5 is not supported"),
    (lambda d: edit_config(d, num_key_value_heads=2), "num_key_value_heads 2 differs"),
    (lambda d: edit_tensors(d, lambda t: t.pop("transformer.coda.1.mlp.fc.weight")),
     "lacks tensor(s): transformer.coda.1.mlp.fc.weight"),
    (lambda d: edit_tensors(d, lambda t: t.update({"transformer.adapter.weight": torch.zeros(64, 64)})),
     "tensor transformer.adapter.weight has shape (64, 64)"),
    (lambda d: edit_tensors(d, lambda t: t.update({"transformer.core_block.3.norm_1.weight": torch.ones(64)})),
     "no place in speedec for huginn tensor(s) transformer.core_block.3.norm_1.weight"),
    (lambda d: edit_config(d, n_layers_in_recurrent_block=4), "lacks tensor(s)"),
])
def test_broken_checkpoint_is_one_line_error(tmp_path, break_it, message):
    directory = _copy(tmp_path)
    break_it(directory)
    with pytest.raises(ModelLoadError) as info:
        LoopedLM.from_pretrained(directory)
    assert message in str(info.value) and "\n" not in str(info.value)
    code, stdout, err = run_cli("generate", "--model", directory, "--prompt-ids", "1,2")
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err + stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_round_trip_is_bit_exact(tmp_path, dtype):
    model = LoopedLM.from_pretrained(FIXTURE, dtype=dtype)
    out = export_hf(model, tmp_path / "export")
    written, original = load_file(str(out / "model.safetensors")), load_file(str(FIXTURE / "model.safetensors"))
    assert sorted(written) == sorted(original)
    for name, tensor in written.items():
        expected = original[name] if name == "freqs_cis" else original[name].to(dtype)
        assert torch.equal(tensor, expected), name  # the rows' permutation undone exactly
    config, source = json.loads((out / "config.json").read_text()), json.loads((FIXTURE / "config.json").read_text())
    for key in ("model_type", "n_embd", "n_heads", "intermediate_size", "n_layers_in_prelude",
                "n_layers_in_recurrent_block", "n_layers_in_coda", "mean_recurrence", "qk_bias", "block_size",
                "vocab_size", "tie_embeddings", "rope_base", "norm_eps"):
        assert config[key] == source[key], key
    again = LoopedLM.from_pretrained(out)
    assert again.config == model.config
    assert all(torch.equal(again.state_dict()[n], t) for n, t in model.state_dict().items())
    model.save_pretrained(tmp_path / "native")  # speedec's own format keeps it too
    native = LoopedLM.from_pretrained(tmp_path / "native", dtype=dtype)
    assert native.config == model.config
    ids = PROMPTS[0]
    assert generate(native, ids, 8).tokens == generate(model, ids, 8).tokens


def test_cli_generate_at_any_depth():
    for engine in ("speed", "autoregressive"):
        code, stdout, err = run_cli("generate", "--model", FIXTURE, "--prompt-ids", "115,266,271", "--loops", "32",
                                "--exit-loop", "8", "--max-new-tokens", "6", "--engine", engine, "--json")
        assert code == 0, err
        out = json.loads(stdout)
        assert out["stats"]["steps_per_token"] == 32.0 or engine == "speed"
        model = LoopedLM.from_pretrained(FIXTURE, loops=32)
        assert out["tokens"] == generate(model, [115, 266, 271], 6, engine="autoregressive").tokens
    code, _, err = run_cli("generate", "--model", FIXTURE, "--prompt-ids", "1,2", "--loops", "0")
    assert code == 2 and "--loops" in err
