"""``speedec generate``: continue a prompt with any engine."""

from __future__ import annotations

import json
import sys

import click

from ..errors import GenerationError, SpeedecError
from .common import load_model, parse_ids
from .options import (
    Placement,
    Sampling,
    Speculation,
    device_option,
    exit_loop_option,
    loops_option,
    model_dtype_option,
    placement_options,
    sampling_options,
    speculation_options,
    threads_option,
)


@click.command()
@click.argument("prompt_arg", metavar="[PROMPT]", required=False)
@click.option("--model", "model_dir",
              help="Model directory, or Hugging Face model id (owner/name[@revision]: from the local "
                   "Hugging Face cache, else downloaded; default: the bundled model).")
@click.option("--prompt", help="Prompt text.")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@click.option("--chat", is_flag=True,
              help="The prompt is a user message: apply the model's chat template (tokenizer_config.json).")
@click.option("--thinking/--no-thinking", default=None,
              help="With --chat, a thinking model's enable_thinking switch (Nanbeige4.2: on unless "
                   "--no-thinking, which opens the answer with an empty <think></think>).")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--engine", default="speed", show_default=True,
              help="speed, autoregressive or self-speculative.")
@speculation_options
@loops_option
@exit_loop_option
@click.option("--eos-token-id", type=int, default=None,
              help="Stop at this token (default: the tokenizer's end-of-text, if any).")
@sampling_options
@placement_options(model_dtype_option, device_option, threads_option())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: tokens, text, stats.")
@click.option("--stream", is_flag=True, help="Print text as tokens are verified.")
@click.option("--quiet", "-q", is_flag=True, help="No line of speed statistics on stderr.")
def generate(prompt_arg: str | None, model_dir: str | None, prompt: str | None, prompt_ids: str | None,
             chat: bool, thinking: bool | None, max_new_tokens: int, engine: str, speculation: Speculation,
             loops: int | None, exit_loop: int | None, eos_token_id: int | None, sampling: Sampling, placement: Placement,
             as_json: bool, stream: bool, quiet: bool) -> None:
    """Generate a continuation of a prompt (greedy by default, where every engine gives the
    same tokens; with --temperature every engine samples from the same distribution).

    Prints the prompt (a --chat message on a line of its own) and its continuation, then one
    line on stderr: tokens/s, steps per token and draft acceptance (not with --quiet).
    With --prompt-ids only the continuation; with --json one JSON object and no stats line."""
    from ..engines import engine_class
    from ..engines import generate as run_generate
    from ..tokenizer import load_tokenizer, render_chat
    from ..tokenizer import prompt_ids as encode_prompt

    if prompt_arg is not None and prompt is not None:
        raise click.UsageError("give the prompt once: as an argument or with --prompt")
    prompt = prompt if prompt is not None else prompt_arg
    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of PROMPT/--prompt or --prompt-ids")
    engine_class(engine)
    placement.set_threads()
    ids = parse_ids(prompt_ids) if prompt_ids is not None else None
    if prompt is not None and not prompt:
        raise GenerationError("the prompt is empty")
    if chat and prompt is None:
        raise click.UsageError("--chat needs a text prompt, not --prompt-ids")
    if thinking is not None and not chat:
        raise click.UsageError("--thinking/--no-thinking need --chat")
    directory, model = load_model(model_dir, placement, exit_loop, loops)
    # What stdout shows before the continuation: the text prompt, or the user's message.
    shown = None if prompt is None else prompt + "\n" if chat else prompt
    if chat:
        prompt = render_chat(directory, prompt, None if thinking is None else {"enable_thinking": thinking})
    tokenizer = None
    try:
        tokenizer = load_tokenizer(directory, model.config.vocab_size)
    except SpeedecError:
        if ids is None:
            raise
    if ids is None:  # a chat prompt starts as its template says; a text prompt as the tokenizer says
        ids = tokenizer.encode(prompt) if chat else encode_prompt(tokenizer, prompt)
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id

    # The continuation is decoded after the prompt's last tokens, as it reads after the prompt
    # (a tokenizer may drop a token's leading space at the start of a text).
    context = ids[-_CONTEXT_TOKENS:] if shown is not None else []
    printer = _StreamPrinter(tokenizer, context, shown) if stream and not as_json else None
    result = run_generate(model, ids, max_new_tokens, engine=engine, eos_token_id=eos_token_id,
                          on_token=printer.add if printer else None, **sampling.as_kwargs(),
                          **speculation.engine_options())
    if as_json:
        text = tokenizer.decode(result.tokens) if tokenizer is not None else None
        click.echo(json.dumps({"engine": engine, "prompt_ids": ids, "tokens": result.tokens,
                               "text": text, "stop_reason": result.stop_reason,
                               "stats": result.stats.to_dict()}))
        return
    if printer is not None:
        printer.finish()
    elif tokenizer is None:
        click.echo(",".join(map(str, result.tokens)))
    else:
        if shown is not None:
            _echo_prompt(shown)
        click.echo(continuation(tokenizer, context, result.tokens))
    if not quiet:
        click.echo(stats_line(engine, result.stats), err=True)


# Prompt tokens the continuation is decoded after (enough for a split UTF-8 character).
_CONTEXT_TOKENS = 4


def _echo_prompt(text: str) -> None:
    """The prompt, bold on a terminal (click drops the style elsewhere)."""
    click.echo(click.style(text, bold=True), nl=False)
    sys.stdout.flush()


def continuation(tokenizer, context: list[int], tokens: list[int]) -> str:
    """The text of ``tokens`` as it reads after the ``context`` tokens."""
    if not context:
        return tokenizer.decode(tokens)
    head, text = tokenizer.decode(context), tokenizer.decode(context + list(tokens))
    return text[len(head):] if text.startswith(head) else tokenizer.decode(tokens)


def stats_line(engine: str, stats) -> str:
    """One line: tokens, tokens/s, steps per token and draft acceptance of a generation."""
    def number(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    if stats.acceptance is not None:
        drafts = f"{stats.acceptance:.0%} of drafts accepted"
    else:
        drafts = "no drafts verified" if stats.drafts_launched else "no drafts"
    return (f"{engine}: {stats.new_tokens} tokens, {number(stats.tokens_per_s, '.1f')} tokens/s, "
            f"{number(stats.steps_per_token, '.2f')} steps/token, {drafts}")


class _StreamPrinter:
    """Prints the text of verified tokens as they arrive (ids without a tokenizer), read
    after the ``context`` tokens; first the ``prompt`` text, if any, once the first token
    came (a request the engine refuses prints nothing)."""

    def __init__(self, tokenizer, context: list[int] | None = None, prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.context = list(context or [])
        self.prompt = prompt
        self.tokens: list[int] = []
        self.printed = 0

    def _start(self) -> None:
        if self.prompt is not None:
            _echo_prompt(self.prompt)
            self.prompt = None

    def add(self, token: int) -> None:
        self._start()
        self.tokens.append(token)
        if self.tokenizer is None:
            click.echo(("," if len(self.tokens) > 1 else "") + str(token), nl=False)
            sys.stdout.flush()
            return
        text = continuation(self.tokenizer, self.context, self.tokens)
        # Hold back an incomplete UTF-8 sequence until its last byte arrives.
        stable = text.rstrip("\ufffd")
        if len(stable) > self.printed:
            click.echo(stable[self.printed:], nl=False)
            sys.stdout.flush()
            self.printed = len(stable)

    def finish(self) -> None:
        self._start()
        if self.tokenizer is not None:
            text = continuation(self.tokenizer, self.context, self.tokens)
            click.echo(text[self.printed:], nl=False)
        click.echo()
