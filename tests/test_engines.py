"""Exactness and bookkeeping of the decoding engines."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import CountWeightReads, mapping_model, random_model, small_config
from speedec import ENGINES, GenerationError, ModelConfig, generate
from speedec.cache import KVCache
from speedec.engines import get_engine
from speedec.kernels import fused_ops_available


@st.composite
def configs(draw):
    n_kv = draw(st.integers(1, 2))
    n_heads = n_kv * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    n_loops = draw(st.integers(2, 5))
    d_model = n_heads * head_dim
    return ModelConfig(
        vocab_size=draw(st.integers(3, 64)), d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv,
        ffn_dim=draw(st.integers(2, 48)), n_unique_layers=draw(st.integers(1, 3)), n_loops=n_loops,
        exit_loop=draw(st.integers(1, n_loops - 1)), max_seq_len=96,
        tie_embeddings=draw(st.booleans()), loop_embedding=draw(st.booleans()),
        exit_readout_rank=draw(st.sampled_from([None, None, 1, d_model])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(), seed=st.integers(0, 2**16), data=st.data())
def test_speed_equals_autoregressive_float64(config, seed, data):
    model = random_model(config, seed=seed, std=data.draw(st.sampled_from([0.3, 0.7, 1.5])),
                         residual_scale=data.draw(st.sampled_from([1.0, 4.0, 10.0])))
    rng = random.Random(seed)
    prompt = [rng.randrange(config.vocab_size) for _ in range(data.draw(st.integers(1, 12)))]
    n_new = data.draw(st.integers(1, 40))
    ref = generate(model, prompt, n_new, engine="autoregressive")
    assert len(ref.tokens) == n_new
    eos = None
    if data.draw(st.booleans()):
        eos = ref.tokens[data.draw(st.integers(0, n_new - 1))]  # an EOS that does occur
        ref = generate(model, prompt, n_new, engine="autoregressive", eos_token_id=eos)
        assert ref.tokens[-1] == eos and eos not in ref.tokens[:-1]
    depth = -(-config.n_loops // config.exit_loop)
    guesses = data.draw(st.integers(1, min(4, config.vocab_size)))
    speed_options = {"early_correction": data.draw(st.booleans()), "guesses": guesses}
    if data.draw(st.booleans()):  # adaptive, with step costs that favour or disfavour guessing
        rows = depth + (depth - 1) * (guesses - 1)
        speed_options.update(adaptive=True, step_costs=[1.0] + [data.draw(st.sampled_from([1.0, 50.0]))] * (rows - 1))
    for engine, options in (("speed", {}), ("speed", speed_options),
                            ("self-speculative", {"draft_tokens": data.draw(st.integers(1, 6))})):
        out = generate(model, prompt, n_new, engine=engine, eos_token_id=eos, **options)
        assert out.tokens == ref.tokens, (engine, options)
        assert out.stop_reason == ref.stop_reason
        s = out.stats
        assert s.drafts_launched >= s.drafts_accepted + s.drafts_rejected + s.drafts_discarded
        if engine == "speed":
            assert s.drafts_launched == s.drafts_accepted + s.drafts_rejected + s.drafts_discarded
            assert s.spare_hits <= s.drafts_rejected
        assert s.flushes == s.drafts_rejected
        assert s.new_tokens == len(out.tokens)


def _top2_gap(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    top = logits.topk(2).values
    return float(top[0] - top[1])


@pytest.mark.parametrize("seed", range(6))
def test_speed_float32_differs_only_at_near_ties(seed):
    config = small_config(vocab_size=64, n_loops=4, exit_loop=1)
    model = random_model(config, seed=seed, std=0.7, residual_scale=4.0, dtype=torch.float32)
    prompt = list(range(1, 9))
    ref = generate(model, prompt, 60, engine="autoregressive").tokens
    out = generate(model, prompt, 60, engine="speed").tokens
    for i, (a, b) in enumerate(zip(ref, out)):
        if a != b:
            gap = _top2_gap(model, prompt + ref[:i])
            assert gap < 1e-4, f"divergence at token {i} with a top-2 logit gap of {gap}"
            break
    else:
        assert ref == out


@pytest.mark.skipif(not fused_ops_available(), reason="speedec's AVX2 kernels are not built here")
@pytest.mark.parametrize("seed", range(4))
def test_float32_engines_equal_autoregressive_bit_for_bit_with_the_fused_kernels(seed):
    """With the batch-invariant products and the per-row fused attention and norms,
    every engine's float32 steps compute each row as a one-row step would: the tokens
    equal the autoregressive engine's exactly, near-ties included."""
    for config in (small_config(vocab_size=64, n_loops=4, exit_loop=1),
                   small_config(vocab_size=64, n_loops=5, exit_loop=2, exit_readout_rank=4, loop_embedding=True)):
        model = random_model(config, seed=seed, std=0.7, residual_scale=4.0, dtype=torch.float32)
        prompt = list(range(1, 9))
        ref = generate(model, prompt, 60, engine="autoregressive").tokens
        for engine, options in (("speed", {}), ("speed", {"guesses": 2}), ("speed", {"early_correction": True}),
                                ("self-speculative", {})):
            assert generate(model, prompt, 60, engine=engine, **options).tokens == ref, (engine, options)


def _maps(V, agree_every):
    rng = random.Random(1)
    exit_map = list(range(V))
    rng.shuffle(exit_map)
    wrong = [(x + 1) % V for x in exit_map]
    final_map = [exit_map[t] if agree_every and t % agree_every == 0 else wrong[t] for t in range(V)]
    return exit_map, final_map


@pytest.mark.parametrize("n_loops,exit_loop", [(3, 1), (4, 1), (5, 2)])
def test_early_exit_always_agrees(n_loops, exit_loop):
    exit_map, _ = _maps(10, 0)
    model = mapping_model(exit_map, exit_map, n_loops=n_loops, exit_loop=exit_loop)
    ref = generate(model, [2, 5], 40, engine="autoregressive")
    out = generate(model, [2, 5], 40, engine="speed")
    assert out.tokens == ref.tokens
    s = out.stats
    assert s.acceptance == 1.0 and s.drafts_rejected == 0 and s.flushes == 0
    # One draft per verified token after the first; the pipeline never drains.
    assert s.drafts_accepted == 38
    assert s.steps == 39 * exit_loop + (n_loops - exit_loop)
    assert s.mean_in_flight > 1.5


@pytest.mark.parametrize("n_loops,exit_loop", [(3, 1), (4, 2)])
def test_early_exit_never_agrees(n_loops, exit_loop):
    exit_map, final_map = _maps(10, 0)
    model = mapping_model(exit_map, final_map, n_loops=n_loops, exit_loop=exit_loop)
    ref = generate(model, [2, 5], 30, engine="autoregressive")
    out = generate(model, [2, 5], 30, engine="speed")
    assert out.tokens == ref.tokens
    s = out.stats
    assert s.acceptance == 0.0 and s.drafts_accepted == 0
    assert s.drafts_rejected == s.flushes == 28  # the last slot needs no successor
    assert s.steps == 29 * n_loops  # no gain, no loss in steps
    # every generated token is the model's final prediction, not the guess
    assert all(final_map[a] == b for a, b in zip(out.tokens, out.tokens[1:]))


def test_early_exit_sometimes_agrees():
    exit_map, final_map = _maps(10, 2)
    model = mapping_model(exit_map, final_map, n_loops=4, exit_loop=1)
    ref = generate(model, [3], 40, engine="autoregressive")
    out = generate(model, [3], 40, engine="speed")
    assert out.tokens == ref.tokens
    expected_accept = sum(exit_map[t] == final_map[t] for t in ref.tokens[:-2])
    s = out.stats
    assert s.drafts_accepted == expected_accept
    assert s.drafts_accepted + s.drafts_rejected == 38  # slots of tokens 1..38 draft
    assert 0.0 < s.acceptance < 1.0


@pytest.mark.parametrize("n_loops,exit_loop", [(4, 1), (5, 1), (6, 2)])
def test_early_correction_replaces_wrong_guesses_before_verification(n_loops, exit_loop):
    # The exit is always wrong, but the prediction turns final midway between
    # the exit and the last loop: every guess gets corrected, none flushed.
    exit_map, final_map = _maps(10, 0)
    model = mapping_model(exit_map, final_map, n_loops=n_loops, exit_loop=exit_loop)
    ref = generate(model, [2, 5], 30, engine="autoregressive")
    plain = generate(model, [2, 5], 30, engine="speed")
    out = generate(model, [2, 5], 30, engine="speed", early_correction=True)
    assert out.tokens == ref.tokens
    s = out.stats
    assert s.corrections == 28 and s.flushes == 0 and s.acceptance == 1.0
    assert plain.stats.corrections == 0 and plain.stats.acceptance == 0.0
    assert s.drafts_launched == s.drafts_accepted + s.drafts_rejected + s.drafts_discarded
    # The corrected guess starts as soon as the prediction turns, so fewer steps.
    assert s.steps < plain.stats.steps


def test_early_correction_changes_nothing_when_the_exit_is_right():
    exit_map, _ = _maps(10, 0)
    model = mapping_model(exit_map, exit_map, n_loops=4, exit_loop=1)
    plain = generate(model, [2, 5], 40, engine="speed")
    out = generate(model, [2, 5], 40, engine="speed", early_correction=True)
    assert out.tokens == plain.tokens and out.stats.corrections == 0
    assert out.stats.steps == plain.stats.steps


@pytest.mark.parametrize("n_loops,exit_loop", [(4, 1), (6, 2)])
def test_spares_hold_the_token_the_guess_missed(n_loops, exit_loop):
    # The final prediction is always the exit's second choice: with two guesses
    # every miss is caught by the spare, which goes on instead of restarting.
    exit_map, final_map = _maps(10, 0)
    model = mapping_model(exit_map, final_map, n_loops=n_loops, exit_loop=exit_loop)
    ref = generate(model, [2, 5], 30, engine="autoregressive")
    plain = generate(model, [2, 5], 30, engine="speed")
    out = generate(model, [2, 5], 30, engine="speed", guesses=2)
    assert out.tokens == ref.tokens
    s = out.stats
    assert s.spare_hits == s.drafts_rejected > 0 and s.spares_launched == s.drafts_launched
    assert s.steps < plain.stats.steps and s.mean_in_flight > plain.stats.mean_in_flight
    # A spare whose guess was right is dropped, never promoted.
    right = mapping_model(exit_map, exit_map, n_loops=n_loops, exit_loop=exit_loop)
    both = generate(right, [2, 5], 30, engine="speed", guesses=2)
    assert both.stats.spare_hits == 0 and both.stats.acceptance == 1.0
    assert both.tokens == generate(right, [2, 5], 30, engine="autoregressive").tokens


def test_spare_rows_attend_like_pipeline_rows():
    from speedec.model import SpareRows

    config = small_config(n_loops=3, exit_loop=1)
    model = random_model(config, seed=3)
    cache = KVCache(config, 24, dtype=torch.float64, device="cpu")
    with torch.inference_mode():
        model.run_loops(model.embed(torch.arange(10)[None]), model.layout([list(range(10))], [0]), cache, 3)
        side = SpareRows.side_buffers(config, 3, dtype=torch.float64, device=torch.device("cpu"))
        x = torch.randn(1, 1, config.d_model, dtype=torch.float64)
        spare = model.spare_rows([10], [1], [2], side)
        both = model.run_loops(torch.cat((x, x)), model.layout([[10]], [1]), cache, 1, spares=spare)
        assert torch.allclose(both[0], both[1], atol=1e-12)
        # the spare's keys went to its side buffer, equal to the pipeline row's cache entry
        assert torch.allclose(side[0][2, :, 1], cache.keys[:, 1, :, 10])
        assert side[0][[0, 1]].abs().sum() == 0


def test_adaptive_policy_stops_guessing_when_rows_are_expensive():
    exit_map, final_map = _maps(10, 0)  # the exit is always wrong
    model = mapping_model(exit_map, final_map, n_loops=4, exit_loop=1)
    ref = generate(model, [2, 5], 40, engine="autoregressive")
    # Guessing costs 4 rows per step at 3x the 1-row cost: at acceptance 0 it never pays.
    costly = generate(model, [2, 5], 40, engine="speed", adaptive=True, step_costs=[1.0, 2.0, 2.5, 3.0])
    assert costly.tokens == ref.tokens
    s = costly.stats
    assert s.guesses_skipped > 20  # after the first wrong guesses it only probes (one in 4)
    # Free rows: guessing never costs more than not guessing, so it always guesses.
    free = generate(model, [2, 5], 40, engine="speed", adaptive=True, step_costs=[1.0, 1.0, 1.0, 1.0])
    assert free.tokens == ref.tokens and free.stats.guesses_skipped == 0
    assert s.drafts_launched < free.stats.drafts_launched / 2
    # Right guesses at expensive rows still pay (1 step per token instead of 4).
    right = mapping_model(exit_map, exit_map, n_loops=4, exit_loop=1)
    good = generate(right, [2, 5], 40, engine="speed", adaptive=True, step_costs=[1.0, 2.0, 2.5, 3.0])
    assert good.stats.guesses_skipped == 0 and good.stats.acceptance == 1.0


def test_speculation_policy_cost_model():
    from speedec.engines.policy import SpeculationPolicy

    policy = SpeculationPolicy(4, 1, [1.0, 1.2, 1.4, 1.6])
    assert policy.expected_cost(0) == 4.0
    assert policy.expected_cost(1) == pytest.approx(1.6)  # acceptance starts at 1
    for _ in range(200):
        policy.record(None)
    assert policy.hit_rate[0] < 1e-4
    assert policy.expected_cost(1) == pytest.approx(4 * 1.6, rel=1e-3)
    decisions = [policy.choose() > 0 for _ in range(8)]
    assert decisions == [False, False, False, True] * 2  # probes only


def test_speculation_policy_chooses_spares_when_they_pay():
    from speedec.engines.policy import SpeculationPolicy

    # L=4, e=1: depth 4; 2 guesses -> 7 rows. The second candidate is always right.
    policy = SpeculationPolicy(4, 1, [1.0, 1.0, 1.0, 1.0, 1.05, 1.1, 1.15], max_guesses=2)
    for _ in range(200):
        policy.record(1)
    assert policy.hit_rate[0] < 1e-4 and policy.hit_rate[1] == pytest.approx(1.0)
    # one guess: 4 steps x 1.0; two: (L - e) = 3 steps x 1.15
    assert policy.expected_cost(1) == pytest.approx(4.0, rel=1e-3)
    assert policy.expected_cost(2) == pytest.approx(3 * 1.15, rel=1e-3)
    assert policy.choose() == 2
    # rows too dear: no spares, and with acceptance 0 no guess at all
    dear = SpeculationPolicy(4, 1, [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0], max_guesses=2)
    for _ in range(200):
        dear.record(1)
    assert dear.choose() in (0, 1) and dear.expected_cost(2) > dear.expected_cost(1)


@pytest.mark.parametrize("options,match", [
    ({"early_correction": 1}, "early_correction must be True or False"),
    ({"adaptive": "yes"}, "adaptive must be True or False"),
    ({"adaptive": True, "step_costs": [1.0]}, "step_costs must hold"),
    ({"adaptive": True, "step_costs": [1.0, 0.0, 1.0]}, "step_costs must hold"),
    ({"guesses": 0}, "guesses must be an integer from 1"),
    ({"guesses": 9}, "guesses must be an integer from 1"),
    ({"guesses": True}, "guesses must be an integer from 1"),
])
def test_bad_speed_options(options, match):
    model = random_model(small_config(n_loops=3, exit_loop=1))
    with pytest.raises(GenerationError, match=match):
        generate(model, [1, 2], 4, engine="speed", **options)


def test_adaptive_measures_step_costs_once():
    model = random_model(small_config(n_loops=4, exit_loop=1))
    engine = get_engine("speed", model, adaptive=True)
    first = engine.generate([1, 2], 8)
    costs = list(engine.step_costs)
    assert len(costs) == 4 and all(t > 0 for t in costs)
    second = engine.generate([1, 2], 8)
    assert engine.step_costs == costs and first.tokens == second.tokens
    # a new engine on the same model (speedec.generate makes one per call) reuses the measurement
    assert get_engine("speed", model, adaptive=True)._policy().step_costs == costs


def test_adaptive_step_costs_are_measured_when_the_engine_is_built(monkeypatch):
    """Outside any request's timings: building the engine measures, decoding does not."""
    from speedec.engines import speed

    calls = []
    measure = speed.measure_step_costs
    monkeypatch.setattr(speed, "measure_step_costs", lambda *a, **k: calls.append(a) or measure(*a, **k))
    model = random_model(small_config(n_loops=4, exit_loop=1), seed=9)
    engine = get_engine("speed", model, adaptive=True, guesses=2)
    assert len(calls) == 1 and len(engine.step_costs) == engine.max_rows == 7
    engine.generate([1, 2], 8)
    get_engine("speed", model, adaptive=True, guesses=2).generate([3], 5)
    assert len(calls) == 1


def _weights(model):
    return {n: p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n} | {
        "head": model.head_weight}


def test_one_matmul_per_weight_per_step():
    config = small_config(n_loops=4, exit_loop=1)
    model = random_model(config, dtype=torch.float32)
    cache = KVCache(config, 64, dtype=model.dtype)
    slots = 4
    layout = model.layout([[20 - g] for g in range(slots)], list(range(slots)))
    x = torch.randn(slots, 1, config.d_model)
    with torch.inference_mode(), CountWeightReads(_weights(model)) as counter:
        model.run_loops(x, layout, cache, 1)
    for name, calls in counter.calls.items():
        if name != "head":
            assert calls == 1, f"{name} read {calls} times in one step of {slots} slots"
    assert counter.attention == config.n_unique_layers  # attention batched over the slots too


def test_weight_reads_equal_steps_in_generation():
    config = small_config(n_loops=4, exit_loop=1)
    model = random_model(config, dtype=torch.float32, std=0.02, residual_scale=1.0)
    prompt = [1, 2, 3]
    with torch.inference_mode(), CountWeightReads(_weights(model)) as counter:
        out = generate(model, prompt, 30, engine="speed")
    s = out.stats
    assert s.mean_in_flight > 2  # several slots per step, yet one read per step:
    for name, calls in counter.calls.items():
        if name != "head":
            assert calls == s.steps + config.n_loops, name  # decode steps + prefill passes
    # One LM-head product per step at most (exit and final rows batched) plus prefill.
    assert counter.calls["head"] <= s.steps + 1
    assert counter.calls["head"] == s.lm_head_calls + 1


@pytest.mark.parametrize("k", [1, 3, 6])
def test_self_speculative_accepts_all_none_and_some(k):
    exit_map, wrong = _maps(10, 0)
    _, some = _maps(10, 2)
    for final_map, check in ((exit_map, "all"), (wrong, "none"), (some, "some")):
        model = mapping_model(exit_map, final_map, n_loops=4, exit_loop=1)
        ref = generate(model, [3], 30, engine="autoregressive")
        out = generate(model, [3], 30, engine="self-speculative", draft_tokens=k)
        assert out.tokens == ref.tokens
        s = out.stats
        if check == "all":
            assert s.acceptance == 1.0 and s.flushes == 0
            rounds = -(-29 // (k + 1))  # k + 1 tokens per round
            assert s.steps <= rounds * ((k + 1) * 1 + 3)
        elif check == "none":
            assert s.acceptance == 0.0 and s.drafts_accepted == 0
            # one token per round; a round with r tokens left drafts min(k, r - 1)
            assert s.steps == sum(min(k, r - 1) + 1 + 3 for r in range(1, 30))
        else:
            assert 0.0 < s.acceptance < 1.0


def test_unknown_engine_option_is_a_generation_error():
    model = random_model(small_config())
    with pytest.raises(GenerationError, match="takes no option 'draft_tokens'"):
        generate(model, [1], 3, engine="speed", draft_tokens=2)
    with pytest.raises(GenerationError, match="draft_tokens"):
        generate(model, [1], 3, engine="self-speculative", draft_tokens=0)


def test_eos_stops_generation_and_is_returned():
    config = small_config()
    model = random_model(config, seed=3)
    ref = generate(model, [1, 2], 20, engine="autoregressive").tokens
    eos = ref[5]
    first = ref.index(eos)
    for engine in ENGINES:
        out = generate(model, [1, 2], 20, engine=engine, eos_token_id=eos)
        assert out.tokens == ref[: first + 1]
        assert out.stop_reason == "eos"


def test_max_new_tokens_one_and_prompt_at_limit():
    config = small_config(max_seq_len=16)
    model = random_model(config)
    for engine in ENGINES:
        assert len(generate(model, [1], 1, engine=engine).tokens) == 1
        assert len(generate(model, list(range(10)), 6, engine=engine).tokens) == 6
    a = generate(model, list(range(10)), 6, engine="autoregressive").tokens
    assert generate(model, list(range(10)), 6, engine="speed").tokens == a


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt_ids=[], max_new_tokens=3), "empty"),
    (dict(prompt_ids=[1, 99], max_new_tokens=3), "outside the vocabulary"),
    (dict(prompt_ids=[1, -1], max_new_tokens=3), "outside the vocabulary"),
    (dict(prompt_ids=[1, "a"], max_new_tokens=3), "integers"),
    (dict(prompt_ids=[1], max_new_tokens=0), "max_new_tokens"),
    (dict(prompt_ids=[1] * 10, max_new_tokens=200), "max_seq_len"),
    (dict(prompt_ids=[1], max_new_tokens=3, eos_token_id=40), "eos_token_id"),
    (dict(prompt_ids=[1], max_new_tokens=3, engine="beam"), "unknown engine"),
])
def test_bad_requests_raise_generation_error(kwargs, match):
    model = random_model(small_config())
    with pytest.raises(GenerationError, match=match):
        generate(model, **kwargs)


def test_speed_engine_needs_an_early_exit():
    config = small_config(n_loops=1, exit_loop=None)
    model = random_model(config)
    with pytest.raises(GenerationError, match="early exit"):
        get_engine("speed", model)
    assert len(generate(model, [1, 2], 5, engine="autoregressive").tokens) == 5


def test_streaming_callback_sees_tokens_in_order():
    model = random_model(small_config())
    seen = []
    out = generate(model, [1, 2], 15, engine="speed", on_token=seen.append)
    assert seen == out.tokens


# ------------------------------------------------------------------ the pipeline seam
def _start_request(model, prompt, max_new_tokens, **sampling):
    """What Engine.run does before decode: cache, prefill, the first token."""
    from speedec.engines.base import GenerationStats, Output, prefill
    from speedec.sampling import Sampler, SamplingParams

    sampler = Sampler(SamplingParams(**sampling))
    cache = KVCache(model.config, len(prompt) + max_new_tokens, dtype=model.dtype)
    out = Output(max_new_tokens, None, None)
    stats = GenerationStats(prompt_tokens=len(prompt))
    with torch.inference_mode():
        out.emit(sampler.pick(prefill(model, cache, prompt)))
    return cache, out, stats, sampler


def _run_by_hand(model, plan):
    """A StepPlan holds all a runner needs: one pass, then one LM-head matmul."""
    layout = model.layout([[p] for p in plan.positions], plan.loops)
    spares = (model.spare_rows(plan.spare_positions, plan.spare_loops, plan.spare_index, plan.side)
              if plan.spare_positions else None)
    hidden = model.run_loops(plan.rows, layout, plan.cache, 1, spares=spares)
    if not plan.head_rows and not plan.exit_rows:
        return hidden, None
    return hidden, model.head_and_exit(hidden[plan.head_rows, 0], hidden[plan.exit_rows, 0])


def _counters(stats):
    return {k: v for k, v in stats.to_dict().items() if not k.endswith("_s") and k != "tokens_per_s"}


def _pipeline_cases():
    exit_map, final_map = _maps(10, 0)
    second = mapping_model(exit_map, final_map, n_loops=4, exit_loop=1)  # spares catch every miss
    turning = mapping_model(exit_map, final_map, n_loops=5, exit_loop=1)  # corrections catch them
    readout = random_model(small_config(n_loops=4, exit_loop=1, exit_readout_rank=4, loop_embedding=True),
                           seed=5)
    sampled = {"temperature": 0.9, "seed": 11}
    return [(second, [2, 5], {"guesses": 2}, {}), (turning, [2, 5], {"early_correction": True}, {}),
            (readout, [1, 2, 3], {}, {}), (readout, [1, 2, 3], {"guesses": 2, "early_correction": True}, {}),
            (random_model(small_config(n_loops=5, exit_loop=2), seed=1), [4], {"guesses": 3}, {}),
            (second, [2, 5], {"guesses": 2, "early_correction": True}, sampled)]


@pytest.mark.parametrize("case", range(6))
def test_plan_advance_by_hand_reproduces_generate(case):
    """The speed engine is plan / run / advance; driving it by hand, with a runner
    written here, gives generate's tokens and every counter (float64; sampled
    with the same seed, the same draws)."""
    model, prompt, options, sampling = _pipeline_cases()[case]
    n = 30
    ref = generate(model, prompt, n, engine="speed", **options, **sampling)
    engine = get_engine("speed", model, **options)
    cache, out, stats, sampler = _start_request(model, prompt, n, **sampling)
    pipeline = engine.pipeline(cache, len(prompt), out, stats, sampler)
    emitted = list(out.tokens)
    with torch.inference_mode():
        while not pipeline.done:
            plan = pipeline.plan()
            assert list(plan.loops) == sorted(plan.loops)  # newest first: ascending loops
            assert plan.rows.shape[0] == len(plan.positions) + len(plan.spare_positions) <= engine.max_rows
            emitted += pipeline.advance(*_run_by_hand(model, plan))
    pipeline.finish()
    stats.new_tokens = len(out.tokens)  # Engine.run's part, as prefill is
    assert emitted == out.tokens == ref.tokens
    assert _counters(stats) == _counters(ref.stats)
    if options.get("guesses", 1) > 1 and case == 0:
        assert stats.spare_hits > 0
    if options.get("early_correction") and case == 1:
        assert stats.corrections > 0


def test_pipelines_of_several_requests_advance_independently():
    """A scheduler's shape: plan every request, run, advance each, requests
    joining and finishing at different steps; each gets generate's tokens."""
    from speedec.engines.step import run_step

    model = random_model(small_config(n_loops=4, exit_loop=1, exit_readout_rank=4), seed=7)
    requests = [([1, 2, 3], 25, {"guesses": 2}), ([7], 12, {"early_correction": True}), ([5, 5], 18, {})]
    live = []
    for prompt, n, options in requests:
        cache, out, stats, sampler = _start_request(model, prompt, n)
        live.append((get_engine("speed", model, **options).pipeline(cache, len(prompt), out, stats, sampler),
                     out, stats, prompt, n, options))
    with torch.inference_mode():
        while any(not p.done for p, *_ in live):
            plans = [(p, p.plan()) for p, *_ in live if not p.done]
            for pipeline, plan in plans:
                pipeline.advance(*run_step(model, plan))
    for pipeline, out, stats, prompt, n, options in live:
        pipeline.finish()
        stats.new_tokens = len(out.tokens)
        ref = generate(model, prompt, n, engine="speed", **options)
        assert out.tokens == ref.tokens and _counters(stats) == _counters(ref.stats)


def test_adaptive_policy_learns_only_what_sampled_draws_say():
    """Greedy, a guess's candidates are the exit's ranking, so a verification
    teaches every a_b. Sampling, they are the tokens drawn: one draw says
    nothing of a second, and a_2 must not be dragged down by single draws."""
    from speedec.engines.policy import SpeculationPolicy

    policy = SpeculationPolicy(4, 1, [1.0] * 7, max_guesses=2)
    for _ in range(200):
        policy.record(None, known=1)
    assert policy.hit_rate[0] < 1e-4 and policy.hit_rate[1] == 1.0
    policy.record(1, known=2)
    assert policy.hit_rate[1] == 1.0 and policy.hit_rate[0] < 1e-4
    policy.record(None, known=2)
    assert policy.hit_rate[1] == pytest.approx(1 - 1 / 16)

    exit_map, final_map = _maps(10, 0)
    model = mapping_model(exit_map, final_map, n_loops=4, exit_loop=1)
    # Rows beyond the depth are dear: the policy launches one candidate, never two.
    costs = [1.0, 1.0, 1.0, 1.0, 50.0, 50.0, 50.0]
    for sampling in ({}, {"temperature": 1.0, "seed": 3}):
        engine = get_engine("speed", model, adaptive=True, guesses=2, step_costs=costs)
        cache, out, stats, sampler = _start_request(model, [2, 5], 40, **sampling)
        pipeline = engine.pipeline(cache, 2, out, stats, sampler)
        recorded = []
        record = pipeline.policy.record
        pipeline.policy.record = lambda rank, known=None: (recorded.append((rank, known)),
                                                           record(rank, known=known))
        with torch.inference_mode():
            while not pipeline.done:
                pipeline.advance(*_run_by_hand(model, pipeline.plan()))
        pipeline.finish()
        assert stats.spares_launched == 0 and recorded
        hit_rate = pipeline.policy.hit_rate
        if not sampling:  # the final prediction is the exit's second choice: a_1 -> 0, a_2 -> 1
            assert all(known is None and rank == 1 for rank, known in recorded)
            assert hit_rate[0] < 0.1 and hit_rate[1] == 1.0
        else:  # one draw per guess: a_1 learns, a_2 keeps its estimate
            assert all(known == 1 and rank in (0, None) for rank, known in recorded)
            assert any(rank is None for rank, _ in recorded) and hit_rate[0] < 1.0
            assert hit_rate[1] == 1.0


def _modelled_cost(model, costs, n, **options):
    """Sum over the steps of t(rows in the step) on the cost table ``costs``."""
    engine = get_engine("speed", model, **options)
    cache, out, stats, sampler = _start_request(model, [2, 5], n)
    pipeline = engine.pipeline(cache, 2, out, stats, sampler)
    total = 0.0
    with torch.inference_mode():
        while not pipeline.done:
            plan = pipeline.plan()
            total += costs[min(plan.rows.shape[0], len(costs)) - 1]
            pipeline.advance(*_run_by_hand(model, plan))
    pipeline.finish()
    return total, out.tokens


@pytest.mark.parametrize("n_loops,exit_loop", [(8, 1), (4, 1), (6, 2)])
def test_adaptive_depth_never_costs_more_than_the_fixed_pipeline(n_loops, exit_loop):
    """On hand-built step-cost tables the adaptive pipeline's modelled cost is at
    most the fixed pipeline's, and below it where rows grow dear and the
    acceptance does not pay for them."""
    depth = -(-n_loops // exit_loop)
    tables = {"flat to 4, then steep": ([1.0, 1.0, 1.0, 1.05] + [1.05 + 0.6 * i for i in range(1, depth)])[:depth],
              "flat": [1.0] * depth,
              "steep from 2": [1.0] + [2.0 * i for i in range(1, depth)]}
    for agree in ("always", "never", 2, 5):
        exit_map, final_map = _maps(10, 0 if agree in ("always", "never") else agree)
        model = mapping_model(exit_map, exit_map if agree == "always" else final_map,
                              n_loops=n_loops, exit_loop=exit_loop)
        for name, costs in tables.items():
            fixed, ref = _modelled_cost(model, costs, 60)
            adaptive, tokens = _modelled_cost(model, costs, 60, adaptive=True, step_costs=costs)
            assert tokens == ref, (agree, name)
            assert adaptive <= fixed, (agree, name, adaptive, fixed)
            if name == "flat":  # nothing to save: it guesses as the fixed pipeline does
                assert adaptive == fixed
            if agree != "always" and (name == "steep from 2" or name != "flat" and n_loops == 8):
                assert adaptive < 0.9 * fixed, (agree, name, adaptive, fixed)


def test_speculation_policy_trims_spares_at_the_rows_in_flight():
    from speedec.engines.policy import SpeculationPolicy

    # L=4, e=1, two candidates; the second always right. Full pipelines: 4 rows
    # (one candidate) cost 1.0, 7 rows (two) 1.1: two pay for the pipeline...
    policy = SpeculationPolicy(4, 1, [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 1.1], max_guesses=2)
    for _ in range(200):
        policy.record(1)
    assert policy.choose() == 2
    # ...but with 2 rows in flight the step would go from 3 rows (1.0) to 4 (2.0):
    # 3 steps x 2.0 against 4 steps x 1.0, so one candidate only.
    assert policy.choose(2) == 1
    assert policy.expected_cost(2, 2) == pytest.approx(3 * 2.0, rel=1e-3)
    assert policy.expected_cost(1, 2) == pytest.approx(4 * 1.0, rel=1e-3)
    assert policy.choose(5) == 2  # 5 + 2 rows: 1.1
