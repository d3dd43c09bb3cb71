"""The per-layer error report for people: the worst layers of each engine, engines side by side,
and error by depth as a plot (``optimize explain``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from optimize.targets.layer_error import sqnr_key

WORST = 10
PLOT_CEILING_DB = 100.0  # the plot shows errors up to here; a layer this close to FP32 sits on the top line


def db(error: dict[str, Any] | None) -> str:
    if not error:
        return "-"
    if error.get("exact"):
        return "exact"
    return f"{error['sqnr_db']:.1f}"


def _with_unit(error: dict[str, Any] | None) -> str:
    text = db(error)
    return text if text in ("-", "exact") else f"{text} dB"


def cos(error: dict[str, Any] | None) -> str:
    return "-" if not error else f"{error['cosine']:.4f}"


def measured(engine: dict[str, Any]) -> list[dict[str, Any]]:
    return [layer for layer in engine.get("layers", []) if "local" in layer or "cumulative" in layer]


def worst(engine: dict[str, Any], count: int = WORST) -> list[dict[str, Any]]:
    """The layers that add the most error of their own (lowest local SQNR), worst first."""
    ranked = sorted((layer for layer in engine.get("layers", []) if "local" in layer),
                    key=lambda layer: sqnr_key(layer["local"]))
    return [layer for layer in ranked if not layer["local"].get("exact")][:count]


def _table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]]) + "\n"


def worst_lines(engine: dict[str, Any], count: int = 5) -> list[str]:
    """The console's summary of one engine: its worst layers by local error."""
    lines = []
    for layer in worst(engine, count):
        lines.append(f"{layer['module']:<32.32} {layer['op']:<12} {layer['precision'] or '-':<6} local "
                     f"{db(layer['local']):>6} dB (cos {cos(layer['local'])})  cumulative "
                     f"{db(layer.get('cumulative')):>6} dB")
    return lines


def markdown(record: dict[str, Any], image: str | None) -> str:
    machine = record["machine"]
    parts = [f"# Per-layer error: {record['model']}\n",
             f"{record['samples']} held-out samples on {machine.get('cpu')} ({machine.get('cores')} cores). "
             f"Reference: {record['reference']}. Each row is one computing node of the ONNX graph, named by "
             f"the module it came from. **Local**: the error the layer adds when fed the reference's own "
             f"inputs (where the damage is made; the ranking). **Cumulative**: the error of its output in "
             f"the engine run end to end (where the damage shows). SQNR in dB (higher is better), cosine "
             f"averaged over samples. Precision: what the engine was read back to compute the layer in.\n"]
    if image:
        parts.append(f"![error by depth]({image})\n")
    engines = {name: e for name, e in record["engines"].items() if "layers" in e}
    for name, engine in record["engines"].items():
        parts.append(f"## {name}\n")
        if engine.get("status") == "failed":
            parts.append("Failed at build time (not in the bundle); its engine is read from the build's stage cache.\n")
        if "skipped" in engine:
            parts.append(f"{engine['skipped']}.\n")
            continue
        fidelity = engine["fidelity"]
        finals = ", ".join(f"`{out}` {_with_unit(v['untouched'])} untouched, {_with_unit(v['instrumented'])} instrumented"
                           for out, v in fidelity["outputs"].items())
        parts.append(f"Final output error: {finals}. {fidelity['message'][0].upper()}{fidelity['message'][1:]}.\n")
        rows = [["rank", "module", "op", "node", "precision", "local dB", "local cos", "cumulative dB",
                 "cumulative cos"]]
        for rank, layer in enumerate(worst(engine), 1):
            rows.append([str(rank), f"`{layer['module']}`", layer["op"], f"`{layer['node']}`",
                         layer["precision"] or "-", db(layer["local"]), cos(layer["local"]),
                         db(layer.get("cumulative")), cos(layer.get("cumulative"))])
        parts.append(_table(rows) if len(rows) > 1 else "No layer adds any error.\n")
        missing = [layer for layer in engine["layers"] if "missing" in layer]
        if missing:
            reasons: dict[str, list[str]] = {}
            for layer in missing:
                reasons.setdefault(layer["missing"], []).append(f"`{layer['node']}`")
            parts += [f"- {len(nodes)} layers: {reason} ({', '.join(nodes[:6])}{', ...' if len(nodes) > 6 else ''})\n"
                      for reason, nodes in reasons.items()]
    if len(engines) > 1:
        parts.append("## Engines side by side (the layers worst in any engine)\n")
        chosen: list[str] = []
        for engine in engines.values():
            chosen += [layer["node"] for layer in worst(engine, WORST) if layer["node"] not in chosen]
        by_node = {name: {layer["node"]: layer for layer in e["layers"]} for name, e in engines.items()}
        header = ["module", "op"] + [f"{n} local / cumulative dB" for n in engines]
        rows = [header]
        first = next(iter(by_node.values()))
        for node in chosen:
            layer = first[node]
            rows.append([f"`{layer['module']}`", layer["op"]] +
                        [f"{db(by_node[n][node].get('local'))} / {db(by_node[n][node].get('cumulative'))}"
                         for n in engines])
        parts.append(_table(rows))
    return "\n".join(parts)


def plot(record: dict[str, Any], path: Path) -> str | None:
    """Cumulative SQNR by depth (lines) and local SQNR (points), engine beside engine; None without
    matplotlib."""
    from optimize.plots import pyplot

    plt = pyplot()
    if plt is None:
        return None
    figure, axis = plt.subplots(figsize=(9, 4.5))
    for index, (name, engine) in enumerate((n, e) for n, e in record["engines"].items() if "layers" in e):
        color = f"C{index}"
        points = [(layer["depth"], layer["cumulative"]) for layer in engine["layers"] if "cumulative" in layer]
        finite = [(d, min(e["sqnr_db"], PLOT_CEILING_DB)) for d, e in points if not e.get("exact") and math.isfinite(e["sqnr_db"])]
        # An engine that exposing tensors changed is drawn dashed, and its label says so.
        changed = not engine.get("fidelity", {}).get("same", True)
        if finite:
            axis.plot(*zip(*finite), color=color, linestyle="--" if changed else "-",
                      label=f"{name} cumulative" + (" (instrumented engine differs: see its note)" if changed else ""))
        local = [(layer["depth"], min(layer["local"]["sqnr_db"], PLOT_CEILING_DB)) for layer in engine["layers"]
                 if "local" in layer and not layer["local"].get("exact") and math.isfinite(layer["local"]["sqnr_db"])]
        if local:
            axis.scatter(*zip(*local), color=color, s=10, marker="o", alpha=0.6, label=f"{name} local")
    axis.set_xlabel("depth (node index in the ONNX graph)")
    axis.set_ylabel(f"SQNR against FP32 (dB, higher is better; capped at {PLOT_CEILING_DB:.0f})")
    axis.set_title(f"{record['model']}: error by depth")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name
