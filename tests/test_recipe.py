"""The depth recipe's knobs: loss schedules, per-loop weights, loop embedding, exit readout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import random_model, small_config
from speedec import ConfigError, LoopedLM, ModelConfig, generate
from speedec.errors import TrainingError
from speedec.tokenizer import BPETokenizer, train_bpe
from speedec.training import TrainConfig, train
from speedec.training.exit_fit import ExitFitSettings, fit_exit_readout, with_readout
from speedec.training.loss import LossSchedule, LossWeights, looped_loss, loss_loops

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "english_sample.txt"


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -------------------------------------------------------------- schedules
def _schedule(kind, window=(0.0, 1.0), **weights):
    return LossSchedule(base=LossWeights(**weights), kind=kind, window=window, total_steps=100)


def test_loop_weight_combines_the_terms():
    config = small_config(n_loops=4, exit_loop=1)
    weights = LossWeights(exit_weight=0.5, all_loops_weight=0.3, loop_weights=(0.0, 0.2, 0.4))
    assert weights.loop_weight(config, 1) == pytest.approx(0.5 + 0.1)
    assert weights.loop_weight(config, 2) == pytest.approx(0.1 + 0.2)
    assert weights.loop_weight(config, 3) == pytest.approx(0.1 + 0.4)
    assert loss_loops(config, LossWeights(exit_weight=0.0, loop_weights=(0.0, 0.0, 1.0))) == (3,)


def test_constant_schedule_is_the_base_weights():
    schedule = _schedule("constant", exit_weight=0.7)
    assert schedule.at(0, 4) == schedule.base == schedule.at(99, 4)


def test_ramp_rises_linearly_across_its_window():
    config = small_config(n_loops=4, exit_loop=1)
    schedule = _schedule("ramp", window=(0.5, 1.0), exit_weight=0.4)
    assert schedule.at(0, 4).loop_weight(config, 1) == 0.0
    assert schedule.at(50, 4).loop_weight(config, 1) == 0.0
    assert schedule.at(75, 4).loop_weight(config, 1) == pytest.approx(0.2)
    assert schedule.at(100, 4).loop_weight(config, 1) == pytest.approx(0.4)
    assert loss_loops(config, schedule.at(10, 4)) == ()  # nothing to read out before the ramp


def test_curriculum_switches_on_the_deepest_readout_first():
    config = small_config(n_loops=4, exit_loop=1)
    schedule = _schedule("curriculum", window=(0.0, 0.9), exit_weight=1.0, loop_weights=(0.1, 0.2, 0.3))
    # Loop 3 from the start, loop 2 from 0.3 of the run, loop 1 (the exit) from 0.6.
    assert loss_loops(config, schedule.at(0, 4)) == (3,)
    assert loss_loops(config, schedule.at(29, 4)) == (3,)
    assert loss_loops(config, schedule.at(30, 4)) == (2, 3)
    assert loss_loops(config, schedule.at(60, 4)) == (1, 2, 3)
    assert schedule.at(60, 4).loop_weight(config, 1) == pytest.approx(1.1)


def test_looped_loss_with_per_loop_weights_matches_hand_computation():
    config = ModelConfig(vocab_size=3, d_model=8, n_heads=2, n_kv_heads=1, ffn_dim=8, n_unique_layers=1,
                         n_loops=3, exit_loop=1)
    final = torch.tensor([[[2.0, 0.0, 0.0]]])
    loop1 = torch.tensor([[[0.0, 1.0, 0.0]]])
    loop2 = torch.tensor([[[0.0, 0.0, 1.0]]])
    targets = torch.tensor([[0]])
    out = type("Out", (), {"logits": final, "loop_logits": {1: loop1, 2: loop2}, "draft_logits": None})()
    weights = LossWeights(exit_weight=0.5, loop_weights=(0.0, 0.25))
    loss = looped_loss(out, targets, config, weights)

    def ce(logits):
        return -torch.log_softmax(logits[0, 0], -1)[0]

    assert loss.total.item() == pytest.approx((ce(final) + 0.5 * ce(loop1) + 0.25 * ce(loop2)).item())
    assert loss.exit.item() == pytest.approx(ce(loop1).item())


@pytest.mark.parametrize("changes,match", [
    ({"loop_weights": [0.1, 0.2, 0.3, 0.4]}, "loop_weights must have n_loops - 1 = 2"),
    ({"loop_weights": "rising"}, "loop_weights must be a list"),
    ({"loop_weights": [0.1, -1.0]}, "loop_weights entries must be >= 0"),
    ({"exit_schedule": "cosine"}, "exit_schedule must be one of constant, ramp, curriculum"),
    ({"exit_schedule_window": [0.8, 0.2]}, "exit_schedule_window must be"),
    ({"draft_weight": -1}, "draft_weight must be >= 0"),
])
def test_recipe_fields_are_validated(tmp_path, changes, match):
    fields = dict(tokenizer="t.json", train_file="a.txt", val_file="b.txt", out_dir=str(tmp_path),
                  model=small_config(n_loops=3), max_steps=10, warmup_steps=1, seq_len=32)
    with pytest.raises(TrainingError, match=match):
        TrainConfig(**fields, **changes).resolve_model_config()


def test_model_fields_are_validated_and_omitted_at_default():
    assert "loop_embedding" not in small_config().to_dict()
    assert "exit_readout_rank" not in small_config().to_dict()
    assert small_config(exit_readout_rank=4).to_dict()["exit_readout_rank"] == 4
    with pytest.raises(ConfigError, match="exit_readout_rank needs an early exit"):
        small_config(n_loops=1, exit_loop=None, exit_readout_rank=4)
    with pytest.raises(ConfigError, match="exit_readout_rank must be an integer from 1 to d_model"):
        small_config(exit_readout_rank=0)
    with pytest.raises(ConfigError, match="loop_embedding must be true or false"):
        small_config(loop_embedding=1)


# ------------------------------------------------------------ exit readout
def test_readout_gradient_does_not_reach_the_trunk():
    model = random_model(small_config(exit_readout_rank=4, loop_embedding=True), dtype=torch.float32).train()
    tokens = torch.randint(0, 40, (2, 10))
    out = model(tokens, output_draft=True)
    from speedec.training.loss import distillation

    distillation(out.draft_logits, out.logits, tokens).backward()
    for name, p in model.named_parameters():
        if name.startswith("exit_readout."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or not p.grad.any(), name


def test_draft_term_leaves_the_trunk_gradient_unchanged():
    config = small_config(exit_readout_rank=4)
    tokens = torch.randint(0, 40, (2, 10))
    grads = []
    for draft_weight in (0.0, 1.0):
        model = random_model(config, dtype=torch.float64).train()
        weights = LossWeights(exit_weight=0.5, draft_weight=draft_weight)
        out = model(tokens[:, :-1], output_loops=loss_loops(config, weights), output_draft=True)
        looped_loss(out, tokens[:, 1:], config, weights).total.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("exit_")})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0)


def test_forward_and_engines_agree_with_loop_embedding_and_readout():
    config = small_config(n_loops=4, exit_loop=2, exit_readout_rank=8, loop_embedding=True)
    model = random_model(config)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    out = model(torch.tensor([prompt]), output_draft=True)
    # The engine's prefill gives the first token from the same final logits.
    result = generate(model, prompt, 1, engine="autoregressive")
    assert result.tokens == [int(out.logits[0, -1].argmax())]
    # The readout of the decoding path equals the forward's draft logits.
    x = model.embed(torch.tensor([prompt]))
    from speedec.cache import KVCache

    cache = KVCache(config, len(prompt), dtype=model.dtype, device=model.device)
    hidden = model.run_loops(x, model.layout([list(range(len(prompt)))], [0]), cache, config.exit_loop)
    torch.testing.assert_close(model.exit_head(hidden[0]), out.draft_logits[0])


@pytest.mark.parametrize("engine,options", [("speed", {}), ("self-speculative", {"draft_tokens": 3})])
def test_engines_draft_through_the_readout(engine, options):
    config = small_config(n_loops=4, exit_loop=1, exit_readout_rank=4)
    model = random_model(config)
    rows = []
    model.exit_readout.register_forward_hook(lambda module, args, output: rows.append(args[0].reshape(-1, config.d_model).shape[0]))
    prompt = [1, 2, 3, 4]
    result = generate(model, prompt, 24, engine=engine, **options)
    assert result.tokens == generate(model, prompt, 24, engine="autoregressive").tokens
    # Every guess was read out through the readout, one row per guess; speed also reads the
    # exit of a slot that the same step's verification then flushes.
    assert result.stats.drafts_launched > 0
    if engine == "speed":
        assert result.stats.drafts_launched <= sum(rows) <= result.stats.drafts_launched + result.stats.flushes
    else:
        assert sum(rows) == result.stats.drafts_launched


def test_readout_decides_the_drafts():
    """Same trunk, two readouts: same tokens, different guesses."""
    config = small_config(n_loops=4, exit_loop=1, exit_readout_rank=4)
    model = random_model(config, seed=3)
    prompt = [5, 6, 7]
    first = generate(model, prompt, 32, engine="speed")
    with torch.no_grad():
        model.exit_readout.start_from(model.norm)  # the readout now reads like the shared exit
    plain = generate(model, prompt, 32, engine="speed")
    assert first.tokens == plain.tokens
    shared = LoopedLM(config.replace(exit_readout_rank=None)).to(torch.float64)
    shared.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("exit_")})
    assert generate(shared, prompt, 32, engine="speed").stats.to_dict()["drafts_accepted"] == \
        plain.stats.drafts_accepted


# ------------------------------------------------------------- train-exit
@pytest.fixture(scope="module")
def text(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    sample = SAMPLE.read_text(encoding="utf-8")
    (root / "train.txt").write_text(sample[:60_000], encoding="utf-8")
    (root / "val.txt").write_text(sample[60_000:80_000], encoding="utf-8")
    train_bpe([root / "train.txt"], root / "tokenizer.json", vocab_size=300)
    return root


def test_train_exit_raises_agreement_and_leaves_the_output(text):
    config = ModelConfig(vocab_size=300, d_model=32, n_heads=4, n_kv_heads=2, ffn_dim=64, n_unique_layers=2,
                         n_loops=4, exit_loop=1, max_seq_len=64)
    model = LoopedLM.random(config, seed=0, std=0.3, residual_scale=3.0)
    tokenizer = BPETokenizer(text / "tokenizer.json")
    settings = ExitFitSettings(rank=16, steps=80, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=5,
                               eval_windows=16)
    result = fit_exit_readout(model, tokenizer, text / "train.txt", text / "val.txt", settings, progress=False)
    assert result.after["draft_agreement"] > result.before["draft_agreement"] + 0.05
    assert result.before["draft_agreement"] == pytest.approx(result.before["exit_agreement"])
    assert result.after["loss"] == pytest.approx(result.before["loss"])  # the trunk did not move
    trunk = {k: v for k, v in result.model.state_dict().items() if not k.startswith("exit_readout.")}
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(trunk[name], tensor, rtol=0, atol=0)


def test_with_readout_refuses_single_loop_models():
    model = LoopedLM.random(small_config(n_loops=1, exit_loop=None))
    with pytest.raises(TrainingError, match="single loop"):
        with_readout(model, 4, None)


def test_train_exit_command(text, tmp_path):
    from speedec.cli import cli

    config = ModelConfig(vocab_size=300, d_model=32, n_heads=4, n_kv_heads=2, ffn_dim=64, n_unique_layers=2,
                         n_loops=3, exit_loop=1, max_seq_len=64)
    LoopedLM.random(config, seed=1).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_bytes((text / "tokenizer.json").read_bytes())
    runner = CliRunner()
    args = ["train-exit", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "fitted"), "--train",
            str(text / "train.txt"), "--val", str(text / "val.txt"), "--steps", "5", "--seq-len", "32",
            "--rank", "4", "--exit-loop", "2", "--json", "--no-progress", "--threads", "1"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["rank"] == 4 and report["exit_loop"] == 2
    fitted = LoopedLM.from_pretrained(tmp_path / "fitted")
    assert fitted.config.exit_readout_rank == 4 and fitted.config.exit_loop == 2
    assert (tmp_path / "fitted" / "tokenizer.json").is_file()
    bad = runner.invoke(cli, args[:-3] + ["--exit-loop", "3"])
    assert bad.exit_code == 2 and "exit_loop" in bad.output


# ---------------------------------------------------------------- trainer
def test_training_with_every_knob_logs_the_draft_loss(text, tmp_path):
    model = ModelConfig(vocab_size=300, d_model=32, n_heads=4, n_kv_heads=2, ffn_dim=64, n_unique_layers=2,
                        n_loops=3, exit_loop=1, max_seq_len=64, exit_readout_rank=4, loop_embedding=True)
    config = TrainConfig(tokenizer=str(text / "tokenizer.json"), train_file=str(text / "train.txt"),
                         val_file=str(text / "val.txt"), out_dir=str(tmp_path / "run"), model=model,
                         seq_len=32, batch_size=4, max_steps=6, warmup_steps=2, log_every=1, eval_every=3,
                         eval_batches=1, save_every=3, threads=1, device="cpu", exit_weight=0.0,
                         loop_weights=[0.1, 0.3], exit_schedule="curriculum", exit_schedule_window=[0.0, 0.5])
    summary = train(config, progress=False)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trains = [e for e in events if e["event"] == "train"]
    assert all(e["loss_draft"] > 0 for e in trains)
    assert trains[0]["loss_exit"] == 0.0 and trains[-1]["loss_exit"] > 0  # the exit joined at half the run
    assert 0 <= summary.eval["draft_agreement"] <= 1
    loaded = LoopedLM.from_pretrained(summary.model_dir)
    assert loaded.config.exit_readout_rank == 4 and loaded.config.loop_embedding
