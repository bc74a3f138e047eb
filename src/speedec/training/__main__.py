"""``python -m speedec.training``: the training commands on their own.

Useful under ``torchrun``, which launches a module:
``torchrun --nproc_per_node=2 -m speedec.training train --config FILE``.
"""

from __future__ import annotations

import sys

import click

from ..errors import SpeedecError
from .commands import eval_command, tokenizer_group, train_command, train_exit_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """speedec training: train, eval, tokenizer."""


main.add_command(train_command)
main.add_command(eval_command)
main.add_command(train_exit_command)
main.add_command(tokenizer_group)


def run() -> None:
    """Like the speedec CLI: expected errors are one line and exit code 2."""
    try:
        main.main(prog_name="python -m speedec.training", standalone_mode=False)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except SpeedecError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
