"""Feeding a model by name: a module whose ``forward`` takes exactly the inputs the data provides.

Every stage calls a model positionally, in the order of its input specs. When the data provides
some of ``forward``'s arguments and leaves optional ones out (``token_type_ids``, say, before a
later argument), calling positionally would hand an array to the wrong argument; ``bound`` wraps
the module so that its ``forward`` takes the provided inputs, in order, and passes them on by
keyword, so the others stay at their defaults. ``forward_with`` writes such a signature: the
exporters and ``inspect`` read a real one, with the real names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch


def forward_with(names: list[str], required: int, call: str) -> Callable[..., Any]:
    """A ``forward(self, <names>)`` whose first ``required`` arguments have no default (the rest
    default to None) and which returns ``self.<call>({name: value, ...})``."""
    if not all(n.isidentifier() for n in names):
        raise ValueError(f"input names {names} are not Python identifiers")
    params = ", ".join(n if i < required else f"{n}=None" for i, n in enumerate(names))
    feeds = ", ".join(f"{n!r}: {n}" for n in names)
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {params}):\n    return self.{call}({{{feeds}}})\n", namespace)  # noqa: S102
    return namespace["forward"]


def bound(module: torch.nn.Module, signature: list[str], feeds: list[str]) -> torch.nn.Module:
    """``module`` itself where ``feeds`` are the first arguments of its ``signature``; else a wrapper
    whose forward takes ``feeds`` and passes them by keyword."""
    if list(feeds) == list(signature[:len(feeds)]):
        return module
    import torch

    class BoundInputs(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.module = inner

        def call(self, values: dict[str, Any]) -> Any:
            return self.module(**{k: v for k, v in values.items() if v is not None})

        forward = forward_with(list(feeds), len(feeds), "call")

    wrapper = BoundInputs(module)
    return wrapper.eval() if not module.training else wrapper
