"""The ``optimize`` command: a click group whose subcommands import their work lazily."""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import click

from optimize import __version__
from optimize.errors import OptimizeError

COMMANDS = {
    "bench": "optimize.cli.bench",
    "build": "optimize.cli.build",
    "drift": "optimize.cli.drift",
    "explain": "optimize.cli.explain",
    "export": "optimize.cli.export",
    "inspect": "optimize.cli.inspect",
    "report": "optimize.cli.report",
    "search": "optimize.cli.search",
    "serve": "optimize.cli.serve",
    "tune": "optimize.cli.tune",
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
            if debug_enabled(ctx):
                traceback.print_exception(exc, file=sys.stderr)  # with the chained cause
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.secho("interrupted: stopped; nothing half-written was kept (an existing bundle is unchanged)",
                        fg="yellow", err=True)
            sys.exit(130)


def debug_enabled(ctx: click.Context | None = None) -> bool:
    """``optimize --debug`` or ``OPTIMIZE_DEBUG=1``: a user's error also prints its traceback and cause."""
    if os.environ.get("OPTIMIZE_DEBUG", "").strip().lower() in ("1", "true", "yes"):
        return True
    return bool(ctx is not None and (ctx.find_root().params or {}).get("debug"))


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="optimize")
@click.option("--debug", is_flag=True, help="On an error, also print its traceback and chained cause "
                                            "(also OPTIMIZE_DEBUG=1).")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors on stderr (tables and paths stay on stdout).")
@click.option("--verbose", "-v", is_flag=True, help="Also debug messages, with the logger that wrote each.")
def main(debug: bool, quiet: bool, verbose: bool) -> None:
    """Take a trained PyTorch model to a measured, deployable inference engine.

    A mistake in what was asked (a path, a shape, an option) is one line and exit 2; a bug in
    optimize itself keeps its traceback.

    \b
      optimize build ckpt.pt --arch models.digits:DigitsNet --calib data.npz --target all --out bundle/
      optimize bench bundle/ --latency-slo p99=20ms
      optimize inspect bundle/
    """
    from optimize.cli.console import install

    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose contradict each other: give one")
    install(quiet=quiet, verbose=verbose)
