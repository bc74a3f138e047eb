"""Command-line options shared by ``generate``, ``translate`` and ``eval-translation``."""

from __future__ import annotations

from collections.abc import Callable

import click


def _apply(options: list, func: Callable) -> Callable:
    for option in reversed(options):
        func = option(func)
    return func


def speculation_options(func: Callable) -> Callable:
    """``--draft-tokens``, ``--early-correction``, ``--guesses``, ``--adaptive``
    (read them back with :func:`engine_options`)."""
    return _apply([
        click.option("--draft-tokens", type=int, default=None, help="Guesses per round (self-speculative)."),
        click.option("--early-correction", is_flag=True,
                     help="speed: replace a guess as soon as a later loop predicts otherwise."),
        click.option("--guesses", type=int, default=None,
                     help="speed: candidates launched per guess (the best as the guess, the rest as spares)."),
        click.option("--adaptive", is_flag=True,
                     help="speed: choose how many candidates to launch (none included) from measured "
                          "acceptance and step costs."),
    ], func)


def engine_options(draft_tokens: int | None, early_correction: bool, guesses: int | None,
                   adaptive: bool) -> dict:
    """Engine keyword arguments for the options given (the engine checks them)."""
    options: dict = {}
    if draft_tokens is not None:
        options["draft_tokens"] = draft_tokens
    if early_correction:
        options["early_correction"] = True
    if guesses is not None:
        options["guesses"] = guesses
    if adaptive:
        options["adaptive"] = True
    return options


def sampling_options(func: Callable) -> Callable:
    """``--temperature``, ``--top-k``, ``--top-p``, ``--seed``."""
    return _apply([
        click.option("--temperature", default=0.0, show_default=True, type=float,
                     help="0 is greedy; above 0 samples (losslessly under speculation)."),
        click.option("--top-k", type=int, default=None, help="Sample among the k most likely tokens."),
        click.option("--top-p", type=float, default=None, help="Sample within this probability mass."),
        click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible runs)."),
    ], func)
