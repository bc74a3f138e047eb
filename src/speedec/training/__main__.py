"""``python -m speedec.training``: the training commands on their own.

Useful under ``torchrun``, which launches a module:
``torchrun --nproc_per_node=2 -m speedec.training train --config FILE``.
"""

from __future__ import annotations

import click

from ..cli import CliGroup
from .commands import eval_command, tokenizer_group, train_command, train_exit_command


@click.group(cls=CliGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """speedec training: train, eval, tokenizer."""


main.add_command(train_command)
main.add_command(eval_command)
main.add_command(train_exit_command)
main.add_command(tokenizer_group)


def run() -> None:
    """Like the speedec CLI (the same group class): expected errors are one line and exit code 2."""
    main.main(prog_name="python -m speedec.training")


if __name__ == "__main__":
    run()
