"""A pruned model as a weights-only checkpoint, and back.

Pruning changes layer widths, not classes: the checkpoint holds the pruned ``state_dict`` and, per
module, the width attributes that changed. Rebuilding takes a fresh instance of the original
architecture, shrinks those attributes and tensors, and loads the weights: no pickle, no code.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimize.errors import PruneError

if TYPE_CHECKING:
    import torch

# Integer attributes that describe a layer's width; rewritten when the layer shrinks.
WIDTH_ATTRS = ("in_channels", "out_channels", "in_features", "out_features", "num_features",
               "normalized_shape", "embedding_dim", "num_attention_heads", "num_heads", "n_heads",
               "all_head_size", "groups")


def fresh_copy(module: torch.nn.Module) -> Any:
    """A deep copy in eval mode (torch warns about its own pytree internals while copying)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(module).eval()


def architecture_changes(original: torch.nn.Module, pruned: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Per module, the width attributes that pruning changed: enough to rebuild from the class."""
    before = dict(original.named_modules())
    changes: dict[str, dict[str, Any]] = {}
    for name, module in pruned.named_modules():
        for attr in WIDTH_ATTRS:
            if hasattr(module, attr) and getattr(module, attr) != getattr(before[name], attr, None):
                value = getattr(module, attr)
                changes.setdefault(name, {})[attr] = list(value) if isinstance(value, tuple) else value
    return changes


def save_pruned(original: torch.nn.Module, pruned: torch.nn.Module, path: Path) -> None:
    """A weights-only checkpoint: the pruned state_dict and the changed layer attributes."""
    import torch

    torch.save({"state_dict": pruned.state_dict(),
                "pruned_architecture": architecture_changes(original, pruned)}, path)


def rebuild_pruned(module: torch.nn.Module, state_dict: dict[str, Any], changes: dict[str, dict[str, Any]]) -> Any:
    """Shrink a freshly built ``module`` to the pruned shapes, then load the pruned weights."""
    import torch

    modules = dict(module.named_modules())
    for name, attrs in changes.items():
        if name not in modules:
            raise PruneError(f"the pruned checkpoint names module '{name}', which the architecture lacks")
        for attr, value in attrs.items():
            setattr(modules[name], attr, tuple(value) if isinstance(value, list) else value)
    for key, tensor in state_dict.items():
        owner, _, leaf = key.rpartition(".")
        target = modules.get(owner)
        current = getattr(target, leaf, None) if target is not None else None
        if isinstance(current, torch.Tensor) and current.shape != tensor.shape:
            replacement = torch.empty_like(tensor)
            if isinstance(current, torch.nn.Parameter):
                replacement = torch.nn.Parameter(replacement, requires_grad=current.requires_grad)
                setattr(target, leaf, replacement)
            else:
                target._buffers[leaf] = replacement
    module.load_state_dict(state_dict)
    return module.eval()
