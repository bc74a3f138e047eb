"""The reference implementation's decoding speed on a Huginn checkpoint (issue 23's peer row).

Runs Hugging Face ``generate`` (greedy, the reference's own cache, ``num_steps`` = r,
``init_scale`` 0: the zero start speedec uses) of ``RavenForCausalLM`` from
``seal-rg/recurrent-pretraining`` on a checkpoint directory, and prints one JSON line:
the tokens of every prompt and the tokens/s of every round. The reference needs
transformers < 5 (its ``tie_weights`` breaks on 5), so this runs in its own virtualenv:

    python -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 transformers==4.57.6 safetensors
    /tmp/refvenv/bin/python benchmarks/huginn_reference.py --reference DIR --model CKPT \\
        --prompts prompts.json --loops 32 --new-tokens 16 --rounds 2 --dtype float32

``DIR/recpre/`` holds the reference's ``raven_modeling_minimal.py`` and
``raven_config_minimal.py`` (and an empty ``__init__.py``); ``benchmarks/huginn.py
--reference DIR --reference-python /tmp/refvenv/bin/python`` calls this between its own rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="a JSON file: a list of lists of token ids")
    parser.add_argument("--loops", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, args.reference)
    import transformers
    from recpre.raven_modeling_minimal import RavenForCausalLM

    transformers.logging.set_verbosity_error()
    model = RavenForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    prompts = json.load(open(args.prompts))
    speeds, tokens = [], []
    for _ in range(args.rounds):
        tokens, elapsed, count = [], 0.0, 0
        for prompt in prompts:
            ids = torch.tensor([prompt])
            begin = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, num_steps=args.loops,
                                 init_scale=0.0, use_cache=True, eos_token_id=None, pad_token_id=0)
            elapsed += time.perf_counter() - begin
            tokens.append(out[0, len(prompt):].tolist())
            count += len(tokens[-1])
        speeds.append(count / elapsed)
    print(json.dumps({"tokens": tokens, "tokens_per_s": speeds, "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
