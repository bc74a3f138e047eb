"""Training recipe: loss, schedule, data, checkpoints, resume, DDP, evaluation, CLI."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import train_killed_after_step_3
from speedec import LoopedLM, ModelConfig
from speedec.cli.train import eval_command, tokenizer_group, train_command
from speedec.errors import SpeedecError, TrainingError
from speedec.model import LoopedOutput
from speedec.tokenizer import BPETokenizer, train_bpe
from speedec.training import (
    CosineSchedule,
    LossWeights,
    TrainConfig,
    evaluate_model,
    looped_loss,
    train,
    trainer,
)
from speedec.training import checkpoint as ckpt
from speedec.training.data import (
    encode_text,
    evaluation_windows,
    load_tokens,
    split_chunks,
    training_batch,
)
from speedec.training.loss import loss_loops

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "english_sample.txt"

TINY_MODEL = dict(vocab_size=300, d_model=32, n_heads=4, n_kv_heads=2, ffn_dim=64, n_unique_layers=2,
                  n_loops=3, exit_loop=1, max_seq_len=64)


def _english(n_chars: int) -> str:
    """Real English from the corpus sample when present, else generated sentences."""
    if SAMPLE.is_file():
        return SAMPLE.read_text(encoding="utf-8")[:n_chars]
    rng = random.Random(0)
    words = ("the king queen river ship letter moon house field song road sea old young small green "
             "sees likes follows carries finds loves watches and but then").split()
    sentences = (" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))).capitalize() + "."
                 for _ in range(n_chars // 40))
    return " ".join(sentences)[:n_chars]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine two
    OpenMP threads stall each other on every small op."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    text = _english(90_000)
    (root / "train.txt").write_text(text[:75_000], encoding="utf-8")
    (root / "val.txt").write_text(text[75_000:], encoding="utf-8")
    train_bpe([root / "train.txt"], root / "tokenizer.json", vocab_size=300)
    return {"train": root / "train.txt", "val": root / "val.txt", "tokenizer": root / "tokenizer.json"}


def tiny_config(corpus, out_dir, **overrides) -> TrainConfig:
    fields = dict(tokenizer=str(corpus["tokenizer"]), train_file=str(corpus["train"]),
                  val_file=str(corpus["val"]), out_dir=str(out_dir), model=ModelConfig(**TINY_MODEL),
                  seq_len=32, batch_size=4, max_steps=6, warmup_steps=2, lr=3e-3, log_every=1,
                  eval_every=3, eval_batches=1, save_every=3, threads=1, device="cpu")
    fields.update(overrides)
    return TrainConfig(**fields)


def train_losses(out_dir) -> list[float]:
    lines = Path(out_dir, "metrics.jsonl").read_text().splitlines()
    return [e["loss"] for e in map(json.loads, lines) if e["event"] == "train"]


# ------------------------------------------------------------------ loss
def test_loss_matches_hand_computation():
    config = ModelConfig(**{**TINY_MODEL, "vocab_size": 3})
    final = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # [B=1, T=2, V=3]
    loop1 = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 3.0]]])
    loop2 = torch.tensor([[[0.0, 3.0, 0.0], [0.0, 0.0, 0.0]]])
    targets = torch.tensor([[0, 1]])

    def ce(row, target):  # -log softmax(row)[target]
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))

    def mean_ce(logits):
        return (ce(logits[0][0].tolist(), 0) + ce(logits[0][1].tolist(), 1)) / 2

    output = LoopedOutput(logits=final, loop_logits={1: loop1, 2: loop2})
    only_exit = looped_loss(output, targets, config, LossWeights(exit_weight=0.5))
    assert only_exit.final.item() == pytest.approx(mean_ce(final), abs=1e-6)
    assert only_exit.exit.item() == pytest.approx(mean_ce(loop1), abs=1e-6)
    assert only_exit.all_loops is None
    assert only_exit.total.item() == pytest.approx(mean_ce(final) + 0.5 * mean_ce(loop1), abs=1e-6)

    both = looped_loss(output, targets, config, LossWeights(exit_weight=1.0, all_loops_weight=0.25))
    expected = mean_ce(final) + 1.0 * mean_ce(loop1) + 0.25 * (mean_ce(loop1) + mean_ce(loop2)) / 2
    assert both.total.item() == pytest.approx(expected, abs=1e-6)

    assert loss_loops(config, LossWeights(exit_weight=0.5)) == (1,)
    assert loss_loops(config, LossWeights(exit_weight=0.0, all_loops_weight=1.0)) == (1, 2)
    assert loss_loops(config, LossWeights(exit_weight=0.0)) == ()
    no_exit = looped_loss(LoopedOutput(logits=final, loop_logits={}), targets, config,
                          LossWeights(exit_weight=0.0))
    assert no_exit.exit is None and no_exit.total.item() == pytest.approx(mean_ce(final), abs=1e-6)


def test_schedule_values():
    s = CosineSchedule(peak=1e-3, minimum=1e-4, warmup_steps=4, total_steps=14)
    assert [s(i) for i in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert s(4) == pytest.approx(1e-3)  # end of warmup: the peak
    assert s(9) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 5 / 9)))
    assert s(13) == pytest.approx(1e-4)  # last step: the floor
    values = [s(i) for i in range(4, 14)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# ------------------------------------------------------------------ data
def test_window_sampling_is_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    a = training_batch(tokens, seq_len=16, batch_size=8, seed=3, step=5)
    assert a.shape == (8, 17) and a.dtype == torch.int64
    assert torch.equal(a, training_batch(tokens, seq_len=16, batch_size=8, seed=3, step=5))
    assert not torch.equal(a, training_batch(tokens, seq_len=16, batch_size=8, seed=3, step=6))
    assert not torch.equal(a, training_batch(tokens, seq_len=16, batch_size=8, seed=4, step=5))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 16, dtype=torch.int64))  # contiguous windows
    shares = [training_batch(tokens, seq_len=16, batch_size=8, seed=3, step=5, rank=r, world_size=2)
              for r in range(2)]
    assert torch.equal(torch.cat(shares), a)  # ranks split the same global batch
    with pytest.raises(TrainingError, match="divisible"):
        training_batch(tokens, seq_len=16, batch_size=8, seed=3, step=5, rank=0, world_size=3)
    windows = evaluation_windows(tokens, 16, 5)
    assert windows.shape == (5, 17) and windows[0, 0] == 0 and windows[-1, -1] == 999
    assert evaluation_windows(tokens, 16, 10_000).shape[0] == 1000 // 17


def test_chunked_encoding_equals_whole_text(corpus):
    tok = BPETokenizer(corpus["tokenizer"])
    text = corpus["val"].read_text() + " don't  'quoted'\tword 12.5 — ünï\n\n  indented"
    chunks = split_chunks(text, 200)
    assert len(chunks) > 5 and "".join(chunks) == text
    assert encode_text(text, tok, 200).tolist() == tok.encode(text)


def test_token_cache_is_keyed_by_tokenizer(corpus, tmp_path, monkeypatch):
    text_file = tmp_path / "t.txt"
    text_file.write_text(corpus["val"].read_text())
    tok = BPETokenizer(corpus["tokenizer"])
    tokens = load_tokens(text_file, tok)
    caches = list(tmp_path.glob("t.txt.tokens-*.npy"))
    assert len(caches) == 1 and tokens.dtype == np.uint16
    assert tokens.tolist() == tok.encode(text_file.read_text())
    monkeypatch.setattr("speedec.training.data.encode_text", lambda *a, **k: pytest.fail("cache unused"))
    assert np.array_equal(load_tokens(text_file, tok), tokens)
    monkeypatch.undo()
    other = train_bpe([text_file], tmp_path / "other.json", vocab_size=280)
    load_tokens(text_file, other)
    assert len(list(tmp_path.glob("t.txt.tokens-*.npy"))) == 2
    with pytest.raises(TrainingError, match="does not exist"):
        load_tokens(tmp_path / "missing.txt", tok)


# ---------------------------------------------------------------- config
def test_train_config_validation(corpus, tmp_path):
    good = tiny_config(corpus, tmp_path)
    assert good.total_steps == 6 and good.tokens_per_step == 128
    assert good.replace(max_steps=None, max_tokens=1000).total_steps == 8  # rounded up
    bad = [
        (dict(max_steps=None), "exactly one of max_steps or max_tokens"),
        (dict(max_tokens=100), "exactly one of max_steps or max_tokens"),
        (dict(preset="tiny"), "exactly one of model"),
        (dict(model=None), "exactly one of model"),
        (dict(batch_size=6, grad_accum=4), "divisible"),
        (dict(lr=0.0), "lr must be positive"),
        (dict(min_lr=1.0), "must not exceed lr"),
        (dict(seq_len=0), "seq_len must be >= 1"),
        (dict(threads=0), "threads must be >= 1"),
        (dict(batch_size=2.5), "batch_size must be an integer"),
        (dict(beta2=1.0), r"beta2 must be in \[0, 1\)"),
        (dict(warmup_steps=6), "warmup_steps"),
        (dict(device="tpu"), "device must be one of"),
        (dict(exit_weight=-1.0), "exit_weight must be >= 0"),
    ]
    for changes, message in bad:
        with pytest.raises(TrainingError, match=message):
            tiny_config(corpus, tmp_path, **changes)
    with pytest.raises(TrainingError, match="max_seq_len"):
        tiny_config(corpus, tmp_path, seq_len=65).resolve_model_config()
    single = ModelConfig(**{**TINY_MODEL, "n_loops": 1, "exit_loop": None})
    with pytest.raises(TrainingError, match="exit_weight > 0 needs a model with an early exit"):
        tiny_config(corpus, tmp_path, model=single).resolve_model_config()
    with pytest.raises(TrainingError, match="unknown preset"):
        tiny_config(corpus, tmp_path, model=None, preset="huge").resolve_model_config()

    path = tmp_path / "c.json"
    path.write_text(json.dumps(good.to_dict()))
    assert TrainConfig.from_file(path) == good
    assert TrainConfig.from_file(path, {"lr": 1e-3}).lr == 1e-3
    path.write_text(json.dumps({**good.to_dict(), "learning_rate": 1}))
    with pytest.raises(TrainingError, match="unknown training config field.*learning_rate"):
        TrainConfig.from_file(path)
    path.write_text(json.dumps({**good.to_dict(), "model": {**TINY_MODEL, "d_model": 30}}))
    with pytest.raises(TrainingError, match="model: d_model"):
        TrainConfig.from_file(path)
    path.write_text("{nope")
    with pytest.raises(TrainingError, match="not valid JSON"):
        TrainConfig.from_file(path)
    with pytest.raises(TrainingError, match="does not exist"):
        TrainConfig.from_file(tmp_path / "none.json")


@pytest.mark.parametrize("name", ["default", "depth-L1", "depth-L2", "depth-L4"])
def test_bundled_configs_are_valid(name):
    config = TrainConfig.from_file(REPO / "configs" / "train" / f"{name}.json")
    model = config.resolve_model_config()
    assert model.vocab_size == 8192 and model.n_unique_layers == 2
    if name.startswith("depth"):
        reference = TrainConfig.from_file(REPO / "configs" / "train" / "depth-L4.json")
        assert config.max_tokens == reference.max_tokens
        assert model.replace(n_loops=4, exit_loop=1) == reference.resolve_model_config()
        assert model.n_loops == int(name[-1])


# ------------------------------------------------------------ checkpoints
def test_checkpoint_survives_failure_mid_save(corpus, tmp_path, monkeypatch):
    config = tiny_config(corpus, tmp_path / "run")
    root = tmp_path / "ckpt"
    model = LoopedLM.random(config.model, seed=1)
    optimizer = trainer.build_optimizer(model, config)
    state = ckpt.TrainingState(step=3, tokens_seen=384, elapsed_s=1.5,
                               optimizer=optimizer.state_dict(), rng=ckpt.capture_rng())
    ckpt.save_checkpoint(root, model, state, config, corpus["tokenizer"])

    changed = LoopedLM.random(config.model, seed=2)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    for target in ("write_training_state", "switch_pointer"):  # mid-files, and at the pointer switch
        with monkeypatch.context() as m:
            m.setattr(ckpt, target, crash)
            with pytest.raises(OSError, match="disk full"):
                ckpt.save_checkpoint(root, changed, ckpt.TrainingState(6, 768, 3.0, {}, {}), config,
                                     corpus["tokenizer"])
        loaded = ckpt.load_checkpoint(ckpt.latest_checkpoint(root))
        assert loaded.state.step == 3 and loaded.config == config
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[name], tensor)

    # A kill leaves a temporary directory (and possibly an orphan step dir): ignored, then cleaned.
    (root / ".tmp-step-00000006-x").mkdir()
    (root / "step-00000006").mkdir(exist_ok=True)
    assert ckpt.latest_checkpoint(root).name == "step-00000003"
    state.step = 6
    ckpt.save_checkpoint(root, changed, state, config, corpus["tokenizer"])
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000006"]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(root)).state.step == 6


def test_resume_matches_uninterrupted_run(corpus, tmp_path, monkeypatch):
    straight = train(tiny_config(corpus, tmp_path / "a"), progress=False)

    train_killed_after_step_3(monkeypatch, trainer, train, tiny_config(corpus, tmp_path / "b"))
    assert len(train_losses(tmp_path / "b")) == 4
    with open(tmp_path / "b" / "metrics.jsonl", "a") as fh:
        fh.write('{"event": "tra')  # a line torn by the kill
    with pytest.raises(TrainingError, match="already holds a checkpoint"):
        train(tiny_config(corpus, tmp_path / "b"), progress=False)
    with pytest.raises(TrainingError, match="config differs in lr"):
        train(tiny_config(corpus, tmp_path / "b", lr=1e-3), resume=True, progress=False)
    resumed = train(tiny_config(corpus, tmp_path / "b", eval_every=2), resume=True, progress=False)

    assert resumed.resumed_from == 3 and resumed.steps == straight.steps == 6
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")
    a = LoopedLM.from_pretrained(straight.model_dir).state_dict()
    b = LoopedLM.from_pretrained(resumed.model_dir).state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert sorted(p.name for p in straight.model_dir.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "train_config.json"]
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(tiny_config(corpus, tmp_path / "c"), resume=True, progress=False)


def test_training_errors_are_one_line(corpus, tmp_path):
    cases = [
        (dict(train_file=str(tmp_path / "none.txt")), "train_file .* does not exist"),
        (dict(tokenizer=str(corpus["train"])), "cannot load tokenizer"),
        (dict(model=ModelConfig(**{**TINY_MODEL, "vocab_size": 100})), "has only 100"),
        (dict(init_from=str(tmp_path / "nowhere"), model=None), "init_from"),
    ]
    for changes, message in cases:
        with pytest.raises(TrainingError, match=message) as info:
            train(tiny_config(corpus, tmp_path / "run", **changes), progress=False)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------- DDP
def test_two_process_ddp_matches_one_process(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "single", max_steps=4, eval_every=4, save_every=4)
    single = train(config, progress=False)
    config_file = tmp_path / "ddp.json"
    # Each rank takes 2 of the 4 sequences, in 2 micro-batches (gradient accumulation under no_sync).
    config_file.write_text(json.dumps(config.replace(out_dir=str(tmp_path / "ddp"), grad_accum=2).to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "-m", "speedec.cli", "train", "--config", str(config_file), "--no-progress"],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("trained 4 steps") == 1  # only rank 0 reports
    assert train_losses(tmp_path / "ddp") == pytest.approx(train_losses(tmp_path / "single"), abs=1e-5)
    events = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    ddp_eval = [e for e in events if e["event"] == "eval"][-1]
    assert ddp_eval["tokens"] == single.eval["tokens"]
    assert ddp_eval["loss_per_loop"] == pytest.approx(single.eval["loss_per_loop"], abs=1e-5)
    a = LoopedLM.from_pretrained(single.model_dir).state_dict()
    b = LoopedLM.from_pretrained(tmp_path / "ddp" / "model").state_dict()
    assert all(torch.allclose(a[name], b[name], atol=1e-5) for name in a)


# ------------------------------------------------------------ evaluation
def test_evaluate_model_reports_every_loop(corpus):
    tok = BPETokenizer(corpus["tokenizer"])
    model = LoopedLM.random(ModelConfig(**TINY_MODEL), seed=0, std=0.5, residual_scale=3.0)
    result = evaluate_model(model, tok, corpus["val"], seq_len=32, windows=6, batch_size=4, prompts=3,
                            prompt_tokens=8, new_tokens=12)
    assert result["tokens"] == 6 * 32 and result["n_loops"] == 3 and result["exit_loop"] == 1
    assert len(result["loss_per_loop"]) == len(result["ppl_per_loop"]) == 3
    assert all(p > 1 for p in result["ppl_per_loop"])
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert result["agreement_per_loop"][-1] == 1.0
    assert result["exit_agreement"] == result["agreement_per_loop"][0]
    assert 0.0 <= result["acceptance"] <= 1.0 and result["prompts"] == 3
    assert 1.0 <= result["steps_per_token"] <= 3.0 + 1e-9  # between exit_loop and n_loops
    json.dumps(result)

    single = LoopedLM.random(ModelConfig(**{**TINY_MODEL, "n_loops": 1, "exit_loop": None}))
    flat = evaluate_model(single, tok, corpus["val"], seq_len=32, windows=2, prompts=3)
    assert flat["exit_agreement"] is None and flat["acceptance"] is None
    assert len(flat["loss_per_loop"]) == 1
    with pytest.raises(TrainingError, match="max_seq_len"):
        evaluate_model(model, tok, corpus["val"], prompt_tokens=32, new_tokens=64)


# ------------------------------------------------------------------- CLI
def test_cli_commands(corpus, tmp_path):
    runner = CliRunner()
    tok_path = tmp_path / "tok" / "tokenizer.json"
    result = runner.invoke(tokenizer_group, ["train", "--input", str(corpus["train"]), "--out",
                                             str(tok_path), "--vocab-size", "300"])
    assert result.exit_code == 0, result.output
    assert tok_path.is_file() and "300 tokens" in result.output

    config_file = tmp_path / "train.json"
    config = tiny_config(corpus, tmp_path / "unused", tokenizer=str(tok_path), max_steps=None,
                         max_tokens=100_000)
    config_file.write_text(json.dumps(config.to_dict()))
    out = tmp_path / "run"
    result = runner.invoke(train_command, ["--config", str(config_file), "--out", str(out),
                                           "--max-steps", "3", "--set", "eval_every=3",
                                           "--set", "all_loops_weight=0.5", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "trained 3 steps" in result.output and (out / "model" / "model.safetensors").is_file()
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["train"] * 3 + ["eval", "done"]
    assert all(e["loss"] > e["loss_final"] > 0 and "loss_all_loops" in e for e in events[:3])
    assert json.loads((out / "train_config.json").read_text())["max_tokens"] is None

    result = runner.invoke(eval_command, ["--model", str(out / "model"), "--data", str(corpus["val"]),
                                          "--json", "--prompts", "2", "--seq-len", "32", "--windows", "4",
                                          "--new-tokens", "8"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["prompts"] == 2 and len(report["agreement_per_loop"]) == 3
    result = runner.invoke(eval_command, ["--model", str(out / "model"), "--data", str(corpus["val"]),
                                          "--prompts", "0", "--seq-len", "32", "--windows", "2"])
    assert result.exit_code == 0 and "<- exit" in result.output

    # Expected failures are SpeedecErrors or usage errors (the main CLI prints them as one line).
    result = runner.invoke(train_command, ["--config", str(config_file), "--out", str(out), "--no-progress"])
    assert isinstance(result.exception, SpeedecError) and "--resume" in str(result.exception)
    result = runner.invoke(train_command, ["--config", str(config_file), "--set", "nonsense"])
    assert result.exit_code == 2 and "FIELD=VALUE" in result.output
    result = runner.invoke(eval_command, ["--model", str(tmp_path / "none"), "--data", str(corpus["val"])])
    assert isinstance(result.exception, SpeedecError)

    # The standalone entry point turns them into `error: ...` and exit code 2.
    proc = subprocess.run([sys.executable, "-m", "speedec.cli", "train", "--config",
                           str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
