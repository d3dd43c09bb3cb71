"""``optimize explain``."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("explain")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", "targets", multiple=True, help="Only this target (repeatable; default: every built one).")
@click.option("--samples", type=click.IntRange(1), default=64, show_default=True,
              help="Held-out samples to run through the reference and each engine.")
@click.option("--top", type=click.IntRange(1), default=5, show_default=True, help="Worst layers to print per target.")
def command(bundle: Path, targets: tuple[str, ...], samples: int, top: int) -> None:
    """Which layer broke it: every layer's error in each engine against the FP32 model.

    Held-out samples run through the FP32 ONNX model (ONNX Runtime, optimizations off) and through
    each engine with its intermediate tensors exposed. Per layer: the precision it runs in, the
    error it adds when fed the FP32 model's inputs (local; the ranking) and the error of its output
    end to end (cumulative), as SQNR in dB and cosine. Writes BUNDLE/explain/ (report.md with a
    plot of error by depth, layers.json) and prints each engine's worst layers.
    """
    from optimize.bundle.folder import read_manifest
    from optimize.inspect.explain import explain_bundle, write_explain
    from optimize.inspect.report import worst_lines

    read_manifest(bundle)  # a missing or unreadable bundle is one line
    record = explain_bundle(bundle, list(targets) or None, samples)
    folder = write_explain(bundle, record)
    for name, engine in record["engines"].items():
        if "skipped" in engine:
            click.echo(f"{name}: {engine['skipped']}")
            continue
        finals = "; ".join(f"{out} " + ("exact" if v["untouched"]["exact"] else f"{v['untouched']['sqnr_db']:.1f} dB")
                           for out, v in engine["fidelity"]["outputs"].items())
        status = ", failed at build time" if engine.get("status") == "failed" else ""
        click.echo(f"{name} ({engine['precision']}{status}): final {finals}; worst layers by the error they add:")
        lines = worst_lines(engine, top)
        click.echo("\n".join("  " + line for line in lines) if lines else "  none adds any error")
        if not engine["fidelity"]["same"]:
            click.echo(f"  note: {engine['fidelity']['message']}")
    click.echo(f"report: {folder / 'report.md'}")
    from optimize.cli.report import refresh_and_say, rewrite_bench

    rewrite_bench(bundle)  # its report carries the per-layer section
    refresh_and_say(bundle)
