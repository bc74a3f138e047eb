"""`speedec train-exit` for translators (issue 24, item 2): the exit readout (drafter) of an
encoder-decoder fitted on sentence pairs with its trunk frozen.

The corpus is synthetic (word-by-word German-English with adjectives moved in
front of their noun), written to a temporary directory with a joint tokenizer;
the translator is tiny, trained without an exit readout and with exit weight 0,
so that its loop-1 exit agrees poorly with the final loop: a fresh readout
starts there and the fit must raise it.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import one_thread, small_config  # noqa: F401 (one_thread: a fixture)
from speedec import LoopedLM
from speedec.cli import cli
from speedec.data.parallel import Pair, jsonl
from speedec.encdec import (
    EncDecConfig,
    EncDecLM,
    TranslationConfig,
    load_translator,
    train_translation,
    translate_ids,
)
from speedec.encdec import exit_fit as encdec_exit_fit
from speedec.encdec.data import load_pairs, split_path, train_joint_tokenizer
from speedec.encdec.exit_fit import fit_translator_readout
from speedec.errors import DataError, TrainingError
from speedec.training.exit_fit import ExitFitSettings

NOUNS = [("haus", "house"), ("katze", "cat"), ("hund", "dog"), ("baum", "tree"), ("wasser", "water"),
         ("brot", "bread"), ("milch", "milk"), ("tisch", "table"), ("stuhl", "chair"), ("buch", "book"),
         ("auto", "car"), ("stadt", "town"), ("berg", "mountain"), ("fluss", "river"), ("blume", "flower")]
ADJECTIVES = [("rot", "red"), ("gross", "big"), ("klein", "small"), ("alt", "old")]
MODEL = dict(vocab_size=300, d_model=32, n_heads=4, n_kv_heads=2, ffn_dim=64, n_encoder_layers=1,
             n_unique_layers=1, n_loops=4, exit_loop=1, max_source_len=64, max_target_len=64,
             bos_token_id=0, pad_token_id=0)


def synthetic_pair(rng: random.Random) -> Pair:
    """2..5 nouns, each followed by an adjective 40% of the time in the source; the
    target puts the adjective first."""
    src, tgt = [], []
    for _ in range(rng.randrange(2, 6)):
        noun_de, noun_en = rng.choice(NOUNS)
        if rng.random() < 0.4:
            adj_de, adj_en = rng.choice(ADJECTIVES)
            src += [noun_de, adj_de]
            tgt += [adj_en, noun_en]
        else:
            src.append(noun_de)
            tgt.append(noun_en)
    return Pair(" ".join(src), " ".join(tgt))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """200 training and 40 validation pairs (distinct draws), and a joint tokenizer."""
    root = tmp_path_factory.mktemp("parallel")
    rng = random.Random(0)
    pairs = [synthetic_pair(rng) for _ in range(240)]
    (root / "train.jsonl").write_text(jsonl(pairs[:200]), encoding="utf-8")
    (root / "validation.jsonl").write_text(jsonl(pairs[200:]), encoding="utf-8")
    train_joint_tokenizer(root, root / "tokenizer.json", vocab_size=300)
    return root


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """A tiny translator without an exit readout, trained 300 steps with exit weight 0;
    returns its model directory (with tokenizer.json)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = TranslationConfig(tokenizer=str(corpus / "tokenizer.json"), data=str(corpus), out_dir=str(out),
                               model=EncDecConfig(**MODEL), batch_size=8, max_steps=300, warmup_steps=5, lr=1e-2,
                               log_every=50, eval_every=1000, eval_batches=1, save_every=1000, threads=1,
                               device="cpu", exit_weight=0.0)
    return train_translation(config, progress=False).model_dir


def trunk(model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in model.state_dict().items() if not n.startswith("exit_readout.")}


def assert_same_trunk(model, expected: dict[str, torch.Tensor]) -> None:
    got = trunk(model)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name  # bit for bit


# ------------------------------------------------------------------ the fit
def test_fit_raises_draft_agreement_and_leaves_the_trunk(trained, corpus, monkeypatch):
    model, tokenizer = load_translator(trained)
    assert model.exit_readout is None
    original = trunk(model)
    frozen = []  # per step: whether the final logits (the trunk's output) could carry a gradient

    def recording(student, teacher, targets):
        frozen.append(not teacher.requires_grad and student.requires_grad)
        return distillation(student, teacher, targets)

    distillation = encdec_exit_fit.distillation
    monkeypatch.setattr(encdec_exit_fit, "distillation", recording)
    settings = ExitFitSettings(rank=8, steps=40, batch_size=8, lr=1e-2, warmup_steps=5)
    result = fit_translator_readout(model, tokenizer, corpus, settings, progress=False)

    assert frozen == [True] * 40  # every step: only the readout had parameters to train
    assert result.model.config.exit_readout_rank == 8 and result.model.config.exit_loop == 1
    # A fresh readout starts as the shared exit...
    assert result.before["draft_agreement"] == pytest.approx(result.before["exit_agreement"])
    # ...whose agreement is poor here (exit weight 0), and fitting on the training pairs
    # raises it on the held-out validation pairs by a wide margin.
    assert result.before["draft_agreement"] < 0.5
    assert result.after["draft_agreement"] > result.before["draft_agreement"] + 0.15
    assert result.after["pairs"] == 40
    # The trunk is the trained model's, bit for bit; the readout learnt (its up starts at zero).
    assert_same_trunk(result.model, original)
    assert result.after["loss_per_loop"] == result.before["loss_per_loop"]
    assert result.model.exit_readout.up.abs().sum() > 0
    assert all(p.requires_grad for p in result.model.parameters())  # unfrozen again


def test_refit_in_place_changes_only_the_readout(trained, corpus):
    model, tokenizer = load_translator(trained)
    first = fit_translator_readout(model, tokenizer, corpus, ExitFitSettings(rank=4, steps=5, warmup_steps=1),
                                   progress=False).model
    readout = {n: t.clone() for n, t in first.state_dict().items() if n.startswith("exit_readout.")}
    original = trunk(first)
    again = fit_translator_readout(first, tokenizer, corpus, ExitFitSettings(steps=5, warmup_steps=1, seed=1),
                                   progress=False)
    assert again.model is first  # same rank and exit: the readout is refitted, not replaced
    assert_same_trunk(again.model, original)
    changed = [n for n, t in again.model.state_dict().items() if n in readout and not torch.equal(t, readout[n])]
    assert "exit_readout.up" in changed and "exit_readout.down" in changed


def test_fresh_readout_at_another_exit_starts_from_that_loop(trained, corpus):
    model, tokenizer = load_translator(trained)
    result = fit_translator_readout(model, tokenizer, corpus, ExitFitSettings(rank=4, exit_loop=2, steps=2,
                                                                              warmup_steps=1), progress=False)
    assert result.model.config.exit_loop == 2
    assert result.before["draft_agreement"] == pytest.approx(result.before["agreement_per_loop"][1])
    assert_same_trunk(result.model, trunk(model))


def test_engines_equal_autoregressive_after_the_fit(trained, corpus):
    """float64: speed (plain, corrections with spare guesses) and self-speculative give
    autoregressive's tokens with the fitted drafter, which has its drafts accepted."""
    model, tokenizer = load_translator(trained)
    fitted = fit_translator_readout(model, tokenizer, corpus, ExitFitSettings(rank=8, steps=40, batch_size=8,
                                                                              lr=1e-2, warmup_steps=5),
                                    progress=False).model.to(torch.float64)
    pairs = load_pairs(split_path(corpus, "validation"), tokenizer)
    accepted = 0
    for i in range(6):
        src = pairs.source(i).tolist()
        expected = translate_ids(fitted, src, 20, engine="autoregressive").tokens
        for engine, options in (("speed", {}), ("speed", {"early_correction": True, "guesses": 2}),
                                ("self-speculative", {"draft_tokens": 3})):
            out = translate_ids(fitted, src, 20, engine=engine, **options)
            assert out.tokens == expected, (i, engine, options)
            accepted += out.stats.drafts_accepted
    assert accepted > 0


def test_bad_inputs(trained, corpus, tmp_path):
    model, tokenizer = load_translator(trained)
    one_loop = EncDecLM.random(EncDecConfig(**{**MODEL, "n_loops": 1, "exit_loop": None}))
    settings = ExitFitSettings(rank=4, steps=2, warmup_steps=1)
    with pytest.raises(TrainingError, match="single loop"):
        fit_translator_readout(one_loop, tokenizer, corpus, settings, progress=False)
    with pytest.raises(TrainingError, match="exit_readout_rank"):  # wider than d_model (32)
        fit_translator_readout(model, tokenizer, corpus, ExitFitSettings(rank=64, steps=2, warmup_steps=1),
                               progress=False)
    (tmp_path / "train.jsonl").write_bytes((corpus / "train.jsonl").read_bytes())
    with pytest.raises(DataError, match="validation.jsonl"):
        fit_translator_readout(model, tokenizer, tmp_path, settings, progress=False)
    with pytest.raises(TrainingError, match="fewer than one batch"):
        fit_translator_readout(model, tokenizer, corpus, ExitFitSettings(rank=4, steps=2, warmup_steps=1,
                                                                         batch_size=500), progress=False)


# --------------------------------------------------------------------- CLI
def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_train_exit_command_for_translators(trained, corpus, tmp_path):
    source, _ = load_translator(trained)
    out = tmp_path / "fitted"
    common = ("--steps", 5, "--batch-size", 4, "--no-progress", "--threads", 1)
    code, stdout, stderr = run_cli("train-exit", "--model", trained, "--out", out, "--data", corpus,
                                   "--rank", 4, "--json", *common)
    assert code == 0, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["rank"] == 4 and report["exit_loop"] == 1 and report["steps"] == 5
    assert 0 <= report["agreement_before"] <= 1 and 0 <= report["agreement_after"] <= 1
    fitted, _ = load_translator(out)  # the tokenizer came along
    assert fitted.config.exit_readout_rank == 4
    assert_same_trunk(fitted, trunk(source))
    assert load_translator(trained)[0].exit_readout is None  # the source directory is untouched
    # In place (no --out), as text.
    code, stdout, stderr = run_cli("train-exit", "--model", out, "--data", corpus, *common)
    assert code == 0, stderr
    assert "exit readout (loop 1, rank 4)" in stdout and "validation.jsonl" in stdout
    assert_same_trunk(load_translator(out)[0], trunk(source))


def test_train_exit_command_errors(trained, corpus, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Das ist ein Haus.\n" * 20, encoding="utf-8")
    decoder_only = tmp_path / "decoder-only"
    LoopedLM.random(small_config(vocab_size=300)).save_pretrained(decoder_only)
    one_loop = tmp_path / "one-loop"
    EncDecLM.random(EncDecConfig(**{**MODEL, "n_loops": 1, "exit_loop": None})).save_pretrained(one_loop)
    shutil.copyfile(trained / "tokenizer.json", one_loop / "tokenizer.json")
    no_validation = tmp_path / "no-validation"
    no_validation.mkdir()
    shutil.copyfile(corpus / "train.jsonl", no_validation / "train.jsonl")
    out = ("--out", tmp_path / "out", "--rank", 4, "--steps", 2, "--no-progress")
    cases = [
        (("--model", trained, "--train", text, "--val", text), "is a translator"),  # text files, no --data
        (("--model", trained, "--data", corpus, "--train", text), "is a translator"),
        (("--model", trained), "give --data DIR"),
        (("--model", trained, "--data", corpus, "--seq-len", 32), "--seq-len does not apply"),
        (("--model", decoder_only, "--data", corpus), "is a decoder-only model"),
        (("--model", decoder_only, "--train", text), "give --train and --val"),
        (("--model", one_loop, "--data", corpus), "single loop"),
        (("--model", trained, "--data", no_validation), "validation.jsonl does not exist"),
        (("--model", trained, "--data", tmp_path / "absent"), "does not exist"),
    ]
    for args, message in cases:
        code, stdout, stderr = run_cli("train-exit", *args, *out)
        assert code == 2, (args, stdout, stderr)
        assert stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr, (args, stderr)
    assert not (tmp_path / "out").exists()  # nothing was written
