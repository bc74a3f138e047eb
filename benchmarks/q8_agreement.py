"""How much q8_0 (8-bit) weights change a model's greedy tokens.

For a preset (random weights, as `speedec bench` builds them) or a saved model:
decode the bench prompts greedily with the float32 model, then score that text
with both models (teacher forcing) and report, over the generated positions,
how often the int8 model's argmax equals the float32 model's, and the share of
free-running int8 tokens equal to the float32 ones up to the first difference.

    python benchmarks/q8_agreement.py --preset membound --prompts 8 --new-tokens 64 --json benchmarks/results/q8-agreement-membound.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from speedec import generate
from speedec.bench.setup import build_model, make_prompts
from speedec.kernels import prepare_kernel
from speedec.quant import quantize_model
from speedec.storage import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="membound")
    parser.add_argument("--model", default=None, help="a saved float model instead of a preset")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    float_model = build_model(args.preset, model_dir=args.model, dtype=torch.float32)
    q8_model = quantize_model(float_model)
    for model in (float_model, q8_model):
        prepare_kernel(model)
    prompts = make_prompts(float_model, args.model, count=args.prompts, length=args.prompt_len, seed=0)
    agree = total = prefix = 0
    with torch.inference_mode():
        for prompt in prompts:
            reference = generate(float_model, prompt, args.new_tokens, engine="autoregressive").tokens
            q8_tokens = generate(q8_model, prompt, args.new_tokens, engine="autoregressive").tokens
            same = next((i for i, (a, b) in enumerate(zip(reference, q8_tokens)) if a != b), len(reference))
            prefix += same
            text = torch.tensor([prompt + reference[:-1]])
            a = float_model(text).logits[0, len(prompt) - 1:].argmax(-1)
            b = q8_model(text).logits[0, len(prompt) - 1:].argmax(-1)
            agree += int((a == b).sum())  # deliberate host sync, once per prompt
            total += len(reference)
    result = {"preset": args.model or args.preset, "prompts": len(prompts), "new_tokens": args.new_tokens,
              "teacher_forced_argmax_agreement": agree / total,
              "free_running_tokens_equal_before_first_difference": prefix / total}
    print(json.dumps(result, indent=2))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
