"""The table people read after a build or on ``optimize inspect``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from optimize.targets.coverage import label, summary

if TYPE_CHECKING:
    from optimize.bundle.manifest import Manifest, TargetRecord


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def accuracy_text(task: str, entry: TargetRecord) -> str:
    accuracy = entry.accuracy
    if not accuracy:
        return "-"
    held = accuracy["held_out"]
    if task == "classify":
        text = f"top-1 agree {held['top1_agreement_pct']:.1f}%"
        if "eval" in accuracy and "accuracy_pct" in accuracy["eval"]:
            base = accuracy["eval_fp32_torch"]["accuracy_pct"]
            text += f", acc {accuracy['eval']['accuracy_pct']:.2f}% (fp32 {base:.2f}%)"
        return text
    if task == "embed":
        return f"cos {held['mean_cosine']:.4f}, nn agree {held['retrieval_agreement_pct']:.0f}%"
    return f"max err {held['max_abs_error']:.3g}"


def status_text(entry: TargetRecord) -> str:
    if entry.built:
        recovery = entry.recovery
        return "built" + (f" ({len(recovery.get('kept_fp32', []))} kept FP32)" if recovery and
                          recovery.get("kept_fp32") else "")
    return f"{entry.status}: {entry.reason or ''}"


def precision_text(entry: TargetRecord) -> str:
    """What the target is, as its engine really runs: "int8 (static)", "int8 weights, fp32 compute"."""
    return label(entry.precision, (entry.build_config or {}).get("int8_scheme"), entry.coverage)


def coverage_text(entry: TargetRecord) -> str:
    """What was read back from the engine: "97% of MACs in INT8"; "-" where nothing was."""
    if entry.coverage and entry.coverage.get("error"):
        return "not read"
    return summary(entry.precision, (entry.build_config or {}).get("int8_scheme"), entry.coverage)


def targets_table(manifest: Manifest) -> str:
    """One row per target of a ``Manifest``: precision, what the engine computes in, size, accuracy,
    build time, status."""
    rows = [("target", "precision", "read back", "size", "accuracy vs FP32", "build s", "status")]
    for name, entry in manifest.targets.items():
        build = entry.build_time_s
        rows.append((name, precision_text(entry), coverage_text(entry), human_size(entry.size_bytes),
                     accuracy_text(manifest.task, entry),
                     f"{build:.1f}" if build is not None else "-", status_text(entry)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    lines += [f"warning: {w}" for w in manifest.warnings]
    return "\n".join(lines)
