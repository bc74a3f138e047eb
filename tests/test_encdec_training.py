"""Translation end to end: joint tokenizer, padded batches, training, resume, translate, BLEU/chrF, CLI.

The corpus is the committed slice of the real Ding dictionary
(tests/data/trans_de_en_sample) parsed by the real parser: 8 German-English
sentence pairs. Models are tiny and run on one thread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import train_killed_after_step_3
from speedec.cli import cli
from speedec.data.parallel import dictionary_pairs, jsonl
from speedec.encdec import (
    EncDecConfig,
    EncDecLM,
    TranslationConfig,
    evaluate_translation,
    load_translator,
    train_translation,
    translate,
    validation_metrics,
)
from speedec.encdec import trainer as encdec_trainer
from speedec.encdec.data import (
    BucketSampler,
    TokenizedPairs,
    load_pairs,
    make_batch,
    read_pairs,
    split_path,
    tokens_per_pair,
)
from speedec.errors import DataError, GenerationError, ModelLoadError, TrainingError
from speedec.training.loss import IGNORE_INDEX, LossWeights, looped_loss

REPO = Path(__file__).resolve().parents[1]
DING_SAMPLE = REPO / "tests" / "data" / "trans_de_en_sample"

TINY_MODEL = dict(vocab_size=300, d_model=32, n_heads=4, n_kv_heads=2, ffn_dim=64, n_encoder_layers=1,
                  n_unique_layers=2, n_loops=3, exit_loop=1, max_source_len=64, max_target_len=64,
                  bos_token_id=0, pad_token_id=0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine two
    OpenMP threads stall each other on every small op."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A parallel corpus directory built from the committed Ding sample, with a joint tokenizer."""
    root = tmp_path_factory.mktemp("parallel")
    pairs = dictionary_pairs(DING_SAMPLE.read_text(encoding="utf-8"))
    assert len(pairs) == 8
    (root / "train.jsonl").write_text(jsonl(pairs), encoding="utf-8")
    (root / "validation.jsonl").write_text(jsonl(pairs[:3]), encoding="utf-8")
    (root / "test.jsonl").write_text(jsonl(pairs[3:7]), encoding="utf-8")
    code, stdout, stderr = run_cli("tokenizer", "train", "--parallel", root, "--out", root / "tokenizer.json",
                                   "--vocab-size", 300)
    assert code == 0, stderr
    assert "300 tokens" in stdout
    return root


def tiny_config(corpus: Path, out_dir, **overrides) -> TranslationConfig:
    fields = dict(tokenizer=str(corpus / "tokenizer.json"), data=str(corpus), out_dir=str(out_dir),
                  model=EncDecConfig(**TINY_MODEL), batch_size=4, max_steps=6, warmup_steps=2, lr=1e-2,
                  log_every=1, eval_every=3, eval_batches=1, save_every=3, threads=1, device="cpu")
    fields.update(overrides)
    return TranslationConfig(**fields)


def events(out_dir, kind: str) -> list[dict]:
    lines = Path(out_dir, "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A tiny translator trained for 60 steps; returns its run directory."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    summary = train_translation(tiny_config(corpus, out, max_steps=60, lr=2e-2, log_every=5, eval_every=30,
                                            save_every=30), progress=False)
    assert summary.steps == 60 and summary.model_dir == out / "model"
    return out


# ------------------------------------------------------------------ data
def test_joint_tokenizer_covers_both_languages(corpus):
    from speedec.tokenizer import BPETokenizer

    tokenizer = BPETokenizer(corpus / "tokenizer.json")
    for pair in read_pairs(corpus / "train.jsonl"):
        for text in (pair.src, pair.tgt):
            assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token_id == 0  # the start, end and padding id of the configs
    # Merges learnt from both sides: German and English words shrink below one token per byte.
    for word in ("nicht", "the"):
        assert len(tokenizer.encode(word)) < len(word.encode())


def test_read_pairs_and_split_path_errors(corpus, tmp_path):
    assert split_path(corpus, "test") == corpus / "test.jsonl"
    assert split_path(corpus / "test.jsonl", "ignored") == corpus / "test.jsonl"
    with pytest.raises(DataError, match="does not exist"):
        split_path(tmp_path / "nowhere", "test")
    with pytest.raises(DataError, match="prepare-parallel"):
        split_path(tmp_path, "test")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"src": "a", "tgt": "b"}\n\n{"src": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:3: expected an object"):
        read_pairs(bad)
    bad.write_text("{nope\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:1: not valid JSON"):
        read_pairs(bad)


def test_token_cache_is_written_and_reused(corpus, tmp_path, monkeypatch):
    from speedec.tokenizer import BPETokenizer

    split = tmp_path / "train.jsonl"
    split.write_text((corpus / "train.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    tokenizer = BPETokenizer(corpus / "tokenizer.json")
    pairs = load_pairs(split, tokenizer)
    assert len(list(tmp_path.glob("train.jsonl.tokens-*.npz"))) == 1
    first = read_pairs(split)[0]
    assert pairs.source(0).tolist() == tokenizer.encode(first.src)
    assert pairs.target(0).tolist() == tokenizer.encode(first.tgt)
    monkeypatch.setattr("speedec.encdec.data.tokenize_pairs", lambda *a: pytest.fail("cache unused"))
    again = load_pairs(split, tokenizer)
    assert np.array_equal(again.src, pairs.src) and np.array_equal(again.tgt_offsets, pairs.tgt_offsets)


def test_padded_batch_layout():
    pairs = TokenizedPairs.from_lists([[5, 6, 7], [8]], [[9], [10, 11, 12, 13]], np.uint16)
    batch = make_batch(pairs, [0, 1], bos=1, eos=2, pad=0)
    assert batch.src.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.src_mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.tgt_in.tolist() == [[1, 9, 0, 0, 0], [1, 10, 11, 12, 13]]
    assert batch.targets.tolist() == [[9, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX], [10, 11, 12, 13, 2]]
    assert batch.tokens == (3 + 1) + (1 + 4) + 2


def test_loss_on_padded_batches_ignores_padding():
    """The loss of a padded batch is the token-weighted mean of each pair's loss computed
    alone, whatever the padding id: source padding is masked out of the encoder and the
    cross-attention, and target padding out of the loss."""
    config = EncDecConfig(**{**TINY_MODEL, "vocab_size": 40})
    model = EncDecLM.random(config, seed=3, std=0.3, residual_scale=3.0).to(torch.float64)
    rng = np.random.default_rng(0)
    lengths = [(2, 9), (7, 3), (4, 5)]  # (source, target): each pair is the longest on one side or neither
    pairs = TokenizedPairs.from_lists([rng.integers(3, 40, s).tolist() for s, _ in lengths],
                                      [rng.integers(3, 40, t).tolist() for _, t in lengths], np.uint16)
    weights = LossWeights(exit_weight=0.5)

    def loss_of(indices, pad):
        b = make_batch(pairs, indices, bos=1, eos=2, pad=pad)
        return looped_loss(model(b.src, b.src_mask, b.tgt_in, output_loops=(1,)), b.targets, config, weights)

    alone = [loss_of([i], pad=0) for i in range(3)]
    counts = [t + 1 for _, t in lengths]
    batched = loss_of([0, 1, 2], pad=0)
    for part in ("final", "exit", "total"):
        expected = sum(getattr(a, part).item() * n for a, n in zip(alone, counts)) / sum(counts)
        assert getattr(batched, part).item() == pytest.approx(expected, rel=1e-6), part  # CE is taken in float32
    assert loss_of([0, 1, 2], pad=17).total.item() == pytest.approx(batched.total.item(), rel=1e-6)

    b = make_batch(pairs, [0, 1, 2], bos=1, eos=2, pad=0)
    metrics = validation_metrics(model, [b])
    assert metrics["tokens"] == sum(counts) and metrics["pairs"] == 3
    assert metrics["loss"] == pytest.approx(batched.final.item(), rel=1e-6)


def test_bucket_sampler_is_a_function_of_seed_and_step():
    rng = np.random.default_rng(1)
    pairs = TokenizedPairs.from_lists([[1] * int(n) for n in rng.integers(1, 30, 50)],
                                      [[1] * int(n) for n in rng.integers(1, 30, 50)], np.uint16)
    sampler = BucketSampler(pairs, batch_size=8, seed=3, bucket_batches=2)
    assert sampler.batches_per_epoch == 6
    epoch = [sampler.indices(step) for step in range(6)]
    seen = np.concatenate(epoch)
    assert len(seen) == len(set(seen.tolist())) == 48  # an epoch never repeats a pair
    fresh = BucketSampler(pairs, batch_size=8, seed=3, bucket_batches=2)
    assert all(np.array_equal(fresh.indices(s), sampler.indices(s)) for s in (7, 2, 11, 0))
    other = BucketSampler(pairs, batch_size=8, seed=4, bucket_batches=2)
    assert not all(np.array_equal(other.indices(s), sampler.indices(s)) for s in range(6))
    # Bucketing: less padding than the same epoch's pairs in random batches.
    tgt = pairs.tgt_lengths

    def padding(batches):
        return sum(int(tgt[b].max()) * len(b) - int(tgt[b].sum()) for b in batches)

    shuffled = np.random.default_rng(0).permutation(seen).reshape(6, 8)
    assert padding(epoch) < padding(shuffled)
    with pytest.raises(TrainingError, match="fewer than one batch"):
        BucketSampler(pairs, batch_size=64, seed=0)


# ---------------------------------------------------------------- config
def test_translation_config_validation(corpus, tmp_path):
    good = tiny_config(corpus, tmp_path)
    bad = [
        (dict(init_from="somewhere"), "exactly one of model \\(a shape\\) or init_from"),
        (dict(model=None), "exactly one of model"),
        (dict(warmup_steps=6), "warmup_steps"),
        (dict(max_tokens=100), "exactly one of max_steps or max_tokens"),
        (dict(data=""), "data must be a non-empty path"),
        (dict(val_split=""), "val_split"),
    ]
    for changes, message in bad:
        with pytest.raises(TrainingError, match=message):
            tiny_config(corpus, tmp_path, **changes)
    single = EncDecConfig(**{**TINY_MODEL, "n_loops": 1, "exit_loop": None})
    with pytest.raises(TrainingError, match="exit_weight > 0 needs a model with an early exit"):
        tiny_config(corpus, tmp_path, model=single).resolve_model_config()
    path = tmp_path / "c.json"
    path.write_text(json.dumps(good.to_dict()))
    assert TranslationConfig.from_file(path) == good
    path.write_text(json.dumps({**good.to_dict(), "model": {**TINY_MODEL, "n_loops": 0}}))
    with pytest.raises(TrainingError, match="model: n_loops"):
        TranslationConfig.from_file(path)
    path.write_text(json.dumps({**good.to_dict(), "seq_len": 3}))
    with pytest.raises(TrainingError, match="unknown training config field.*seq_len"):
        TranslationConfig.from_file(path)


@pytest.mark.parametrize("loops", [1, 2, 4])
def test_shipped_translation_configs_differ_only_in_depth(loops):
    config = TranslationConfig.from_file(REPO / "configs" / "translation" / f"de-en-L{loops}.json")
    reference = TranslationConfig.from_file(REPO / "configs" / "translation" / "de-en-L4.json")
    model = config.resolve_model_config()
    assert model.n_loops == loops and model.n_unique_layers == 2
    assert model.replace(n_loops=4, exit_loop=1) == reference.model
    assert config.max_steps == reference.max_steps and config.batch_size == reference.batch_size
    assert (config.exit_weight == 0) == (loops == 1)
    same = {k: v for k, v in config.to_dict().items() if k not in ("model", "out_dir", "description",
                                                                   "exit_weight")}
    assert same == {k: v for k, v in reference.to_dict().items() if k in same}


@pytest.mark.parametrize("loops", [1, 2, 4])
def test_es_en_study_configs_differ_only_in_depth(loops):
    """The es-en depth study (issue 24): same shape, data, order and budget; L = 2 and 4 with
    the drafter, the loop embedding and exit weight 0, L = 1 without an exit."""
    config = TranslationConfig.from_file(REPO / "configs" / "translation" / f"es-en-L{loops}.json")
    reference = TranslationConfig.from_file(REPO / "configs" / "translation" / "es-en-L4.json")
    model = config.resolve_model_config()
    assert model.n_loops == loops and model.n_unique_layers == 2 and config.exit_weight == 0
    if loops > 1:
        assert model.replace(n_loops=4) == reference.model and config.draft_weight == 1.0
    else:
        assert model.exit_loop is None and model.exit_readout_rank is None and config.draft_weight == 0
    same = {k: v for k, v in config.to_dict().items() if k not in ("model", "out_dir", "description",
                                                                   "draft_weight")}
    assert same == {k: v for k, v in reference.to_dict().items() if k in same}
    assert config.max_steps * config.batch_size == 1600 * 64


# --------------------------------------------------------------- training
def test_tiny_training_lowers_the_loss_and_writes_a_loadable_model(corpus, trained):
    losses = [e["loss"] for e in events(trained, "train")]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0], losses
    assert all(e["loss"] > e["loss_final"] > 0 and "loss_exit" in e for e in events(trained, "train"))
    evals = events(trained, "eval")
    assert [e["step"] for e in evals] == [30, 60]
    assert len(evals[-1]["loss_per_loop"]) == 3 and evals[-1]["pairs"] == 3
    (data,) = events(trained, "data")
    assert data["train_pairs"] == 8 and data["batches_per_epoch"] == 2
    model_dir = trained / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "train_config.json"]
    assert (model_dir / "tokenizer.json").read_bytes() == (corpus / "tokenizer.json").read_bytes()
    model = EncDecLM.from_pretrained(model_dir)
    assert model.config == EncDecConfig(**TINY_MODEL)
    model, tokenizer = load_translator(model_dir)
    result = translate(model, tokenizer, "Haben wir noch Milch?", engine="autoregressive", max_new_tokens=12)
    assert 1 <= len(result.tokens) <= 12 and isinstance(result.text, str)


def test_token_budget_becomes_steps(corpus, tmp_path):
    from speedec.tokenizer import BPETokenizer

    pairs = load_pairs(corpus / "train.jsonl", BPETokenizer(corpus / "tokenizer.json"))
    config = tiny_config(corpus, tmp_path / "run", max_steps=None, max_tokens=2000, eval_every=100,
                         save_every=100)
    run = encdec_trainer.setup_translation_run(config, resume=False)
    assert run.total_steps == math.ceil(2000 / (4 * tokens_per_pair(pairs)))


def test_resume_matches_uninterrupted_run(corpus, tmp_path, monkeypatch):
    straight = train_translation(tiny_config(corpus, tmp_path / "a"), progress=False)

    train_killed_after_step_3(monkeypatch, encdec_trainer, train_translation, tiny_config(corpus, tmp_path / "b"))
    assert len(events(tmp_path / "b", "train")) == 4
    with pytest.raises(TrainingError, match="already holds a checkpoint"):
        train_translation(tiny_config(corpus, tmp_path / "b"), progress=False)
    with pytest.raises(TrainingError, match="config differs in lr"):
        train_translation(tiny_config(corpus, tmp_path / "b", lr=1e-3), resume=True, progress=False)
    resumed = train_translation(tiny_config(corpus, tmp_path / "b", eval_every=2), resume=True,
                                progress=False)

    assert resumed.resumed_from == 3 and resumed.steps == straight.steps == 6
    assert resumed.tokens == straight.tokens
    assert [e["loss"] for e in events(tmp_path / "b", "train")] == [e["loss"] for e in events(tmp_path / "a", "train")]
    a = EncDecLM.from_pretrained(straight.model_dir).state_dict()
    b = EncDecLM.from_pretrained(resumed.model_dir).state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    with pytest.raises(TrainingError, match="nothing to resume"):
        train_translation(tiny_config(corpus, tmp_path / "c"), resume=True, progress=False)


def test_training_errors_are_one_line(corpus, tmp_path):
    cases = [
        (dict(tokenizer=str(tmp_path / "none.json")), "tokenizer .* does not exist"),
        (dict(data=str(tmp_path / "nowhere")), "does not exist"),
        (dict(model=EncDecConfig(**{**TINY_MODEL, "vocab_size": 100})), "has only 100"),
        (dict(batch_size=16), "fewer than one batch"),
        (dict(init_from=str(tmp_path / "nowhere"), model=None), "init_from"),
    ]
    for changes, message in cases:
        with pytest.raises(TrainingError, match=message) as info:
            train_translation(tiny_config(corpus, tmp_path / "run", **changes), progress=False)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------- translate, eval
def test_translate_cli_engines_agree(trained, corpus):
    model_dir = trained / "model"
    sources = [p.src for p in read_pairs(corpus / "test.jsonl")]
    all_tokens = set()
    for source in sources:
        outputs = {}
        for engine, extra in (("autoregressive", []), ("speed", []),
                              ("self-speculative", ["--draft-tokens", 2]),
                              ("speed", ["--early-correction", "--guesses", 2, "--adaptive"])):
            code, stdout, stderr = run_cli("translate", "--model", model_dir, source, "--engine", engine,
                                           "--json", *extra)
            assert code == 0, stderr
            data = json.loads(stdout)
            assert data["engine"] == engine and data["stats"]["new_tokens"] == len(data["tokens"])
            assert data["stop_reason"] in ("eos", "length") and data["source_ids"]
            outputs[engine if not extra or engine != "speed" else "speed+options"] = (data["tokens"], data["text"])
        assert outputs["speed"] == outputs["autoregressive"] == outputs["self-speculative"] == outputs["speed+options"]
        all_tokens.update(outputs["speed"][0])
        code, plain, _ = run_cli("translate", "--model", model_dir, "--text", source)
        assert code == 0 and plain == outputs["speed"][1] + "\n"
    assert len(all_tokens) > 1  # not one token repeated for every sentence


def test_eval_translation_reports_bleu_and_chrf(trained, corpus, tmp_path):
    model_dir = trained / "model"
    reports = {}
    for engine in ("autoregressive", "speed"):
        hyps = tmp_path / f"{engine}.txt"
        code, stdout, stderr = run_cli("eval-translation", "--model", model_dir, "--data", corpus,
                                       "--engine", engine, "--json", "--hypotheses", hyps, "--warmup", 0)
        assert code == 0, stderr
        report = json.loads(stdout)
        assert report["sentences"] == 4 and report["engine"] == engine and report["n_loops"] == 3
        for key in ("bleu", "chrf"):
            assert isinstance(report[key], float) and 0.0 <= report[key] <= 100.0
        assert "tok:13a" in report["bleu_signature"] and report["ms_per_sentence"] > 0
        assert report["data"].endswith("test.jsonl") and report["truncated_sources"] == 0
        assert len(hyps.read_text(encoding="utf-8").splitlines()) == 4
        reports[engine] = report
    # Exact engines: the same translations, so the same scores; only speed statistics differ.
    assert reports["speed"]["bleu"] == reports["autoregressive"]["bleu"]
    assert reports["speed"]["chrf"] == reports["autoregressive"]["chrf"]
    assert reports["autoregressive"]["acceptance"] is None
    if reports["speed"]["steps_per_token"] is not None:
        assert 1.0 <= reports["speed"]["steps_per_token"] <= 3.0 + 1e-9
    code, stdout, _ = run_cli("eval-translation", "--model", model_dir, "--data", corpus / "validation.jsonl",
                              "--limit", 2, "--no-progress")
    assert code == 0 and "2 sentences, BLEU" in stdout and stdout.count("\n") == 1

    # A perfect system scores 100: the references themselves.
    model, tokenizer = load_translator(model_dir)
    pairs = read_pairs(corpus / "test.jsonl")
    result = evaluate_translation(model, tokenizer, pairs[:2], engine="speed", warmup=0)
    assert len(result.hypotheses) == 2
    from speedec.encdec.evaluate import corpus_scores

    perfect = corpus_scores([p.tgt for p in pairs], [[p.tgt for p in pairs]])
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)


def test_two_references_score_against_both(tmp_path):
    """Bible pairs carry two references (KJV, WEB): a translation that is one of them
    scores 100 against both, less against the target alone; a corpus mixing one- and
    two-reference pairs is scored against the targets."""
    from speedec.data.parallel import Pair
    from speedec.encdec.evaluate import corpus_scores, reference_streams

    kjv = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light."]
    web = ["In the beginning, God created the heavens and the earth.", "God said, \u201cLet there be light,\u201d"]
    pairs = [Pair(f"es {i}", k, (k, w)) for i, (k, w) in enumerate(zip(kjv, web))]
    assert reference_streams(pairs) == [kjv, web]
    both = corpus_scores(web, reference_streams(pairs))
    alone = corpus_scores(web, [kjv])
    assert both["bleu"] == pytest.approx(100.0) and both["references"] == 2 and alone["bleu"] < 60
    assert reference_streams([*pairs, Pair("de", "Hello.")]) == [[*kjv, "Hello."]]
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"src": "es 0", "tgt": kjv[0], "refs": [kjv[0], web[0]], "verse": "ot.4"}) + "\n")
    assert read_pairs(path) == [pairs[0]]
    path.write_text(json.dumps({"src": "a", "tgt": "b", "refs": "b"}) + "\n")
    with pytest.raises(DataError, match="refs"):
        read_pairs(path)


def test_translate_api_errors(trained, tmp_path):
    model, tokenizer = load_translator(trained / "model")
    with pytest.raises(GenerationError, match="empty"):
        translate(model, tokenizer, " \n ")
    with pytest.raises(GenerationError, match="unknown engine"):
        translate(model, tokenizer, "Hallo.", engine="beam")
    with pytest.raises(GenerationError, match="max_source_len"):
        translate(model, tokenizer, "Hallo " * 100)
    model.save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(ModelLoadError, match="tokenizer.json is missing"):
        load_translator(tmp_path / "no-tokenizer")


@pytest.mark.parametrize("make_args,message", [
    (lambda m, c, t: ["translate", "--model", t / "missing", "Hallo."], "does not exist"),
    (lambda m, c, t: ["translate", "--model", m, ""], "empty"),
    (lambda m, c, t: ["translate", "--model", m, "Hallo.", "--engine", "beam"], "unknown engine 'beam'"),
    (lambda m, c, t: ["translate", "--model", m, "Hallo.", "--guesses", 0], "guesses must be an integer"),
    (lambda m, c, t: ["translate", "--model", m], "give the sentence"),
    (lambda m, c, t: ["translate", "--model", m, "Hallo.", "--max-new-tokens", 0], "max_new_tokens"),
    (lambda m, c, t: ["eval-translation", "--model", m, "--data", t / "missing"], "does not exist"),
    (lambda m, c, t: ["eval-translation", "--model", m, "--data", c, "--split", "dev"], "dev.jsonl"),
    (lambda m, c, t: ["eval-translation", "--model", m, "--data", c, "--engine", "beam"], "unknown engine"),
    (lambda m, c, t: ["eval-translation", "--model", t / "missing", "--data", c], "does not exist"),
    (lambda m, c, t: ["train-translation", "--config", t / "missing.json"], "does not exist"),
])
def test_bad_inputs_exit_2_with_one_line(trained, corpus, tmp_path, make_args, message):
    code, stdout, stderr = run_cli(*make_args(trained / "model", corpus, tmp_path))
    assert code == 2, (stdout, stderr)
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr, stderr


def test_translation_study_cli(trained, corpus, tmp_path):
    shallow = tmp_path / "shallow"
    model = dict(TINY_MODEL, n_loops=1, exit_loop=None)
    train_translation(tiny_config(corpus, shallow, model=EncDecConfig(**model), exit_weight=0.0), progress=False)
    out = tmp_path / "study.json"
    code, stdout, stderr = run_cli("study", "translation", "--models", f"{shallow / 'model'},{trained / 'model'}",
                                   "--data", corpus, "--splits", "test,validation", "--sentences", 2,
                                   "--repeats", 1, "--threads", 1, "--json", out, "--plot", tmp_path / "study.png")
    assert code == 0, stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["engine"]) for r in rows] == [
        ("L=1", "autoregressive"), ("L=3", "autoregressive"), ("L=3", "speed")]
    assert all(0 <= r["quality"]["bleu"] <= 100 and 0 <= r["quality"]["bleu_validation"] <= 100
               and r["ms"] > 0 for r in rows)
    deep = rows[-1]
    # BLEU after every loop, the last being the model's own; the agreement of every loop on validation.
    assert len(deep["details"]["bleu_per_loop"]) == 3 and deep["details"]["bleu_per_loop"][-1] == deep["quality"]["bleu"]
    assert len(deep["details"]["agreement_per_loop"]) == 3 and deep["details"]["agreement_per_loop"][-1] == 1.0
    assert 0 <= deep["quality"]["exit_agree"] <= 1 and "exit_agree" not in rows[0]["quality"]
    assert rows[0]["details"]["bleu_per_loop"] == [rows[0]["quality"]["bleu"]]
    # The per-loop BLEU is that of the model's view at each depth, decoded on its own.
    model, tokenizer = load_translator(trained / "model")
    one = evaluate_translation(model.at_depth(1), tokenizer, read_pairs(corpus / "test.jsonl"),
                               engine="autoregressive", warmup=0).report["bleu"]
    assert deep["details"]["bleu_per_loop"][0] == pytest.approx(one)
    assert "L=3" in stdout and "after decoder loops 1..3" in stdout and (tmp_path / "study.png").stat().st_size > 0
