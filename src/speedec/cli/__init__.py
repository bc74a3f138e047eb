"""The ``speedec`` command line. Subcommands are thin wrappers over the API.

Every expected failure (bad option, bad model directory, bad prompt...) prints
one line ``error: ...`` to stderr and exits with code 2.

One module per command group: :mod:`.generate`, :mod:`.model` (init,
export-hf, export-gguf), :mod:`.bench` (bench, kernels), :mod:`.study`, :mod:`.data`,
:mod:`.serve` (serve, loadtest: imported on first use, so that no other command
imports FastAPI); :mod:`.common` holds what they share. The training and translation commands
live next to what they drive (:mod:`speedec.training.commands`,
:mod:`speedec.encdec.commands`) and are imported when first used.
"""

from __future__ import annotations

import importlib
import sys

import click

from .. import __version__
from ..errors import SpeedecError
from . import bench, data, generate, model, study

# Commands defined outside this package: name -> "module:attribute". Imported
# on first use, so that they may import this package's options themselves.
EXTERNAL_COMMANDS = {
    "train": "speedec.training.commands:train_command",
    "eval": "speedec.training.commands:eval_command",
    "train-exit": "speedec.training.commands:train_exit_command",
    "tokenizer": "speedec.training.commands:tokenizer_group",
    "train-translation": "speedec.encdec.commands:train_translation_command",
    "translate": "speedec.encdec.commands:translate_command",
    "eval-translation": "speedec.encdec.commands:eval_translation_command",
    "serve": "speedec.cli.serve:serve_command",
    "loadtest": "speedec.cli.serve:loadtest_command",
}


class CliGroup(click.Group):
    """A group whose errors are one line and exit code 2, with commands imported on first use."""

    def __init__(self, *args, external: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.external = dict(external or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.external})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.external:
            module, attribute = self.external[name].split(":")
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


@click.group(cls=CliGroup, external=EXTERNAL_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="speedec")
def cli() -> None:
    """speedec: fast exact decoding for looped decoders with SPEED."""


for command in (generate.generate, model.init, model.export_hf, model.export_gguf, model.quantize,
                bench.bench, bench.kernels,
                study.study, data.data):
    cli.add_command(command)


def main() -> None:
    cli.main(prog_name="speedec")
