"""Structured pruning on torch-pruning: whole channels (CNNs) or whole attention heads (transformers).

The pruned model has really smaller tensors, not masks. ``prune_module`` works on a copy and
leaves the original untouched (it stays the teacher and the accuracy reference). Layers that
feed the model's outputs keep their output width, so the outputs keep their shapes; modules the
user names with ``ignore`` keep every channel they touch.

A pruned model reloads from its original class with ``rebuild_pruned``: the checkpoint written by
``save_pruned`` is a plain state_dict plus the changed layer attributes (no pickled code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable

from optimize.errors import PruneError
from optimize.inputs.pruned_checkpoint import fresh_copy

if TYPE_CHECKING:
    import torch

IMPORTANCES = ("magnitude", "taylor", "bn-scale")
GRANULARITIES = ("auto", "channels", "heads")
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads")
QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))
@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """What to remove: ``ratio`` of the channels (or heads), ranked by ``importance``."""

    ratio: float
    granularity: str = "auto"  # auto: heads for attention models, channels otherwise
    scope: str = "uniform"  # uniform: the same share in every layer; global: ranked across layers
    importance: str = "magnitude"
    round_to: int | None = None
    ignore: tuple[str, ...] = ()

    def check(self) -> None:
        if not 0 < self.ratio < 1:
            raise PruneError(f"--prune {self.ratio} must be a share between 0 and 1, e.g. 0.5")
        if self.importance not in IMPORTANCES:
            raise PruneError(f"--prune-importance {self.importance!r} is not one of {', '.join(IMPORTANCES)}")
        if self.granularity not in GRANULARITIES:
            raise PruneError(f"--prune-granularity {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if self.scope not in ("uniform", "global"):
            raise PruneError(f"--prune-scope {self.scope!r} must be uniform or global")
        if self.round_to is not None and self.round_to < 1:
            raise PruneError(f"--prune-round-to {self.round_to} must be a positive channel count")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Attention:
    """An attention block whose heads can be removed: its q/k/v projections and head count attribute."""

    name: str
    module: torch.nn.Module
    qkv: tuple[Any, Any, Any]
    heads_attr: str

    @property
    def heads(self) -> int:
        return int(getattr(self.module, self.heads_attr))

    @property
    def head_size(self) -> int:
        return self.qkv[0].out_features // self.heads


@dataclasses.dataclass
class PruneOutcome:
    module: torch.nn.Module
    report: dict[str, Any]


def find_attention(module: torch.nn.Module) -> list[Attention]:
    """Attention blocks written with separate q/k/v ``nn.Linear`` layers (BERT, DistilBERT, Llama...)."""
    from torch import nn

    found = []
    for name, child in module.named_modules():
        attr = next((a for a in HEAD_COUNT_ATTRS if isinstance(getattr(child, a, None), int)), None)
        if attr is None:
            continue
        for names in QKV_NAMES:
            layers = [getattr(child, n, None) for n in names]
            if all(isinstance(layer, nn.Linear) for layer in layers):
                found.append(Attention(name, child, tuple(layers), attr))
                break
    return found


def fused_attention(module: torch.nn.Module) -> list[str]:
    """Names of ``nn.MultiheadAttention`` modules: their fused projection ties the heads to the
    embedding width, so they cannot lose heads; channel pruning keeps them whole."""
    from torch import nn

    return [name for name, child in module.named_modules() if isinstance(child, nn.MultiheadAttention)]


def _output_layers(module: torch.nn.Module, example: tuple) -> list[Any]:
    """The Linear/Conv layers whose output is one of the model's outputs, and the last one run: their
    output widths are the model's output widths (two heads, two outputs: both are kept)."""
    import torch
    from torch import nn

    order: list[tuple[Any, Any]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, out: order.append((mod, out)))
             for m in module.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad():
            outputs = module(*example)
    finally:
        for hook in hooks:
            hook.remove()
    flat = [outputs] if isinstance(outputs, torch.Tensor) else [o for o in _flatten(outputs)
                                                                if isinstance(o, torch.Tensor)]
    chosen = [mod for mod, out in order if any(out is o for o in flat)]
    if order and order[-1][0] not in chosen:
        chosen.append(order[-1][0])
    return list({id(m): m for m in chosen}.values())


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


def _named(module: torch.nn.Module, names: Iterable[str]) -> list[Any]:
    modules = dict(module.named_modules())
    chosen = []
    for name in names:
        if name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise PruneError(f"--prune-ignore {name!r} is not a module of the model{hint}")
        chosen.append(modules[name])
    return chosen


def _groups_touching(graph: Any, frozen: list[Any]) -> list[Any]:
    """Roots of the pruning groups that would change a frozen module's channels or parameters."""
    from torch import nn

    frozen_set = {id(m) for m in frozen}
    frozen_params = {id(p) for m in frozen for p in m.parameters()}
    roots = []
    for layer in list(graph.module2node):
        if not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) or id(layer) in frozen_set:
            continue
        pruner = graph.get_pruner_of_module(layer)
        group = graph.get_pruning_group(layer, pruner.prune_out_channels, list(range(pruner.get_out_channels(layer))))
        if any(id(dep.target.module) in frozen_set | frozen_params for dep, _ in group):
            roots.append(layer)
    return roots


def _importance(config: PruneConfig, module: torch.nn.Module) -> Any:
    import torch_pruning as tp
    from torch import nn

    if config.importance == "taylor":
        return tp.importance.TaylorImportance()
    if config.importance == "bn-scale":
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
            raise PruneError("--prune-importance bn-scale needs BatchNorm layers and the model has "
                             "none; use magnitude or taylor")
        return tp.importance.BNScaleImportance()
    return tp.importance.MagnitudeImportance(p=2)


def _accumulate_gradients(module: torch.nn.Module, batches: Iterable[tuple], loss_fn: Callable) -> None:
    """Taylor importance reads weight x gradient: one backward pass per calibration batch."""
    module.zero_grad()
    for inputs in batches:
        loss_fn(module(*inputs)).backward()


@contextlib.contextmanager
def _torch_pruning_quiet():
    """torch-pruning warns about layers we report ourselves; keep its warnings out of the console."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def prune_channels(module: torch.nn.Module, example: tuple, config: PruneConfig, protected: list[Any],
                   grad_batches: Iterable[tuple] | None, loss_fn: Callable | None) -> dict[str, Any]:
    import torch_pruning as tp

    frozen = _named(module, config.ignore)
    with _torch_pruning_quiet() as caught:
        graph = tp.DependencyGraph().build_dependency(module, example_inputs=example)
        custom = {name: _owner(module, name) for name in
                  (graph._param_to_name[u.parameters] for u in graph.unwrapped_parameters)}
        ignored = protected + frozen + _groups_touching(graph, frozen)
        importance = _importance(config, module)
        if config.importance == "taylor":
            _accumulate_gradients(module, grad_batches or [example], loss_fn)
        pruner = tp.pruner.MetaPruner(
            module, example, importance=importance, pruning_ratio=config.ratio,
            global_pruning=config.scope == "global", max_pruning_ratio=0.9, round_to=config.round_to,
            ignored_layers=ignored)
        try:
            pruner.step()
        except Exception as exc:
            raise _custom_layer_error(custom, exc) from exc
    module.zero_grad(set_to_none=True)
    return {"custom_parameters": sorted(custom), "library_warnings": len(caught),
            "_custom": custom}


def _owner(module: torch.nn.Module, param_name: str) -> str:
    return param_name.rpartition(".")[0]


def _custom_layer_error(custom: dict[str, str], exc: BaseException) -> PruneError:
    if custom:
        modules = sorted(set(custom.values()))
        params = ", ".join(f"'{p}'" for p in sorted(custom))
        return PruneError(
            f"torch-pruning could not follow the channels through module(s) {', '.join(repr(m) for m in modules)}, "
            f"which hold parameters {params} directly instead of in standard layers ({exc}); "
            f"keep them whole with --prune-ignore {' --prune-ignore '.join(modules)}")
    return PruneError(f"torch-pruning could not prune this model: {exc}")


def prune_heads(module: torch.nn.Module, example: tuple, config: PruneConfig,
                grad_batches: Iterable[tuple] | None, loss_fn: Callable | None) -> dict[str, Any]:
    """Remove whole heads: q/k/v output rows and the output projection's input columns together."""
    import torch
    import torch_pruning as tp

    blocks = [b for b in find_attention(module) if b.name not in config.ignore]
    _named(module, config.ignore)
    if not blocks:
        raise PruneError("no attention blocks with separate query/key/value linear layers were found; "
                         "use --prune-granularity channels")
    with _torch_pruning_quiet():
        graph = tp.DependencyGraph().build_dependency(module, example_inputs=example)
        importance = _importance(config, module)
        if config.importance == "taylor":
            _accumulate_gradients(module, grad_batches or [example], loss_fn)
        groups, scores = [], []
        for block in blocks:
            query = block.qkv[0]
            group = graph.get_pruning_group(query, tp.prune_linear_out_channels, list(range(query.out_features)))
            groups.append(group)
            with torch.no_grad():
                scores.append(importance(group).view(block.heads, -1).mean(1).cpu())
    removed = _heads_to_remove(scores, config)
    before = {b.name: b.heads for b in blocks}
    for block, group, heads in zip(blocks, groups, removed):
        if not heads:
            continue
        size = block.head_size
        indices = [h * size + i for h in heads for i in range(size)]
        with _torch_pruning_quiet():
            graph.get_pruning_group(block.qkv[0], tp.prune_linear_out_channels, indices).prune()
        setattr(block.module, block.heads_attr, before[block.name] - len(heads))
        if hasattr(block.module, "all_head_size"):
            block.module.all_head_size = block.qkv[0].out_features
    module.zero_grad(set_to_none=True)
    return {"heads": {b.name: {"before": before[b.name], "after": b.heads, "removed": sorted(h)}
                      for b, h in zip(blocks, removed)}}


def _heads_to_remove(scores: list[Any], config: PruneConfig) -> list[list[int]]:
    """Per block, the heads with the lowest importance; every block keeps at least one head."""
    if config.scope == "uniform":
        return [sorted(s.argsort()[:min(len(s) - 1, round(config.ratio * len(s)))].tolist()) for s in scores]
    ranked = sorted((float(v), b, h) for b, s in enumerate(scores) for h, v in enumerate(s))
    budget = round(config.ratio * len(ranked))
    removed: list[list[int]] = [[] for _ in scores]
    for _, block, head in ranked:
        if budget == 0:
            break
        if len(removed[block]) < len(scores[block]) - 1:
            removed[block].append(head)
            budget -= 1
    return [sorted(r) for r in removed]


def count(module: torch.nn.Module, example: tuple) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """Total MACs and parameters, and per layer (by name) ``(macs, params)``."""
    import torch
    import torch_pruning as tp

    with torch.no_grad(), _torch_pruning_quiet():
        macs, params, layer_macs, layer_params = tp.utils.count_ops_and_params(module, example, layer_wise=True)
    names = {m: n for n, m in module.named_modules()}
    per_layer = {names[m]: (int(layer_macs.get(m) or 0), int(layer_params.get(m) or 0))
                 for m in layer_macs if m in names and _is_leaf_with_params(m)}
    return int(macs), int(params), per_layer


def _is_leaf_with_params(module: torch.nn.Module) -> bool:
    return not list(module.children()) and any(True for _ in module.parameters(recurse=False))


def prune_module(original: torch.nn.Module, example: tuple, config: PruneConfig,
                 grad_batches: Iterable[tuple] | None = None, loss_fn: Callable | None = None) -> PruneOutcome:
    """A pruned copy of ``original`` and a report: MACs and parameters before and after, per layer."""
    import torch

    config.check()
    module = fresh_copy(original)
    with torch.no_grad():
        want = _output_shapes(module(*example))
    macs_before, params_before, layers_before = count(module, example)
    attention = find_attention(module)
    fused = [n for n in fused_attention(module) if n not in config.ignore]
    granularity = config.granularity
    if granularity == "heads" and fused and not attention:
        raise PruneError(f"{len(fused)} nn.MultiheadAttention module(s) ({', '.join(fused[:4])}"
                         f"{', ...' if len(fused) > 4 else ''}) cannot lose heads: their fused projection ties "
                         f"the heads to the embedding width; --prune-granularity auto (or channels) prunes the "
                         f"other layers' channels and keeps them whole")
    if granularity == "auto":
        granularity = "heads" if attention else "channels"
    notes = []
    if granularity == "channels" and fused:
        config = dataclasses.replace(config, ignore=(*config.ignore, *fused))
        notes.append(f"kept {len(fused)} nn.MultiheadAttention module(s) whole (their heads are tied to the "
                     f"embedding width) and pruned the channels of the other layers, such as the MLPs")
    if granularity == "channels" and attention:
        raise PruneError(f"channel pruning of attention models is not supported (attention in "
                         f"'{attention[0].name}'); use --prune-granularity heads")
    if config.importance == "taylor" and loss_fn is None:
        raise PruneError("--prune-importance taylor needs a loss: a classification model or --train-data "
                         "with labels; use magnitude otherwise")
    if granularity == "heads":
        details = prune_heads(module, example, config, grad_batches, loss_fn)
        protected_names: list[str] = []
    else:
        protected = _output_layers(module, example)
        details = prune_channels(module, example, config, protected, grad_batches, loss_fn)
        names = {m: n for n, m in module.named_modules()}
        protected_names = [names[m] for m in protected]
    custom = details.pop("_custom", {})
    try:
        with torch.no_grad():
            got = _output_shapes(module.eval()(*example))
    except Exception as exc:
        raise _custom_layer_error(custom, exc) from exc
    if got != want:
        raise PruneError(f"pruning changed the output shapes from {want} to {got}; keep the output "
                         f"layers whole with --prune-ignore NAME")
    macs_after, params_after, layers_after = count(module, example)
    layers = [{"name": name, "macs_before": layers_before[name][0], "macs_after": layers_after.get(name, (0, 0))[0],
               "params_before": layers_before[name][1], "params_after": layers_after.get(name, (0, 0))[1]}
              for name in layers_before]
    if granularity == "heads":  # the layers around the heads keep their width: name them
        whole = [entry["name"] for entry in layers if entry["params_before"] and
                 entry["params_after"] == entry["params_before"]]
        if whole:
            protected_names = whole
            notes.append(f"head pruning leaves the other layers at their width: {len(whole)} kept whole "
                         f"({', '.join(whole[:4])}{', ...' if len(whole) > 4 else ''})")
    report = {"config": config.to_json(), "granularity": granularity,
              "kept_whole": protected_names + list(config.ignore),
              "macs_before": macs_before, "macs_after": macs_after,
              "params_before": params_before, "params_after": params_after,
              "macs_ratio": round(macs_before / max(macs_after, 1), 3),
              "params_ratio": round(params_before / max(params_after, 1), 3),
              "layers": layers, "notes": notes, **details}
    return PruneOutcome(module, report)


def _output_shapes(outputs: Any) -> list[tuple[int, ...]]:
    import torch

    if isinstance(outputs, torch.Tensor):
        return [tuple(outputs.shape)]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    return [tuple(o.shape) for o in outputs if isinstance(o, torch.Tensor)]


def heads_summary(report: dict[str, Any]) -> str:
    heads = report.get("heads") or {}
    if not heads:
        return ""
    before = sum(h["before"] for h in heads.values())
    after = sum(h["after"] for h in heads.values())
    return f"{before} -> {after} attention heads"


def ratio_text(report: dict[str, Any]) -> str:
    macs = f"MACs {report['macs_before'] / 1e6:.1f}M -> {report['macs_after'] / 1e6:.1f}M ({report['macs_ratio']}x)"
    params = f"params {report['params_before'] / 1e6:.2f}M -> {report['params_after'] / 1e6:.2f}M"
    heads = heads_summary(report)
    return ", ".join(x for x in (macs, params, heads) if x)
