"""Loading a checkpoint safely.

Accepted: TorchScript archives, ``torch.export`` programs (``.pt2``), a state_dict with an
architecture given as ``module:factory`` or ``path/to/file.py:factory``, Lightning-style dicts
holding a ``state_dict``, pruned checkpoints (a state_dict plus the changed layer widths, rebuilt
from the original ``--arch``), and a fully pickled module, which loads only with ``trust=True``
because unpickling can run arbitrary code. Everything else is read with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

from optimize.errors import CheckpointError


@dataclasses.dataclass
class LoadedModel:
    """A model ready for export: the module, how it was stored, and where it came from."""

    module: Any  # torch.nn.Module or torch.jit.ScriptModule
    kind: str  # torchscript | exported-program | state-dict | pruned-state-dict | lightning | pickled-module
    sha256: str
    path: Path
    input_names: list[str]
    program: Any = None  # the ExportedProgram for .pt2 checkpoints


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_factory(arch: str):
    """Return the callable named by ``module:factory`` or ``path/to/file.py:factory``."""
    if ":" not in arch:
        raise CheckpointError(
            f"--arch {arch!r} must be module:factory or path/to/file.py:factory, "
            f"e.g. models.digits:DigitsNet")
    where, _, name = arch.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise CheckpointError(f"--arch {arch!r}: file {where} does not exist")
        spec = importlib.util.spec_from_file_location(f"_arch_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's file failed to import: say where
            raise CheckpointError(f"--arch {arch!r}: importing {where} failed: {exc}") from exc
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise CheckpointError(
                f"--arch {arch!r}: cannot import module {where!r} ({exc}); give a dotted module "
                f"on the Python path or a file path ending in .py") from exc
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise CheckpointError(f"--arch {arch!r}: {where} has no callable named {name!r}")
    return factory


def parse_arch_args(values: tuple[str, ...]) -> dict[str, Any]:
    """``--arch-arg key=value`` pairs; values are JSON where they parse, else strings."""
    kwargs: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise CheckpointError(f"--arch-arg {item!r} must be key=value, e.g. width=64")
        try:
            kwargs[key] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key] = raw
    return kwargs


def forward_input_names(module: Any) -> list[str]:
    """Names of the positional arguments of ``module.forward`` (the model's inputs)."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    return [p.name for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _archive_kind(path: Path) -> str | None:
    if not zipfile.is_zipfile(path):
        return None
    try:
        names = zipfile.ZipFile(path).namelist()
    except zipfile.BadZipFile:
        return None
    if any(n.endswith("/archive_format") or "/models/" in n for n in names):
        return "exported-program"
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    return "torch-save"


def load_checkpoint(path: str | Path, arch: str | None = None,
                    arch_kwargs: dict[str, Any] | None = None,
                    trust: bool = False) -> LoadedModel:
    """Load ``path`` into an eval-mode module, refusing pickled code unless ``trust``."""
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the checkpoint file")
    sha = file_sha256(path)
    kind = _archive_kind(path)

    if kind == "exported-program":
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path}: not a readable torch.export program ({exc})") from exc
        module = program.module()
        names = [s.arg.name for s in program.graph_signature.input_specs
                 if s.kind.name == "USER_INPUT"]
        return LoadedModel(module, kind, sha, path, names, program)

    if kind == "torchscript":
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path}: not a readable TorchScript archive ({exc})") from exc
        module.eval()
        names = [a.name for a in module.forward.schema.arguments][1:]
        return LoadedModel(module, kind, sha, path, names)

    obj = _torch_load(path, trust)
    if isinstance(obj, torch.nn.Module):
        if arch:
            raise CheckpointError(
                f"checkpoint {path} holds a whole module; drop --arch (it is for state_dicts)")
        obj.eval()
        return LoadedModel(obj, "pickled-module", sha, path, forward_input_names(obj))

    if isinstance(obj, dict):
        kind_name = "state-dict"
        state = obj
        pruned = obj.get("pruned_architecture") if isinstance(obj.get("pruned_architecture"), dict) else None
        if pruned is not None and isinstance(obj.get("state_dict"), dict):
            kind_name, state = "pruned-state-dict", obj["state_dict"]
        elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
            kind_name, state = "lightning", obj["state_dict"]
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)][:5]
            raise CheckpointError(
                f"checkpoint {path} is a dict but not a state_dict: entries {bad} are not tensors; "
                f"save model.state_dict() or a dict with a 'state_dict' entry")
        if not arch:
            raise CheckpointError(
                f"checkpoint {path} is a state_dict: weights without an architecture; pass "
                f"--arch module:factory (e.g. --arch models.digits:DigitsNet)")
        factory = resolve_factory(arch)
        try:
            module = factory(**(arch_kwargs or {}))
        except TypeError as exc:
            raise CheckpointError(f"--arch {arch}: calling the factory failed: {exc}") from exc
        if not isinstance(module, torch.nn.Module):
            raise CheckpointError(f"--arch {arch} returned {type(module).__name__}, not a torch.nn.Module")
        if pruned is not None:
            from optimize.errors import PruneError
            from optimize.passes.prune import rebuild_pruned

            try:
                rebuild_pruned(module, state, pruned)
            except (PruneError, RuntimeError) as exc:
                raise CheckpointError(f"pruned checkpoint {path} does not fit --arch {arch}: "
                                      f"{_first_line(exc)}") from exc
        else:
            _load_state(module, state, path, arch)
        module.eval()
        return LoadedModel(module, kind_name, sha, path, forward_input_names(module))

    raise CheckpointError(
        f"checkpoint {path} holds a {type(obj).__name__}; expected a state_dict, a Lightning "
        f"checkpoint, a TorchScript archive or a torch.export program")


def _torch_load(path: Path, trust: bool) -> Any:
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc) and "weights_only" not in str(exc):
            raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file ({_first_line(exc)})") from exc
        if not trust:
            raise CheckpointError(
                f"checkpoint {path} contains pickled Python objects that run code when loaded "
                f"({_unsafe_global(exc)}); refusing to load it. Save a state_dict instead, or pass "
                f"--trust-checkpoint if you trust where this file came from") from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file ({_first_line(exc)})") from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: trusted load failed ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _unsafe_global(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "Unsupported global" in line:
            return line.rstrip(".")[:160]
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1].rstrip(".")[:160]
    return "non-tensor objects"


def _load_state(module: Any, state: dict, path: Path, arch: str) -> None:
    expected = module.state_dict()
    state = _strip_common_prefix(state, expected)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {_clip(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_clip(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches {_clip(mismatched)}")
        raise CheckpointError(
            f"checkpoint {path} does not fit --arch {arch}: {'; '.join(parts)}. Check the "
            f"architecture and its --arch-arg values")
    module.load_state_dict(state, strict=True)


def _strip_common_prefix(state: dict, expected: dict) -> dict:
    """Lightning stores ``model.layer.weight`` for ``layer.weight``: strip such a prefix."""
    if set(state) == set(expected) or not state:
        return state
    first = next(iter(state))
    if "." not in first:
        return state
    prefix = first.split(".", 1)[0] + "."
    if all(k.startswith(prefix) for k in state):
        stripped = {k[len(prefix):]: v for k, v in state.items()}
        if set(stripped) & set(expected):
            return stripped
    return state


def _clip(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"
