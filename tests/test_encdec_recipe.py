"""The decoder-side recipe knobs for translators (issue 24, item 2): a loop embedding and an
exit readout (drafter) in the encoder-decoder, trained with the trunk's gradient cut, and
exact decoding with them."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import one_thread  # noqa: F401 (a fixture)
from speedec.encdec import EncDecConfig, EncDecLM, translate_ids
from speedec.training.loss import LossWeights, looped_loss
from test_encdec_training import TINY_MODEL, corpus, tiny_config  # noqa: F401 (corpus: a fixture)


def knob_config(**overrides) -> EncDecConfig:
    fields = dict(vocab_size=40, d_model=32, n_heads=4, n_kv_heads=2, ffn_dim=48, n_encoder_layers=2,
                  n_unique_layers=2, n_loops=4, exit_loop=1, max_source_len=32, max_target_len=64,
                  loop_embedding=True, exit_readout_rank=8)
    fields.update(overrides)
    return EncDecConfig(**fields)


def knob_model(config: EncDecConfig, seed: int = 0) -> EncDecLM:
    model = EncDecLM.random(config, seed=seed, std=0.5, residual_scale=3.0)
    with torch.no_grad():  # a readout that reads differently from the shared exit
        model.exit_readout.up.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return model.to(torch.float64)


def test_config_keeps_the_knobs_and_old_files_are_unchanged(tmp_path):
    config = knob_config()
    assert EncDecConfig.from_dict(config.to_dict()) == config
    assert config.decoder_config.loop_embedding and config.decoder_config.exit_readout_rank == 8
    plain = knob_config(loop_embedding=False, exit_readout_rank=None).to_dict()
    assert "loop_embedding" not in plain and "exit_readout_rank" not in plain  # written as before
    model = knob_model(config)
    assert model.loop_embedding.shape == (4, 32) and model.exit_readout is not None
    model.save_pretrained(tmp_path / "m")
    again = EncDecLM.from_pretrained(tmp_path / "m", dtype=torch.float64)
    assert again.config == config
    assert all(torch.equal(again.state_dict()[n], t) for n, t in model.state_dict().items())
    with pytest.raises(Exception, match="exit_readout_rank"):
        knob_config(n_loops=1, exit_loop=None)


def test_drafter_loss_never_reaches_the_trunk_or_head():
    model = knob_model(knob_config()).train()
    src = torch.randint(1, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    tgt = torch.randint(1, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model(src, None, tgt[:, :-1], output_loops=(1,), output_draft=True)
    assert out.draft_logits is not None and not torch.equal(out.draft_logits, out.loop_logits[1])
    weights = LossWeights(exit_weight=0.0, all_loops_weight=0.0, draft_weight=1.0)
    loss = looped_loss(out, tgt[:, 1:], model.config.decoder_config, weights)
    loss.draft.backward()  # the drafter's term alone
    for name, param in model.named_parameters():
        grad = param.grad
        moved = grad is not None and bool(grad.abs().sum() > 0)
        assert moved == name.startswith("exit_readout."), name


def test_engines_equal_autoregressive_with_the_knobs():
    """float64: speed (plain, corrections, spares) and self-speculative give autoregressive's
    tokens with a loop embedding and an exit readout; drafts are both accepted and rejected."""
    accepted = rejected = 0
    for seed in range(6):
        config = knob_config(exit_loop=1 + seed % 3)
        model = knob_model(config, seed)
        rng = random.Random(seed)
        src = [rng.randrange(1, 40) for _ in range(rng.randrange(2, 12))]
        expected = translate_ids(model, src, 24, engine="autoregressive").tokens
        for engine, options in (("speed", {}), ("speed", {"early_correction": True, "guesses": 2}),
                                ("self-speculative", {"draft_tokens": 3})):
            out = translate_ids(model, src, 24, engine=engine, **options)
            assert out.tokens == expected, (seed, engine, options)
            accepted += out.stats.drafts_accepted
            rejected += out.stats.drafts_rejected
        # The cached decoding path against the teacher-forced forward (an independent path).
        with torch.no_grad():
            logits = model(torch.tensor([src]), None, torch.tensor([[config.bos_token_id, *expected[:-1]]])).logits
        assert logits[0].argmax(-1).tolist() == expected
    assert accepted > 0 and rejected > 0


def test_train_translation_with_the_knobs(corpus, tmp_path):  # noqa: F811 (the imported fixture)
    """`train-translation` with the recipe that made depth pay for the decoder-only models:
    exit weight 0, a detached exit readout trained by distillation, a loop embedding."""
    from speedec.encdec import load_translator, train_translation

    model_config = EncDecConfig(**{**TINY_MODEL, "loop_embedding": True, "exit_readout_rank": 8})
    summary = train_translation(tiny_config(corpus, tmp_path / "run", model=model_config, exit_weight=0.0,
                                            draft_weight=1.0), progress=False)
    model, tokenizer = load_translator(summary.model_dir)
    assert model.config.loop_embedding and model.config.exit_readout_rank == 8
    assert model.exit_readout.up.abs().sum() > 0  # the drafter learnt (it starts at zero)
    assert model.loop_embedding.abs().sum() > 0
    src = tokenizer.encode("Haben wir noch Milch?")
    expected = translate_ids(model, src, 12, engine="autoregressive").tokens
    for engine in ("speed", "self-speculative"):
        assert translate_ids(model, src, 12, engine=engine).tokens == expected


def test_translator_at_depth_is_its_first_loops_and_decodes_exactly():
    """A translator's view at depth d shares every weight and computes what its own
    forward reads out after d loops; every engine decodes the view as autoregressive does."""
    model = knob_model(knob_config()).eval()
    src = torch.randint(1, 40, (2, 7), generator=torch.Generator().manual_seed(2))
    tgt = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(src, None, tgt, output_loops=(1, 2, 3))
        for depth in (1, 2, 3):
            view = model.at_depth(depth)
            assert view.config.n_loops == depth and view.embed is model.embed
            assert view.config.exit_loop == (None if depth == 1 else 1)
            assert (view.exit_readout is None) == (depth == 1)
            assert torch.equal(view(src, None, tgt).logits, full.loop_logits[depth])
    assert model.at_depth(4) is model and model.config.n_loops == 4
    with pytest.raises(Exception, match="loops must be an integer from 1 to 4"):
        model.at_depth(5)
    view = model.at_depth(3)
    source = src[0].tolist()
    reference = translate_ids(view, source, 12, engine="autoregressive").tokens
    for engine, options in (("speed", {}), ("speed", {"early_correction": True}), ("self-speculative", {})):
        assert translate_ids(view, source, 12, engine=engine, **options).tokens == reference, engine
