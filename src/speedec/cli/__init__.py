"""The ``speedec`` command line. Subcommands are thin wrappers over the API.

Every expected failure (bad option, bad model directory, bad prompt...) prints
one line ``error: ...`` to stderr and exits with code 2.

Every click command of speedec lives in this package, and nothing outside it imports
it (nor click): the commands are thin wrappers over the library's functions.

One module per command group: :mod:`.generate`, :mod:`.model` (init, export-hf,
export-gguf, quantize), :mod:`.bench` (bench, kernels), :mod:`.study`, :mod:`.data`,
:mod:`.train` (train, eval, train-exit, tokenizer), :mod:`.translate` (train-translation,
translate, eval-translation), :mod:`.serve` (serve, loadtest: imported on first use, so
that no other command imports FastAPI). :mod:`.options` holds the shared options and the
typed objects they arrive in (:class:`~.options.Sampling`, :class:`~.options.Speculation`,
:class:`~.options.Placement`); :mod:`.common` the rest the commands share.
"""

from __future__ import annotations

import importlib
import sys

import click

from .. import __version__
from ..errors import SpeedecError
from . import bench, data, generate, model, study, train, translate

# Commands imported on first use (name -> "module:attribute"), so that no other command
# imports their dependencies.
LAZY_COMMANDS = {
    "serve": "speedec.cli.serve:serve_command",
    "loadtest": "speedec.cli.serve:loadtest_command",
}


class CliGroup(click.Group):
    """A group whose errors are one line and exit code 2, with commands imported on first use."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.lazy:
            module, attribute = self.lazy[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def main(self, args=None, prog_name=None, **extra):  # noqa: D401
        try:
            return super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(2)
        except SpeedecError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


@click.group(cls=CliGroup, lazy=LAZY_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="speedec")
def cli() -> None:
    """speedec: fast exact decoding for looped decoders with SPEED."""


for command in (generate.generate, model.init, model.export_hf, model.export_gguf, model.quantize,
                bench.bench, bench.kernels, study.study, data.data,
                train.train_command, train.eval_command, train.train_exit_command, train.tokenizer_group,
                translate.train_translation_command, translate.translate_command,
                translate.eval_translation_command):
    cli.add_command(command)


def main() -> None:
    cli.main(prog_name="speedec")
