"""MkDocs hooks: the pages made from the code at build time, so the reference cannot drift from it.

- ``index.md``: the README (its ``docs/`` links pointed into the site);
- ``reference/cli.md``: every command's help and options, from click;
- ``reference/metrics.md``: the server's Prometheus series, from a fresh ``ServerMetrics``;
- ``reference/routes.md``: the HTTP routes from the OpenAPI description the server serves, the gRPC
  methods from Triton's service definition and the ones answered;
- ``reference/manifest.md``: the manifest's fields, from the dataclasses that read and write it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent


def on_files(files, config):
    pages = {"index.md": readme(), "reference/cli.md": cli(), "reference/metrics.md": metrics(),
             "reference/routes.md": routes(), "reference/manifest.md": manifest()}
    for uri, content in pages.items():
        existing = files.get_file_from_path(uri)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, uri, content=content))
    return files


def readme() -> str:
    text = (ROOT / "README.md").read_text()
    return re.sub(r"\]\(docs/([^)]+)\)", r"](\1)", text)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def cli() -> str:
    import click

    from optimize.cli import COMMANDS, main

    lines = ["# Command reference", "",
             "Generated from the commands themselves (`optimize COMMAND --help` says the same).", ""]
    context = click.Context(main, info_name="optimize")

    def describe(command: click.Command, name: str, parent: click.Context, depth: int) -> None:
        own = click.Context(command, info_name=name, parent=parent)
        lines.extend([f"{'#' * depth} `{own.command_path}`", "", "```text", command.get_help(own).strip(), "```", ""])
        if isinstance(command, click.Group):
            for sub in sorted(command.commands):
                describe(command.commands[sub], sub, own, depth + 1)

    for name in sorted(COMMANDS):
        describe(main.get_command(context, name), name, context, 2)
    return "\n".join(lines)


def metrics() -> str:
    from serve.metrics import ServerMetrics

    text = ServerMetrics("MODEL", "VERSION", "TARGET", "PRECISION", "BUNDLE", 64).render().decode()
    helps, kinds, labels = {}, {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, help_text = line[len("# HELP "):].split(" ", 1)
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, kind = line[len("# TYPE "):].split(" ", 1)
            kinds[name] = kind
        elif line and not line.startswith("#") and "{" in line:
            series, rest = line.split("{", 1)
            base = next((n for n in helps if series == n or series.startswith(n + "_")), series)
            found = [part.split("=", 1)[0] for part in re.findall(r'(\w+)="', rest.split("}", 1)[0])]
            labels.setdefault(base, [])
            labels[base] += [n for n in found if n not in labels[base] and n != "le"]
    rows = ["| series | type | labels | meaning |", "|---|---|---|---|"]
    for name in helps:
        rows.append(f"| `{name}` | {kinds[name]} | {', '.join(labels.get(name, []))} | {_cell(helps[name])} |")
    return "\n".join(["# Metrics", "", "The series every `optimize serve` exports on `/metrics`, read from a fresh "
                      "metrics registry of the server (durations in seconds, counters end in `_total`). The drift "
                      "monitor's `drift_*` series are described in [Drift monitoring](../concepts/drift.md).", "",
                      *rows, ""])


def routes() -> str:
    from optimize.inputs.specs import TensorSpec
    from optimize.oip import grpc_service_pb2 as pb
    from serve.grpc_server import InferenceServicer
    from serve.model import ServedModel
    from serve.openapi import openapi

    model = ServedModel("MODEL", "VERSION", "TARGET", "PRECISION", [TensorSpec("x", (-1, 4))],
                        [{"name": "y", "shape": [-1, 2], "dtype": "float32"}], 8)
    rows = ["| method | route | what it answers |", "|---|---|---|"]
    for route, methods in openapi(model)["paths"].items():
        for method, spec in methods.items():
            rows.append(f"| {method.upper()} | `{route.replace('MODEL', '{model}')}` | {_cell(spec['summary'])} |")
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    answered = [m.name for m in service.methods if m.name in vars(InferenceServicer)]
    unanswered = [m.name for m in service.methods if m.name not in vars(InferenceServicer)]
    return "\n".join([
        "# Routes", "", "## HTTP (Open Inference Protocol v2)", "",
        "From the OpenAPI description the server serves at `/openapi.json`; every model route also answers "
        "under `/v2/models/{model}/versions/{version}`.", "", *rows, "",
        "## gRPC (Triton's `inference.GRPCInferenceService`)", "",
        f"Answered: {', '.join(f'`{m}`' for m in answered)}.", "",
        f"UNIMPLEMENTED (one model per server): {', '.join(f'`{m}`' for m in unanswered) or 'none'}.", "",
        "The standard `grpc.health.v1.Health` service answers for `\"\"` and `inference.GRPCInferenceService`.", ""])


def _fields(cls: type) -> list[str]:
    """``| field | type | default | meaning |`` rows, the meaning from the field's comment in the source."""
    source = inspect.getsource(cls)
    comments = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.*)$", source, re.M)}
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        if field.name.startswith("_"):
            continue
        default = ("" if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
                   else repr(field.default) if field.default is not dataclasses.MISSING else "empty")
        rows.append(f"| `{field.name}` | `{_cell(field.type)}` | {_cell(default)} | {_cell(comments.get(field.name, ''))} |")
    return rows


def manifest() -> str:
    from optimize.bundle.manifest import Manifest, TargetRecord
    from optimize.bundle.serving import ServingKnobs

    return "\n".join([
        "# The manifest", "", "`manifest.json` is read and written through one typed `Manifest`; these tables are "
        "made from its dataclasses.", "", "## Manifest", "", inspect.getdoc(Manifest) or "", "", *_fields(Manifest), "",
        "## A target's record (`targets.<name>`)", "", inspect.getdoc(TargetRecord) or "", "", *_fields(TargetRecord), "",
        "## The tuned serving configuration (`serving.json`, beside the manifest)", "",
        inspect.getdoc(ServingKnobs) or "", "", *_fields(ServingKnobs), ""])
