"""The ``optimize`` command: a click group whose subcommands import their work lazily."""

from __future__ import annotations

import importlib
import sys

import click

from optimize import __version__
from optimize.errors import OptimizeError

COMMANDS = {
    "bench": "optimize.cli.bench",
    "build": "optimize.cli.build",
    "drift": "optimize.cli.drift",
    "export": "optimize.cli.export",
    "inspect": "optimize.cli.inspect",
    "serve": "optimize.cli.serve",
}


class LazyGroup(click.Group):
    """Subcommands live in their own modules and are imported only when run or listed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return importlib.import_module(COMMANDS[name]).command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OptimizeError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="optimize")
def main() -> None:
    """Take a trained PyTorch model to a measured, deployable inference engine.

    \b
      optimize build ckpt.pt --arch models.digits:DigitsNet --calib data.npz --target all --out bundle/
      optimize bench bundle/ --latency-slo p99=20ms
      optimize inspect bundle/
    """
