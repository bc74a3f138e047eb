"""``speedec generate``: continue a prompt with any engine."""

from __future__ import annotations

import json
import sys

import click

from ..errors import GenerationError, SpeedecError
from .common import (
    device_option,
    engine_options,
    exit_loop_option,
    load_model,
    model_dtype_option,
    parse_ids,
    sampling_options,
    set_threads,
    speculation_options,
    threads_option,
)


@click.command()
@click.argument("prompt_arg", metavar="[PROMPT]", required=False)
@click.option("--model", "model_dir", help="Model directory (default: the bundled model).")
@click.option("--prompt", help="Prompt text.")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@click.option("--chat", is_flag=True,
              help="The prompt is a user message: apply the model's chat template (tokenizer_config.json).")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--engine", default="speed", show_default=True,
              help="speed, autoregressive or self-speculative.")
@speculation_options
@exit_loop_option
@click.option("--eos-token-id", type=int, default=None,
              help="Stop at this token (default: the tokenizer's end-of-text, if any).")
@sampling_options
@model_dtype_option
@device_option
@threads_option()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: tokens, text, stats.")
@click.option("--stream", is_flag=True, help="Print text as tokens are verified.")
def generate(prompt_arg, model_dir, prompt, prompt_ids, chat, max_new_tokens, engine, draft_tokens,
             early_correction, guesses, adaptive, exit_loop, eos_token_id, temperature, top_k, top_p, seed, dtype, device,
             threads, as_json, stream) -> None:
    """Generate a continuation of a prompt (greedy by default, where every engine gives the
    same tokens; with --temperature every engine samples from the same distribution)."""
    from ..engines import engine_class
    from ..engines import generate as run_generate
    from ..tokenizer import load_tokenizer, render_chat

    if prompt_arg is not None and prompt is not None:
        raise click.UsageError("give the prompt once: as an argument or with --prompt")
    prompt = prompt if prompt is not None else prompt_arg
    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of PROMPT/--prompt or --prompt-ids")
    engine_class(engine)
    set_threads(threads)
    ids = parse_ids(prompt_ids) if prompt_ids is not None else None
    if prompt is not None and not prompt:
        raise GenerationError("the prompt is empty")
    if chat and prompt is None:
        raise click.UsageError("--chat needs a text prompt, not --prompt-ids")
    directory, model = load_model(model_dir, dtype, device, exit_loop)
    if chat:
        prompt = render_chat(directory, prompt)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(directory, model.config.vocab_size)
    except SpeedecError:
        if ids is None:
            raise
    if ids is None:
        ids = tokenizer.encode(prompt)
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id

    printer = _StreamPrinter(tokenizer) if stream and not as_json else None
    options = engine_options(draft_tokens, early_correction, guesses, adaptive)
    result = run_generate(model, ids, max_new_tokens, engine=engine, eos_token_id=eos_token_id,
                          on_token=printer.add if printer else None, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, **options)
    text = tokenizer.decode(result.tokens) if tokenizer is not None else None
    if as_json:
        click.echo(json.dumps({"engine": engine, "prompt_ids": ids, "tokens": result.tokens,
                               "text": text, "stop_reason": result.stop_reason,
                               "stats": result.stats.to_dict()}))
    elif printer is not None:
        printer.finish()
    else:
        click.echo(text if text is not None else ",".join(map(str, result.tokens)))


class _StreamPrinter:
    """Prints the text of verified tokens as they arrive (ids without a tokenizer)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed = 0

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if self.tokenizer is None:
            click.echo(("," if len(self.tokens) > 1 else "") + str(token), nl=False)
            sys.stdout.flush()
            return
        text = self.tokenizer.decode(self.tokens)
        # Hold back an incomplete UTF-8 sequence until its last byte arrives.
        stable = text.rstrip("\ufffd")
        if len(stable) > self.printed:
            click.echo(stable[self.printed:], nl=False)
            sys.stdout.flush()
            self.printed = len(stable)

    def finish(self) -> None:
        if self.tokenizer is not None:
            text = self.tokenizer.decode(self.tokens)
            click.echo(text[self.printed:], nl=False)
        click.echo()
