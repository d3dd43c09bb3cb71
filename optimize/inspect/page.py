"""What a person opens: ``report.html``, one self-contained page per bundle (plots inline), and
``MODEL_CARD.md``, a Hugging Face model card whose ``model-index`` holds what was measured.

Both are made from what the bundle holds, never from what was asked: the targets table and the
precision read back from each engine (the manifest), accuracy against the FP32 model with its
interval (the gates), the latency results and plots (``bench/``), the winner and why, the tuned
serving configuration (``serving.json``), the per-layer error (``explain/``), the recovery curve
after pruning and the drift reference. A section whose source is missing says how to make it.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from optimize import atomic
from optimize.bundle.folder import read_manifest
from optimize.bundle.table import human_size, precision_text, targets_table

REPORT = "report.html"
MODEL_CARD = "MODEL_CARD.md"
STYLE = """body{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1b1b1b}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:13px}img{max-width:100%;border:1px solid #eee}
.note{color:#555}.bad{color:#a00}.good{color:#070}"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _table(rows: list[list[Any]], cell=_esc) -> str:
    head, *body = rows
    return ("<table><tr>" + "".join(f"<th>{cell(c)}</th>" for c in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in body) + "</table>")


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{_esc(alt)}" src="data:image/png;base64,{data}"></p>'


def _inline(text: str) -> str:
    """Escaped text with Markdown's **bold** and `code`."""
    text = _esc(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _markdown_tables(text: str) -> str:
    """A report's Markdown as HTML good enough to read: tables, headings, lists, paragraphs (images
    are inlined elsewhere; a tiny subset, no dependency)."""
    out, table, paragraph, items = [], [], [], []

    def flush() -> None:
        if table:
            rows = [[c.strip() for c in line.strip("|").split("|")] for line in table
                    if not re.fullmatch(r"\|?[\s|:-]+\|?", line)]
            out.append(_table(rows, _inline))
            table.clear()
        if paragraph:
            out.append(f"<p>{_inline(' '.join(paragraph))}</p>")
            paragraph.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in items) + "</ul>")
            items.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            if paragraph or items:
                flush()
            table.append(line)
            continue
        if line.startswith("- "):
            if table or paragraph:
                flush()
            items.append(line[2:].strip())
            continue
        if items and line.startswith("  ") and line.strip():
            items[-1] += " " + line.strip()
            continue
        flush()
        if line.startswith("#"):
            level = min(6, len(line) - len(line.lstrip("#")) + 2)
            out.append(f"<h{level}>{_esc(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            continue
        elif line.strip():
            paragraph.append(line.strip())
    flush()
    return "\n".join(out)


def _accuracy_rows(manifest) -> list[list[Any]]:
    rows = [["target", "precision (read back)", "size", "gate", "drop", "95% interval", "samples", "budget", "settled?"]]
    for name, entry in manifest.targets.items():
        gate = entry.gate or {}
        interval = gate.get("interval")
        rows.append([name, precision_text(entry) if entry.status == "built" else entry.status,
                     human_size(entry.size_bytes), "passed" if gate.get("passed") else
                     ("failed" if gate else entry.reason or "-"), f"{gate['drop']:.3g}" if gate.get("drop") is not None else "-",
                     f"{interval[0]:.2f} to {interval[1]:.2f}" if interval else "-", gate.get("samples", "-"),
                     f"{gate.get('budget', '-')} ({gate.get('metric', '')})", _settled(gate)])
    return rows


def _settled(gate: dict[str, Any]) -> str:
    """Whether the interval leaves the verdict in doubt, and what would settle it."""
    if not gate or gate.get("interval") is None:
        return "-"
    if not gate.get("straddles_budget"):
        return "yes: the interval is on one side of the budget"
    more = gate.get("more_samples")
    return (f"no: the interval straddles the budget; about {more} more held-out samples would settle it" if more
            else "no: the drop sits at the budget")


def _recovery_plot(manifest, folder: Path) -> str | None:
    """The recovery curve after pruning (distance to the original per check), as an inline plot."""
    stage = (manifest.stages or {}).get("prune") or {}
    curve = (stage.get("recovery") or {}).get("curve") or []
    points = [(c.get("step"), c.get("signal")) for c in curve if c.get("signal") is not None]
    if not points:
        return None
    from optimize.plots import plain_log_ticks, pyplot

    plt = pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
    axis.set(yscale="log", xlabel="training step", ylabel="distance to the original",
             title="Recovery after pruning")
    plain_log_ticks(axis, y=True)
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    path = folder / "recovery.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return _image(path, "recovery curve")


def _drift_section(bundle: Path, manifest) -> list[str]:
    """The drift reference of the target served by default: what is watched, at which scales, how
    rarely it may alarm on unshifted traffic, and whether accuracy is estimated without labels."""
    served = (manifest.winner or {}).get("target") or next(
        (n for n, e in manifest.targets.items() if e.status == "built" and e.drift), None)
    entry = manifest.targets.get(served) if served else None
    if entry is None or not entry.drift or not (bundle / entry.drift.get("profile", "")).is_file():
        return []
    drift = entry.drift
    profile = json.loads((bundle / drift["profile"]).read_text())
    rows = [["feature", "kind", "reference bins", "bin edges (first to last)"]]
    for feature in profile.get("features", []):
        edges = feature.get("edges") or []
        rows.append([feature["name"], feature.get("kind", "?"),
                     feature.get("categories") or len(edges) + 1,
                     f"{edges[0]:.4g} to {edges[-1]:.4g}" if edges else "-"])
    scales = ", ".join(f"{s['samples']} samples every {s['step']} (alpha {s['alpha']:.2g})" for s in drift.get("scales", []))
    estimate = drift.get("estimated_accuracy") or {}
    said = (f"accuracy is estimated without labels ({estimate['method']}; reference accuracy "
            f"{estimate.get('reference_accuracy')})" if estimate.get("method") else
            f"no accuracy estimate ({estimate.get('reason', 'not calibrated')})")
    return ["<h2>Drift reference</h2>",
            f"<p>{_esc(served)} (served by default): {len(rows) - 1} features per sample from {profile.get('reference_samples', '?')} "
            f"held-out samples; windows of {_esc(scales)}; on unshifted traffic all scales together alarm about "
            f"once per {_esc(drift.get('requests_per_false_alarm', '?'))} requests; {_esc(said)}.</p>",
            _table(rows)]


def render(bundle: Path) -> str:
    """The page's HTML."""
    import tempfile

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    machine = manifest.machine or {}
    parts = [f"<h1>{_esc(manifest.model_name)}: what was built and how it measured</h1>",
             f"<p class='note'>Built {_esc(manifest.created)} on {_esc(machine.get('cpu', 'an unrecorded CPU'))} "
             f"({_esc(machine.get('cores', '?'))} cores) from {_esc((manifest.source or {}).get('checkpoint', '?'))} "
             f"(sha256 {_esc(str((manifest.source or {}).get('sha256', ''))[:16])}); task {_esc(manifest.task)}.</p>",
             "<h2>Targets</h2>", f"<pre>{_esc(targets_table(manifest))}</pre>",
             "<h2>Accuracy against the FP32 model</h2>", _table(_accuracy_rows(manifest))]
    for warning in manifest.warnings or []:
        parts.append(f"<p class='bad'>{_esc(warning)}</p>")
    winner = manifest.winner or {}
    parts.append("<h2>Winner</h2>")
    reason = str(winner.get("reason", "")).removeprefix(f"{winner.get('target')}: ")
    parts.append(f"<p><b>{_esc(winner['target'])}</b>: {_esc(reason)} (chosen on "
                 f"{_esc(winner.get('load', '?'))}, {_esc(winner.get('slo') or 'no SLO')}).</p>" if winner.get("target")
                 else "<p class='note'>No winner recorded: <code>optimize bench BUNDLE --select</code> (or build "
                      "with <code>--target auto</code>) measures the targets and records one.</p>")
    bench = bundle / "bench" / "report.md"
    parts.append("<h2>Latency</h2>")
    if bench.is_file():
        for image in sorted((bundle / "bench").glob("*.png")):
            parts.append(_image(image, image.stem))
        # The benchmark report ends with the per-layer error (or a pointer to it): this page's own section below.
        text = bench.read_text()
        for tail in ("\n## Per-layer error", "\nPer-layer error against the FP32 model: run"):
            text = text.split(tail)[0]
        parts.append(_markdown_tables(text))
    else:
        parts.append("<p class='note'>Not measured yet: <code>optimize bench BUNDLE</code>.</p>")
    serving = bundle / "tune.md"
    if serving.is_file():
        parts.append("<h2>Serving configuration</h2>")
        if (bundle / "tune.png").is_file():
            parts.append(_image(bundle / "tune.png", "serving configurations"))
        parts.append(_markdown_tables(serving.read_text()))
    explain = bundle / "explain" / "report.md"
    parts.append("<h2>Per-layer error</h2>")
    if explain.is_file():
        for image in sorted((bundle / "explain").glob("*.png")):
            parts.append(_image(image, image.stem))
        parts.append(_markdown_tables(explain.read_text()))
    else:
        parts.append("<p class='note'>Not computed: <code>optimize explain BUNDLE</code>.</p>")
    with tempfile.TemporaryDirectory() as scratch:
        recovery = _recovery_plot(manifest, Path(scratch))
    prune = (manifest.stages or {}).get("prune")
    if prune:
        parts += ["<h2>Pruning and recovery</h2>", recovery or "",
                  f"<pre>{_esc(json.dumps({k: prune[k] for k in prune if k not in ('recovery',)}, indent=1, default=str)[:4000])}</pre>"]
    parts += _drift_section(bundle, manifest)
    search = bundle / "search" / "report.md"
    if search.is_file():
        parts.append("<h2>Search</h2>")
        if (bundle / "search" / "frontier.png").is_file():
            parts.append(_image(bundle / "search" / "frontier.png", "accuracy against latency, every trial"))
        parts.append(_markdown_tables(search.read_text()))
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_esc(manifest.model_name)} report"
            f"</title><style>{STYLE}</style></head><body>" + "\n".join(parts) + "</body></html>\n")


def _card_results(task: str, name: str, entry) -> list[dict[str, Any]]:
    """The model-index results of one engine: its agreement with the FP32 model on the held-out
    data, and, where labelled data was given, its accuracy there; the gate's drop goes with the data
    it was measured on."""
    accuracy, gate = entry.accuracy or {}, entry.gate or {}
    kind = {"type": TASKS.get(task, task), "name": f"{name} engine"}
    held = [{"type": key, "value": round(float(value), 4), "name": f"{key.replace('_', ' ')} against the FP32 model"}
            for key, value in (accuracy.get("held_out") or {}).items() if isinstance(value, (int, float))]
    labelled = []
    evaluation = (accuracy.get("eval") or {}).get("accuracy_pct")
    if evaluation is not None:
        labelled.append({"type": "accuracy", "value": round(float(evaluation), 3), "name": "labelled accuracy"})
    if gate.get("drop") is not None:
        low_high = gate.get("interval")
        drop = {"type": "accuracy_drop", "value": round(float(gate["drop"]), 4),
                "name": f"{gate.get('metric', 'drop')} drop against the FP32 model, budget {gate.get('budget')}"
                        + (f", 95% interval {low_high[0]:.3g} to {low_high[1]:.3g}" if low_high else "")}
        (labelled if gate.get("metric") == "labelled accuracy" else held).append(drop)
    results = [{"task": dict(kind), "dataset": {"name": "held-out split of the calibration data", "type": "held-out"},
                "metrics": held}]
    if labelled:
        results.append({"task": dict(kind), "dataset": {"name": "labelled evaluation data (--eval-data)", "type": "eval"},
                        "metrics": labelled})
    return [r for r in results if r["metrics"]]


TASKS = {"classify": "image-classification", "embed": "feature-extraction", "regress": "tabular-regression"}


def _first_table(markdown: str) -> list[str]:
    """The first Markdown table in a report (the benchmark's summary)."""
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        return []
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def _markdown_rows(rows: list[list[Any]]) -> list[str]:
    head, *body = rows
    return (["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(map(str, row)) + " |" for row in body])


def model_card(bundle: Path) -> str:
    """``MODEL_CARD.md``: YAML front matter with ``model-index`` (per built target, what was measured
    against the FP32 model on the held-out and labelled data), then what was built from what, how it
    was measured, and the latency where it was benchmarked."""
    import yaml

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    results = [result for name, entry in manifest.targets.items() if entry.status == "built"
               for result in _card_results(manifest.task, name, entry)]
    front = {"library_name": "optimize", "tags": ["onnx", "int8", "inference"],
             "model-index": [{"name": manifest.model_name, "results": results}]}
    winner, machine = manifest.winner or {}, manifest.machine or {}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {manifest.model_name}", "",
             f"Built by optimize on {manifest.created} from `{(manifest.source or {}).get('checkpoint')}` "
             f"(sha256 `{(manifest.source or {}).get('sha256')}`), task `{manifest.task}`, on "
             f"{machine.get('cpu')} ({machine.get('cores', '?')} cores).", "",
             "## Engines", "", "| target | precision (read back from the engine) | size | status |", "|---|---|---|---|"]
    for name, entry in manifest.targets.items():
        lines.append(f"| {name} | {precision_text(entry) if entry.status == 'built' else '-'} | "
                     f"{human_size(entry.size_bytes)} | {entry.status}{': ' + entry.reason if entry.reason else ''} |")
    lines += ["", "## Accuracy against the FP32 model", "",
              "Every accuracy number is against the original FP32 PyTorch model's outputs, on held-out data the "
              "engines never saw during calibration (and on the labelled evaluation data where it was given), "
              "with the drop's 95% interval; the gate keeps a target only within the accuracy budget.", "",
              *_markdown_rows(_accuracy_rows(manifest)), ""]
    bench = bundle / "bench" / "report.md"
    summary = _first_table(bench.read_text()) if bench.is_file() else []
    if summary:
        lines += ["## Latency", "", "Measured by `optimize bench` against torch eager in the same run, at batch 1 "
                  "with one caller (`bench/report.md` names the machine and has every load):", "", *summary, ""]
    if winner.get("target"):
        reason = str(winner.get("reason", "")).removeprefix(f"{winner['target']}: ")
        lines += [f"Winner: **{winner['target']}**: {reason} (chosen on {winner.get('load', '?')}, "
                  f"{winner.get('slo') or 'no SLO'}).", ""]
    for warning in manifest.warnings or []:
        lines += [f"Warning: {warning}", ""]
    return "\n".join(lines)


def write_pages(bundle: Path) -> list[Path]:
    """Write ``report.html`` and ``MODEL_CARD.md`` into the bundle (each atomically)."""
    bundle = Path(bundle)
    atomic.write_text(bundle / REPORT, render(bundle))
    atomic.write_text(bundle / MODEL_CARD, model_card(bundle))
    return [bundle / REPORT, bundle / MODEL_CARD]
