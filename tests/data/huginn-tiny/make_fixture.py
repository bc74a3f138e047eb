"""Make the Huginn golden fixture (tests/data/huginn-tiny) with the public reference code.

Run once, outside the repository's environment, in a scratch virtualenv with
torch 2.13.0 and transformers 4.57.6 (the reference predates transformers 5):

    python make_fixture.py --reference DIR --out OUTDIR

``DIR`` is a directory holding the reference package ``recpre`` with the two
files of ``seal-rg/recurrent-pretraining`` (``recpre/raven_modeling_minimal.py``,
``recpre/raven_config_minimal.py``) and an empty ``recpre/__init__.py``; the
reference is imported from there, unmodified. No reference code is in this
repository; only this script and what it wrote. See README.md here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent
SEED = 20251206
LOOPS = 4        # mean_recurrence of the fixture's config
READ_UP_TO = 6   # recurrences read out on full sequences (beyond the config's default)
STEPS = 6        # one-token steps of the incremental decoding check


def build(reference: Path, out: Path):
    sys.path.insert(0, str(reference))
    from recpre.raven_config_minimal import RavenConfig
    from recpre.raven_modeling_minimal import HuginnDynamicCache, RavenForCausalLM

    config = RavenConfig(n_embd=64, n_heads=4, n_layers=6, block_size=128, vocab_size=300,
                         intermediate_size=96, n_layers_in_prelude=1, n_layers_in_recurrent_block=3,
                         n_layers_in_coda=2, mean_recurrence=LOOPS, mean_backprop_depth=2,
                         rope_base=10000.0, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    config.auto_map = {"AutoConfig": "raven_config_minimal.RavenConfig",
                       "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"}
    model = RavenForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(SEED)
    d = config.n_embd
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name == "lm_head.weight":  # tied to the embeddings
                continue
            if name.endswith("wte.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "norm" in name or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("qk_bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("adapter.weight"):
                # Mostly the state itself plus a little of the prelude's output: successive
                # recurrences then move the state a little, so their predictions agree
                # partly, as in a trained recurrent-depth model.
                noise = torch.randn(p.shape, generator=gen) / (2 * d) ** 0.5
                p.copy_(torch.cat((torch.eye(d), torch.zeros(d, d)), dim=1) + 0.5 * noise)
            else:
                scale = 0.3 if name.endswith("proj.weight") else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 0, 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out, safe_serialization=True)
    for code in out.glob("*.py"):  # save_pretrained copies the reference code: not ours to ship
        code.unlink()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(HERE.parent / "ouro-tiny" / name, out / name)

    model = RavenForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompts = {"a": torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(SEED + 1)),
               "b": torch.tensor([1, 295, 215, 282, 2, 215, 1, 291, 215, 34, 27, 34, 47, 2, 215, 1, 289, 215])}
    ref, meta = {}, {"loops": LOOPS, "read_up_to": READ_UP_TO}
    with torch.no_grad():
        for key, ids in prompts.items():
            ids = ids[None]
            ref[f"{key}.prompt_ids"] = ids[0]
            # The prelude's output (the injected input of every recurrence).
            embeds = model.transformer.wte(ids) * model.emb_scale
            freqs = model.freqs_cis[:, : ids.shape[1]]
            for i, block in enumerate(model.transformer.prelude):
                embeds = block(embeds, freqs, torch.tensor(i), None, None)
            ref[f"{key}.prelude_hidden"] = embeds[0]
            logits, latents = [], []
            for r in range(1, READ_UP_TO + 1):
                out_r = model(ids, num_steps=r, init_scale=0.0)
                logits.append(out_r.logits[0])
                latents.append(out_r.latent_states[0])
            ref[f"{key}.recurrence_logits"] = torch.stack(logits)
            ref[f"{key}.recurrence_latents"] = torch.stack(latents)
            # Incremental decoding through the reference's cache at r = LOOPS.
            cache = HuginnDynamicCache()
            T = ids.shape[1]
            first = model(ids, num_steps=LOOPS, init_scale=0.0, past_key_values=cache, use_cache=True,
                          cache_position=torch.arange(T))
            tokens = [int(first.logits[0, -1].argmax())]
            steps = []
            for i in range(STEPS):
                step = model(torch.tensor([[tokens[-1]]]), num_steps=LOOPS, init_scale=0.0,
                             past_key_values=cache, use_cache=True, cache_position=torch.tensor([T + i]))
                steps.append(step.logits[0, -1])
                tokens.append(int(step.logits[0, -1].argmax()))
            ref[f"{key}.greedy_ids"] = torch.tensor(tokens)
            ref[f"{key}.incremental_logits"] = torch.stack(steps)
            rerun = model(torch.cat((ids, torch.tensor([tokens[:-1]])), dim=1), num_steps=LOOPS, init_scale=0.0)
            meta[f"{key}.incremental_vs_rerun"] = float((rerun.logits[0, T:] - torch.stack(steps)).abs().max())
            agree = (torch.stack(logits).argmax(-1) == logits[LOOPS - 1].argmax(-1)).float().mean(-1)
            meta[f"{key}.agreement_with_r{LOOPS}"] = [round(float(a), 3) for a in agree]
            top2 = torch.stack(logits).topk(2, dim=-1).values
            meta[f"{key}.min_top2_margin"] = float((top2[..., 0] - top2[..., 1]).min())
    meta["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    save_file({k: v.contiguous() for k, v in ref.items()}, str(out / "reference.safetensors"),
              metadata={"meta": json.dumps(meta)})
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    build(args.reference, args.out)
