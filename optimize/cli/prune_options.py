"""The pruning and recovery flags of ``optimize build``, and the configs they become."""

from __future__ import annotations

from typing import Any

import click

from optimize.cli.build_options import option_group

OPTIONS = [
    click.option("--prune", "prune_ratio", type=float,
                 help="Share of channels (CNNs) or attention heads (transformers) to remove, e.g. 0.5. "
                      "The pruned model is recovered by distillation on the --calib data."),
    click.option("--prune-granularity", type=click.Choice(["auto", "channels", "heads"]), default="auto",
                 show_default=True, help="What to remove (auto: heads where attention is found, else channels)."),
    click.option("--prune-scope", type=click.Choice(["uniform", "global"]), default="uniform", show_default=True,
                 help="The same share in every layer, or ranked across all layers."),
    click.option("--prune-importance", type=click.Choice(["magnitude", "taylor", "bn-scale"]),
                 default="magnitude", show_default=True,
                 help="How channels are ranked (taylor: weight x gradient of the task loss; "
                      "bn-scale: BatchNorm scale)."),
    click.option("--prune-round-to", type=int, help="Keep channel counts multiples of this (e.g. 8)."),
    click.option("--prune-ignore", multiple=True,
                 help="Module name to leave whole, with every channel it touches. Repeatable. "
                      "The layer producing the model's output is always kept whole."),
    click.option("--recover-steps", type=int,
                 help="Cap on distillation steps after pruning (0: no recovery, reported as such). By default "
                      "recovery runs until the selection split is within budget with a margin, or stops improving."),
    click.option("--recover-time", default="10m", show_default=True,
                 help="Time limit of recovery (e.g. 90s, 10m, 1h)."),
    click.option("--recover-lr", type=float, help="Recovery learning rate (default 1e-3 CNN, 1e-4 transformer)."),
    click.option("--recover-batch-size", type=int, default=32, show_default=True, help="Recovery batch size."),
    click.option("--train-data", help="Labelled data (.npz with 'labels', or image class folders) added to "
                                      "recovery with a cross-entropy term."),
]


prune_options = option_group(OPTIONS)


def prune_configs(options: dict[str, Any]) -> tuple[Any, Any]:
    """``(PruneConfig or None, DistillConfig)`` from the parsed flags."""
    from optimize.passes.distill import DistillConfig
    from optimize.passes.prune import PruneConfig

    from optimize.errors import PruneError
    from optimize.passes.distill import parse_duration

    try:
        limit = parse_duration(options["recover_time"])
    except ValueError as exc:
        raise PruneError(f"--recover-time {exc}") from None
    if options["recover_steps"] is not None and options["recover_steps"] < 0:
        raise PruneError(f"--recover-steps {options['recover_steps']} must be 0 or more")
    distill = DistillConfig(steps=options["recover_steps"], time_limit_s=limit,
                            batch_size=options["recover_batch_size"], lr=options["recover_lr"])
    if options["prune_ratio"] is None:
        return None, distill
    config = PruneConfig(ratio=options["prune_ratio"], granularity=options["prune_granularity"],
                         scope=options["prune_scope"], importance=options["prune_importance"],
                         round_to=options["prune_round_to"], ignore=tuple(options["prune_ignore"]))
    config.check()
    return config, distill
