"""Loading a checkpoint safely.

Accepted: TorchScript archives, ``torch.export`` programs (``.pt2``), a state_dict with an
architecture given as ``module:factory`` or ``path/to/file.py:factory``, Lightning-style dicts
holding a ``state_dict``, pruned checkpoints (a state_dict plus the changed layer widths, rebuilt
from the original ``--arch``), and a fully pickled module, which loads only with ``trust=True``
because unpickling can run arbitrary code. Everything else is read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimize.errors import CheckpointError
from optimize.inputs.factory import resolve_factory
from optimize.quiet import quieted

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass
class LoadedModel:
    """A model ready for export: the module, how it was stored, and where it came from."""

    module: torch.nn.Module  # torch.nn.Module or torch.jit.ScriptModule
    format: str  # torchscript | exported-program | state-dict | pruned-state-dict | lightning | pickled-module | hf-folder
    sha256: str
    path: Path
    input_names: list[str]
    program: Any = None  # the ExportedProgram for .pt2 checkpoints
    folder: dict[str, Any] | None = None  # a Hugging Face model folder: its class, weights, labels, pooling

    def bind(self, feeds: list[str]) -> None:
        """Feed the model ``feeds`` (the inputs the data provides, in order); the arguments of
        ``forward`` left out stay at their defaults."""
        if list(feeds) == self.input_names:
            return
        if hasattr(self.module, "bind") and self.folder is not None:
            self.module = self.module.bind(feeds)
        else:
            from optimize.inputs.binding import bound

            self.module = bound(self.module, self.input_names, feeds)
        self.input_names = list(feeds)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def forward_input_names(module: torch.nn.Module) -> list[str]:
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
    """Load ``path`` into an eval-mode module, refusing pickled code unless ``trust``: one loader
    per format, chosen by what the file is (a torch.export or TorchScript archive, else torch.save)."""
    from optimize.inputs import hf_folder

    text, path = str(path), Path(path)
    if not path.exists():
        if hf_folder.looks_like_hub_id(text):
            raise hf_folder.hub_id_error(text)
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if hf_folder.is_model_folder(path) or (path / "modules.json").is_file():
            return _load_model_folder(path, trust)
        raise CheckpointError(f"checkpoint {path} is a directory without config.json; give the checkpoint file, "
                              f"or a Hugging Face model folder (save_pretrained)")
    sha = file_sha256(path)
    archive = _archive_kind(path)
    if archive == "exported-program":
        return _load_exported_program(path, sha)
    if archive == "torchscript":
        return _load_torchscript(path, sha)
    return _load_saved_object(path, sha, arch, arch_kwargs, trust)


def _load_model_folder(path: Path, trust: bool) -> LoadedModel:
    from optimize.inputs import hf_folder

    module, names, info = hf_folder.load_model_folder(path, trust)
    return LoadedModel(module, "hf-folder", hf_folder.folder_sha256(path), path, names, folder=info)


def _load_exported_program(path: Path, sha: str) -> LoadedModel:
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch's own reader refused the file (--debug shows why)
        raise CheckpointError(f"checkpoint {path}: not a readable torch.export program ({exc})") from exc
    names = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    return LoadedModel(program.module(), "exported-program", sha, path, names, program)


def _load_torchscript(path: Path, sha: str) -> LoadedModel:
    import torch

    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch's own reader refused the file (--debug shows why)
        raise CheckpointError(f"checkpoint {path}: not a readable TorchScript archive ({exc})") from exc
    module.eval()
    return LoadedModel(module, "torchscript", sha, path, [a.name for a in module.forward.schema.arguments][1:])


def _load_saved_object(path: Path, sha: str, arch: str | None, arch_kwargs: dict[str, Any] | None,
                       trust: bool) -> LoadedModel:
    """A ``torch.save`` file: a pickled module (trusted only), or a state_dict in one of its wrappings."""
    import torch

    _check_format(path)
    if _is_safetensors(path):
        return _load_state_dict(_load_safetensors(path), path, sha, arch, arch_kwargs)
    with _arch_importable(arch if trust else None):
        obj = _torch_load(path, trust)
    if isinstance(obj, torch.nn.Module):
        obj.eval()  # --arch, if given, only made the pickled classes importable
        return LoadedModel(obj, "pickled-module", sha, path, forward_input_names(obj))
    if isinstance(obj, dict):
        return _load_state_dict(obj, path, sha, arch, arch_kwargs)
    raise CheckpointError(
        f"checkpoint {path} holds a {type(obj).__name__}; expected a state_dict, a Lightning "
        f"checkpoint, a TorchScript archive or a torch.export program")


def _unwrap_state(obj: dict, path: Path) -> tuple[str, dict, dict | None]:
    """(format, the tensors, the pruned layer widths or None) of a plain, Lightning or pruned state_dict."""
    import torch

    fmt, state = "state-dict", obj
    pruned = obj.get("pruned_architecture") if isinstance(obj.get("pruned_architecture"), dict) else None
    if pruned is not None and isinstance(obj.get("state_dict"), dict):
        fmt, state = "pruned-state-dict", obj["state_dict"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        fmt, state, pruned = "lightning", obj["state_dict"], None
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)][:5]
        raise CheckpointError(
            f"checkpoint {path} is a dict but not a state_dict: entries {bad} are not tensors; "
            f"save model.state_dict() or a dict with a 'state_dict' entry")
    return fmt, state, pruned


def _load_state_dict(obj: dict, path: Path, sha: str, arch: str | None,
                     arch_kwargs: dict[str, Any] | None) -> LoadedModel:
    import torch

    fmt, state, pruned = _unwrap_state(obj, path)
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
        from optimize.inputs.pruned_checkpoint import rebuild_pruned

        try:
            rebuild_pruned(module, state, pruned)
        except (PruneError, RuntimeError) as exc:
            raise CheckpointError(f"pruned checkpoint {path} does not fit --arch {arch}: "
                                  f"{_first_line(exc)}") from exc
    else:
        _load_state(module, state, path, arch)
    module.eval()
    return LoadedModel(module, fmt, sha, path, forward_input_names(module))


def _torch_load(path: Path, trust: bool) -> Any:
    import torch

    try:
        # torch's safe unpickler warns about any pickle protocol but its own before it refuses or
        # loads the file; what it decides is what the user is told.
        with quieted(warning_messages=((UserWarning, r"Detected pickle protocol"),)):
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
    except ModuleNotFoundError as exc:
        raise CheckpointError(
            f"checkpoint {path} pickles classes from module '{exc.name}', which cannot be imported here: pass "
            f"--arch path/to/{exc.name.split('.')[0]}.py:ClassName (its folder is then importable), or put the "
            f"folder holding {exc.name.split('.')[0]}.py on PYTHONPATH") from exc
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: trusted load failed ({_first_line(exc)})") from exc


PICKLE_PROTOCOL_2_AND_UP = 0x80  # torch.save writes protocol 2 or later: PROTO opcode first


def _check_format(path: Path) -> None:
    """A file that is neither a zip archive, a pickle nor safetensors is not a checkpoint at all: say so
    (and not that it holds untrusted code)."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty")
    if head.startswith(b"PK") or head[0] == PICKLE_PROTOCOL_2_AND_UP:
        return
    if _is_safetensors(path):
        return
    printable = head[:24].decode("utf-8", errors="replace")
    text = all(c.isprintable() or c.isspace() for c in printable)
    what = "is not a PyTorch file" if text else "is corrupt or not a PyTorch file"
    raise CheckpointError(f"checkpoint {path} {what}: it starts with {printable!r} ({'text' if text else 'binary'}); "
                          f"give a torch.save file, a TorchScript archive, a torch.export .pt2 or a .safetensors file")


def _is_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then that much JSON."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _load_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise CheckpointError(f"checkpoint {path} is a safetensors file: pip install safetensors") from exc
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # the library's own errors for a damaged file
        raise CheckpointError(f"checkpoint {path} is a damaged safetensors file ({_first_line(exc)})") from exc


@contextlib.contextmanager
def _arch_importable(arch: str | None):
    """While a trusted pickle loads: the ``--arch`` file's folder on ``sys.path`` and the file importable
    under its own name, so the classes it pickled (``mynet.MyNet``) resolve without PYTHONPATH."""
    if not arch or ":" not in arch or not arch.rpartition(":")[0].endswith(".py"):
        yield
        return
    file = Path(arch.rpartition(":")[0]).resolve()
    folder = str(file.parent)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _unsafe_global(exc: BaseException) -> str:
    """What the refused pickle holds, in our words: torch's own text is long and quoting part of it
    cuts names in half."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it pickles {found.group(1)}, a Python class or function"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            detail = lines[i + 1].rstrip(".")
            return detail if len(detail) <= 120 else detail[:120].rsplit(" ", 1)[0] + " ..."
    return "non-tensor objects"


def _load_state(module: torch.nn.Module, state: dict, path: Path, arch: str) -> None:
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
