"""``optimize inspect``."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@click.option("--layers", is_flag=True, help="Every layer's precision, MACs and kernel, per target.")
def command(bundle: Path, as_json: bool, layers: bool) -> None:
    """Show what a bundle holds: every target's precision (read back from its engine), size, accuracy
    and status."""
    from optimize.bundle.folder import read_manifest
    from optimize.bundle.table import targets_table
    from optimize.targets.coverage import brief, table

    manifest = read_manifest(bundle)
    if as_json:
        click.echo(json.dumps(manifest.to_json(), indent=2))
        return
    source = manifest.source
    click.echo(f"model   {manifest.model_name}  ({source['kind']}, sha256 {source['sha256'][:12]})")
    click.echo(f"task    {manifest.task}  ({manifest.model_kind})")
    text = manifest.text
    if text:
        click.echo(f"input   {text['input']}  [-1, 1]  BYTES (strings; tokenized by the server, up to "
                   f"{text['max_length']} tokens)")
    for spec in manifest.inputs:
        click.echo(f"input   {spec.name}  {list(spec.shape)}  {spec.dtype}" + ("  (also taken as is)" if text else ""))
    for spec in manifest.outputs:
        click.echo(f"output  {spec['name']}  {spec['shape']}  {spec['dtype']}")
    if text:
        click.echo(f"text    tokenizer {text['tokenizer']} ({text.get('vocab_size', '?')} tokens, pad id "
                   f"{text['pad_id']}); up to {text['max_length']} tokens from "
                   f"{text.get('max_length_source', 'the calibration data')}, built and calibrated at "
                   f"{text.get('calibration_length', text['max_length'])}")
    data = manifest.data
    click.echo(f"data    {data['calibration_samples']} calibration, {data['held_out_samples']} held out"
               + (f", {data['eval_samples']} labelled eval" if data["eval_samples"] else ""))
    machine = manifest.machine or {}
    if machine:
        isa = machine.get("isa")
        click.echo(f"built   on {machine.get('cpu')} ({machine.get('cores')} cores"
                   + (f"; {', '.join(isa) or 'no SIMD sets known'}" if isa is not None else "; instruction sets not recorded")
                   + ")")
    winner = manifest.winner_target
    click.echo(f"winner  {winner or 'none'}" + (f"  ({manifest.winner['reason']})" if winner else ""))
    click.echo("")
    click.echo(targets_table(manifest))
    read = {name: entry.coverage for name, entry in manifest.targets.items()
            if entry.coverage and entry.coverage.get("read_from")}
    if read:
        click.echo("")
        click.echo("read back from each engine" + ("" if layers else " (--layers: every layer)"))
    for name, record in read.items():
        if layers:
            click.echo(f"{name}:")
            click.echo("\n".join("  " + line for line in table(record)))
        else:
            click.echo(f"{name}: {brief(record)}")
