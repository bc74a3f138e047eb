"""The encoder-decoder (translation) setting: model, exact engines, storage, training forward."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import CountWeightReads, mapping_model, random_model, small_config
from speedec import ConfigError, GenerationError, LoopedLM, ModelLoadError, generate
from speedec.cache import KVCache
from speedec.encdec import TRANSLATION_ENGINES, EncDecConfig, EncDecLM, translate_ids
from speedec.storage import CONFIG_FILE, WEIGHTS_FILE


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is fastest, and it avoids OpenMP threads
    spin-waiting for a busy core (measured: a 0.1 s test took 28 s on 2 threads
    while other processes loaded the 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def enc_config(**overrides) -> EncDecConfig:
    fields = dict(vocab_size=40, d_model=32, n_heads=4, n_kv_heads=2, ffn_dim=48, n_encoder_layers=2,
                  n_unique_layers=2, n_loops=3, exit_loop=1, max_source_len=32, max_target_len=64)
    fields.update(overrides)
    return EncDecConfig(**fields)


def enc_model(config: EncDecConfig, *, seed: int = 0, std: float = 0.5, residual_scale: float = 3.0,
              dtype: torch.dtype = torch.float64) -> EncDecLM:
    """Random weights with enough signal that greedy output varies."""
    return EncDecLM.random(config, seed=seed, std=std, residual_scale=residual_scale).to(dtype)


# ------------------------------------------------------------------ exactness
@st.composite
def configs(draw):
    n_kv = draw(st.integers(1, 2))
    n_heads = n_kv * draw(st.integers(1, 3))
    n_loops = draw(st.integers(2, 5))
    return EncDecConfig(
        vocab_size=draw(st.integers(3, 64)), d_model=n_heads * draw(st.sampled_from([2, 4, 8])),
        n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=draw(st.integers(2, 48)),
        n_encoder_layers=draw(st.integers(1, 2)), n_encoder_loops=draw(st.integers(1, 2)),
        n_unique_layers=draw(st.integers(1, 3)), n_loops=n_loops,
        exit_loop=draw(st.integers(1, n_loops - 1)), max_source_len=16, max_target_len=48,
        tie_embeddings=draw(st.booleans()))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(), seed=st.integers(0, 2**16), data=st.data())
def test_speed_equals_autoregressive_float64(config, seed, data):
    model = enc_model(config, seed=seed, std=data.draw(st.sampled_from([0.3, 0.7, 1.5])),
                      residual_scale=data.draw(st.sampled_from([1.0, 4.0, 10.0])))
    rng = random.Random(seed)
    src = [rng.randrange(config.vocab_size) for _ in range(data.draw(st.integers(1, 16)))]
    n_new = data.draw(st.integers(1, 40))
    ref = translate_ids(model, src, n_new, engine="autoregressive")
    assert len(ref.tokens) == n_new
    eos = None
    if data.draw(st.booleans()):
        eos = ref.tokens[data.draw(st.integers(0, n_new - 1))]  # an EOS that does occur
        ref = translate_ids(model, src, n_new, engine="autoregressive", eos_token_id=eos)
        assert ref.tokens[-1] == eos and eos not in ref.tokens[:-1]
    speed_options = {"early_correction": data.draw(st.booleans()),
                     "guesses": data.draw(st.integers(1, min(3, config.vocab_size)))}
    for engine, options in (("speed", {}), ("speed", speed_options),
                            ("self-speculative", {"draft_tokens": data.draw(st.integers(1, 5))})):
        out = translate_ids(model, src, n_new, engine=engine, eos_token_id=eos, **options)
        assert out.tokens == ref.tokens, (engine, options)
        assert out.stop_reason == ref.stop_reason
        s = out.stats
        if engine == "speed":
            assert s.drafts_launched == s.drafts_accepted + s.drafts_rejected + s.drafts_discarded
        assert s.flushes == s.drafts_rejected
        assert s.new_tokens == len(out.tokens) and s.prompt_tokens == len(src)


def test_engines_equal_teacher_forced_forward_with_padding():
    """The cached engine path against the plain forward (an independent reference):
    a padded batch of two sources gives each its own greedy translation."""
    config = enc_config(n_kv_heads=1)
    model = enc_model(config, seed=5)
    sources = [[5, 9, 2, 7, 7, 30, 11], [8, 3, 12]]
    outs = [translate_ids(model, s, 12, engine="speed").tokens for s in sources]
    src = torch.zeros(2, 7, dtype=torch.long)
    src_mask = torch.zeros(2, 7, dtype=torch.bool)
    for i, s in enumerate(sources):
        src[i, : len(s)], src_mask[i, : len(s)] = torch.tensor(s), True
    tgt_in = torch.tensor([[config.bos_token_id] + o[:-1] for o in outs])
    with torch.no_grad():
        logits = model(src, src_mask, tgt_in).logits
    assert logits.argmax(-1).tolist() == outs
    assert len(set(outs[0])) > 1  # the test means something only if output varies


def _encdec_from_looped(lm: LoopedLM) -> EncDecLM:
    """An EncDecLM whose decoder is ``lm`` and whose cross-attention adds exactly zero."""
    c = lm.config
    config = EncDecConfig(
        vocab_size=c.vocab_size, d_model=c.d_model, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
        ffn_dim=c.ffn_dim, n_encoder_layers=1, n_unique_layers=c.n_unique_layers, n_loops=c.n_loops,
        exit_loop=c.exit_loop, max_source_len=8, max_target_len=c.max_seq_len, norm_eps=c.norm_eps,
        tie_embeddings=c.tie_embeddings)
    model = enc_model(config).to(lm.dtype)
    with torch.no_grad():
        model.embed.weight.copy_(lm.embed.weight)
        model.norm.weight.copy_(lm.norm.weight)
        if lm.lm_head is not None:
            model.lm_head.copy_(lm.lm_head)
        for dec, src in zip(model.decoder_layers, lm.layers):
            for name in ("wqkv", "wo", "w_gate_up", "w_down"):
                getattr(dec, name).copy_(getattr(src, name))
            dec.attn_norm.weight.copy_(src.attn_norm.weight)
            dec.mlp_norm.weight.copy_(src.mlp_norm.weight)
            dec.wo_cross.zero_()
    return model


def _maps(V, agree_every):
    rng = random.Random(1)
    exit_map = list(range(V))
    rng.shuffle(exit_map)
    wrong = [(x + 1) % V for x in exit_map]
    final_map = [exit_map[t] if agree_every and t % agree_every == 0 else wrong[t] for t in range(V)]
    return exit_map, final_map


@pytest.mark.parametrize("case", ["always", "never", "sometimes", "random"])
def test_same_tokens_and_stats_as_the_decoder_only_engines(case):
    """With cross-attention zeroed the translator *is* a decoder-only model whose
    prompt is the start token: tokens and every counter must match, for models
    whose early exit always, never or sometimes agrees with the final prediction."""
    if case == "random":
        lm = random_model(small_config(vocab_size=30))
    else:
        exit_map, final_map = _maps(10, {"always": 1, "never": 0, "sometimes": 2}[case])
        lm = mapping_model(exit_map, final_map, n_loops=4, exit_loop=1)
    model = _encdec_from_looped(lm)
    bos = 3
    for engine in TRANSLATION_ENGINES:
        ref = generate(lm, [bos], 30, engine=engine)
        out = translate_ids(model, [4, 1, 2], 30, engine=engine, bos_token_id=bos)
        assert out.tokens == ref.tokens, engine
        for name in ("steps", "drafts_launched", "drafts_accepted", "drafts_rejected", "drafts_discarded",
                     "flushes", "lm_head_calls", "mean_in_flight"):
            assert getattr(out.stats, name) == getattr(ref.stats, name), (engine, name)
    speed = translate_ids(model, [4], 30, engine="speed", bos_token_id=bos).stats
    expected = {"always": 1.0, "never": 0.0}.get(case)
    if expected is not None:
        assert speed.acceptance == expected


def test_eos_and_max_new_tokens_one():
    model = enc_model(enc_config(), seed=3)
    ref = translate_ids(model, [1, 2, 3], 20, engine="autoregressive").tokens
    eos = ref[4]
    for engine in TRANSLATION_ENGINES:
        out = translate_ids(model, [1, 2, 3], 20, engine=engine, eos_token_id=eos)
        assert out.tokens == ref[: ref.index(eos) + 1] and out.stop_reason == "eos"
        assert translate_ids(model, [1, 2, 3], 1, engine=engine).tokens == ref[:1]


def test_both_model_families_are_decoding_models():
    """The engines' one interface, DecodingModel: the decoder-only model and the
    translator's decoder bound to a source both offer it, with its signatures."""
    import inspect

    from speedec.encdec import ConditionedDecoder
    from speedec.engines import DecodingModel

    model = enc_model(enc_config())
    decoder = ConditionedDecoder(model, model.encode(torch.tensor([[4, 5, 6]])))
    lm = random_model(small_config())
    methods = ("layout", "run_loops", "spare_rows", "head", "exit_head", "head_and_exit")
    for candidate in (lm, decoder):
        assert isinstance(candidate, DecodingModel), type(candidate).__name__
        assert candidate.config.vocab_size == 40 and candidate.dtype == torch.float64
        assert candidate.device == torch.device("cpu") and callable(candidate.embed)
        for name in methods:
            declared = list(inspect.signature(getattr(DecodingModel, name)).parameters)[1:]  # after self
            assert list(inspect.signature(getattr(candidate, name)).parameters) == declared, name
    assert not isinstance(model, DecodingModel)  # the whole translator is not one: it has no run_loops


# ------------------------------------------------------------------ weight reads
def _weights(model: EncDecLM) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n} | {
        "head": model.head_weight}


def test_one_matmul_per_weight_per_step():
    config = enc_config(n_loops=4, exit_loop=1)
    model = enc_model(config, dtype=torch.float32)
    memory = model.encode(torch.tensor([[3, 4, 5, 6, 7]]))
    cache = KVCache(config.decoder_config, 32, dtype=model.dtype)
    slots = 4
    layout = model.decoder_layout([[20 - g] for g in range(slots)], list(range(slots)))
    x = torch.randn(slots, 1, config.d_model)
    with torch.inference_mode(), CountWeightReads(_weights(model)) as counter:
        model.run_decoder_loops(x, layout, cache, memory, 1)
    for name, calls in counter.calls.items():
        if name.startswith("decoder_layers") and "wkv_cross" not in name:
            assert calls == 1, f"{name} read {calls} times in one step of {slots} slots"
        else:  # the encoder, the cross-attention K/V projection and the head: not in a step
            assert calls == 0, name
    # self- and cross-attention, each batched over the slots
    assert counter.attention == 2 * config.n_unique_layers


@pytest.mark.parametrize("engine", list(TRANSLATION_ENGINES))
def test_cross_attention_kv_computed_once_per_unique_layer(engine):
    config = enc_config(n_loops=4, exit_loop=1, n_encoder_loops=2)
    model = enc_model(config, dtype=torch.float32, std=0.02, residual_scale=1.0)
    with CountWeightReads(_weights(model)) as counter:
        out = translate_ids(model, [5, 6, 7, 8, 9, 10], 30, engine=engine)
    s = out.stats
    for name, calls in counter.calls.items():
        if "wkv_cross" in name:
            assert calls == 1, f"{name}: {calls} products for one source"
        elif name.startswith("encoder_layers"):
            assert calls == config.n_encoder_loops, name
        elif name.startswith("decoder_layers") and engine != "self-speculative":
            assert calls == s.steps + config.n_loops, name  # decode steps + the start token's prefill
    if engine == "speed":
        assert s.mean_in_flight > 2  # several slots per step, yet one read per step
        assert counter.calls["head"] == s.lm_head_calls + 1


# ------------------------------------------------------------------ storage
@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, tie):
    model = enc_model(enc_config(tie_embeddings=tie, n_encoder_loops=2), dtype=torch.float32)
    model.save_pretrained(tmp_path / "m")
    loaded = EncDecLM.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    assert model.state_dict().keys() == loaded.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert translate_ids(loaded, [1, 2], 10).tokens == translate_ids(model, [1, 2], 10).tokens
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert EncDecLM.from_pretrained(tmp_path / "m", dtype=torch.float64).dtype == torch.float64


def test_load_errors_name_the_bad_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        EncDecLM.from_pretrained(tmp_path / "nope")
    enc_model(enc_config()).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors is truncated or corrupt"):
        EncDecLM.from_pretrained(tmp_path / "m")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors is missing"):
        EncDecLM.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / CONFIG_FILE).write_text("{")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        EncDecLM.from_pretrained(tmp_path / "m")
    # A decoder-only model directory is not an encoder-decoder one, and vice versa.
    random_model(small_config()).save_pretrained(tmp_path / "lm")
    with pytest.raises(ModelLoadError, match="not a speedec encoder-decoder config"):
        EncDecLM.from_pretrained(tmp_path / "lm")
    enc_model(enc_config()).save_pretrained(tmp_path / "ed")
    with pytest.raises(ModelLoadError, match="config.json"):
        LoopedLM.from_pretrained(tmp_path / "ed")


def test_config_and_weights_that_disagree(tmp_path):
    enc_model(enc_config()).save_pretrained(tmp_path / "a")
    enc_model(enc_config(ffn_dim=24)).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes((tmp_path / "b" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ModelLoadError, match="different config"):
        EncDecLM.from_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    config["n_encoder_layers"] = 0
    (tmp_path / "a" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="config.json: n_encoder_layers must be >= 1"):
        EncDecLM.from_pretrained(tmp_path / "a")


# ------------------------------------------------------------------ config and requests
@pytest.mark.parametrize("overrides,match", [
    (dict(n_encoder_layers=0), "n_encoder_layers must be >= 1"),
    (dict(n_encoder_loops=1.5), "n_encoder_loops must be an integer"),
    (dict(max_source_len=0), "max_source_len"),
    (dict(n_heads=3), "divisible by n_heads"),
    (dict(n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(exit_loop=3), "exit_loop"),
    (dict(n_loops=1), "exit_loop"),
    (dict(bos_token_id=40), "bos_token_id 40 is outside the vocabulary"),
    (dict(pad_token_id=-1), "pad_token_id"),
])
def test_config_validation(overrides, match):
    with pytest.raises(ConfigError, match=match):
        enc_config(**overrides)


def test_config_round_trips_and_single_loop_decoders_decode(tmp_path):
    config = enc_config(n_loops=1, exit_loop=None)
    assert EncDecConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown config field"):
        EncDecConfig.from_dict({**config.to_dict(), "max_seq_len": 3})
    model = enc_model(config)
    assert len(translate_ids(model, [1, 2], 5, engine="autoregressive").tokens) == 5
    with pytest.raises(GenerationError, match="early exit"):
        translate_ids(model, [1, 2], 5, engine="speed")


@pytest.mark.parametrize("kwargs,match", [
    (dict(src_ids=[], max_new_tokens=3), "source sentence is empty"),
    (dict(src_ids=[1, 99], max_new_tokens=3), "outside the vocabulary"),
    (dict(src_ids=[1, "a"], max_new_tokens=3), "integers"),
    (dict(src_ids=[1] * 33, max_new_tokens=3), "max_source_len"),
    (dict(src_ids=[1], max_new_tokens=0), "max_new_tokens"),
    (dict(src_ids=[1], max_new_tokens=64), "max_target_len"),
    (dict(src_ids=[1], max_new_tokens=3, eos_token_id=40), "eos_token_id"),
    (dict(src_ids=[1], max_new_tokens=3, bos_token_id=-2), "bos_token_id"),
    (dict(src_ids=[1], max_new_tokens=3, engine="beam"), "unknown engine"),
    (dict(src_ids=[1], max_new_tokens=3, engine="speed", draft_tokens=2), "takes no option"),
])
def test_bad_requests_raise_generation_error(kwargs, match):
    model = enc_model(enc_config())
    with pytest.raises(GenerationError, match=match):
        translate_ids(model, **kwargs)


def test_streaming_callback_sees_tokens_in_order():
    model = enc_model(enc_config())
    seen = []
    out = translate_ids(model, torch.tensor([4, 5, 6]), 15, engine="speed", on_token=seen.append)
    assert seen == out.tokens


# ------------------------------------------------------------------ training forward
def test_forward_shapes_and_errors():
    config = enc_config(n_loops=4)
    model = enc_model(config, dtype=torch.float32)
    src, tgt = torch.randint(0, 40, (3, 7)), torch.randint(0, 40, (3, 5))
    out = model(src, torch.ones(3, 7, dtype=torch.bool), tgt, output_loops=(1, 3))
    assert out.logits.shape == (3, 5, 40)
    assert sorted(out.loop_logits) == [1, 3] and out.loop_logits[1].shape == (3, 5, 40)
    with pytest.raises(ValueError, match="output_loops"):
        model(src, None, tgt, output_loops=(4,))
    with pytest.raises(ValueError, match="max_target_len"):
        model(src, None, torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="max_source_len"):
        model(torch.zeros(1, 33, dtype=torch.long), None, tgt)


def test_loss_decreases_on_a_copy_task():
    """A few AdamW steps on 'translate x to x' with the early-exit loss."""
    torch.manual_seed(0)
    pad, bos, eos = 0, 1, 2
    config = enc_config(vocab_size=12, n_encoder_layers=1, n_unique_layers=1, n_loops=2, exit_loop=1,
                        d_model=32, ffn_dim=64, pad_token_id=pad, bos_token_id=bos)
    model = EncDecLM.random(config, seed=0).train()
    lengths = torch.randint(2, 7, (32,))
    src = torch.randint(3, 12, (32, 6)) * (torch.arange(6) < lengths[:, None])  # padded with 0
    src_mask = src != pad
    tgt_in = torch.cat((torch.full((32, 1), bos), src), dim=1)  # [B, 7]
    targets = torch.cat((src, torch.zeros(32, 1, dtype=torch.long)), dim=1)
    targets[torch.arange(32), lengths] = eos
    targets[targets == pad] = -100

    def loss_fn():
        out = model(src, src_mask, tgt_in, output_loops=(1,))
        final = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        early = F.cross_entropy(out.loop_logits[1].flatten(0, 1), targets.flatten(), ignore_index=-100)
        return final + early

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
