"""Triton Inference Server model configuration: one generator for ``/v2/models/{m}/config`` and
``optimize export triton``, and the model repository writer.

A repository holds ``<model>/config.pbtxt`` (protobuf text of Triton's ``ModelConfig``) and the
engine under a version folder ``<model>/<version>/``, the version `optimize serve` answers as
(``version_number``: the build's UTC time and the target's place). How Triton runs each backend's engine (platform,
backend, files, instance kind) is the backend's own ``TritonEntry``: ONNX Runtime and OpenVINO
engines on the CPU, TensorRT plans on the GPU and TensorRT version they were built with.

``max_batch_size`` > 0 makes the first axis Triton's batch axis, so dims leave it out; dynamic
batching and instance groups mirror the server's own batching settings.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from optimize import atomic
from optimize.bundle.folder import choose_target, read_manifest, version_number
from optimize.errors import BundleError, InputSpecError
from optimize.bundle.manifest import Manifest
from optimize.inputs.specs import oip_datatype
from optimize.targets import registry
from optimize.targets.base import TritonEntry

_ENUM = re.compile(r"^(TYPE|KIND)_[A-Z0-9_]+$")


def backend_for(target: str, strict: bool = True) -> TritonEntry:
    """How Triton runs ``target``; ``strict=False`` describes a target Triton has no backend for
    (``torch-compile``) by its own name instead of failing."""
    entry = registry.facts(target).triton if target in registry.TARGETS or strict else None
    if entry is None and not strict:
        return TritonEntry(backend=target, files=(), default_model_filename="")
    if entry is None:
        exportable = [n for n in registry.TARGETS if registry.facts(n).triton is not None]
        raise InputSpecError(f"Triton has no backend for target {target!r}; export one of {', '.join(exportable)} "
                             f"(--target)")
    return entry


def triton_type(datatype: str) -> str:
    """Open Inference Protocol datatype -> Triton ``DataType`` enum name."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def model_config(name: str, target: str, max_batch: int, inputs: list[dict[str, Any]],
                 outputs: list[dict[str, Any]], max_delay_s: float = 0.0, queue_capacity: int = 64,
                 instances: int = 1, strict: bool = True, parameters: dict[str, str] | None = None) -> dict[str, Any]:
    """Triton's ``ModelConfig`` as a dict (JSON field names). ``inputs``/``outputs``: name, datatype
    (Open Inference Protocol), shape with the batch axis first."""
    info = backend_for(target, strict)

    def tensors(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"name": t["name"], "data_type": triton_type(t["datatype"]),
                 "dims": [int(d) for d in (t["shape"][1:] if max_batch > 0 else t["shape"])],
                 **({"label_filename": t["label_filename"]} if t.get("label_filename") else {})} for t in items]

    config: dict[str, Any] = {"name": name}
    if info.platform:
        config["platform"] = info.platform
    config["backend"] = info.backend
    if info.default_model_filename:
        config["default_model_filename"] = info.default_model_filename
    config.update(max_batch_size=max_batch, input=tensors(inputs), output=tensors(outputs),
                  dynamic_batching={"max_queue_delay_microseconds": int(round(max_delay_s * 1e6)),
                                    "default_queue_policy": {"max_queue_size": queue_capacity}},
                  instance_group=[{"count": instances, "kind": info.kind}])
    if parameters:  # the backend's own keys, e.g. OpenVINO's HINT_BF16 for a bf16 engine
        config["parameters"] = {k: {"string_value": v} for k, v in parameters.items()}
    return config


def to_pbtxt(config: dict[str, Any]) -> str:
    """Protobuf text format of a ``ModelConfig`` dict (enum names unquoted)."""
    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, str) and _ENUM.match(value):
            return value
        return json.dumps(str(value))

    def render(message: dict[str, Any], depth: int) -> list[str]:
        pad, lines = "  " * depth, []
        for key, value in message.items():
            if key == "parameters" and isinstance(value, dict):  # a map field: one entry per key
                for name, parameter in value.items():
                    lines += [f"{pad}parameters {{", f"{pad}  key: {json.dumps(name)}", f"{pad}  value {{",
                              *render(parameter, depth + 2), f"{pad}  }}", f"{pad}}}"]
            elif isinstance(value, dict):
                lines += [f"{pad}{key} {{", *render(value, depth + 1), f"{pad}}}"]
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                lines.append(f"{pad}{key} [")
                for i, item in enumerate(value):
                    lines += [f"{pad}  {{", *render(item, depth + 2), f"{pad}  }}" + ("," if i < len(value) - 1 else "")]
                lines.append(f"{pad}]")
            elif isinstance(value, list):
                lines.append(f"{pad}{key}: [ {', '.join(scalar(v) for v in value)} ]")
            else:
                lines.append(f"{pad}{key}: {scalar(value)}")
        return lines

    return "\n".join(render(config, 0)) + "\n"


def engine_tensors(manifest: Manifest) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The engine's own inputs and outputs (token ids for a text model: Triton does not tokenize)."""
    return ([{"name": s.name, "datatype": oip_datatype(s.dtype), "shape": list(s.shape)} for s in manifest.inputs],
            [{"name": o["name"], "datatype": oip_datatype(o["dtype"]), "shape": list(o["shape"]),
              **({"label_filename": Path(o["labels"]).name} if o.get("labels") else {})}
             for o in manifest.outputs])


def export_repository(bundle: Path, repo: Path, target: str | None = None, max_batch: int = 8,
                      instances: int = 1, max_delay_s: float = 0.0, queue_capacity: int = 64,
                      name: str | None = None, threads: int = 0) -> dict[str, Any]:
    """Write ``repo/<model>/`` (config.pbtxt, <version>/<engine files>) for one built target of ``bundle``;
    ``threads`` > 0 sets the backend's threads-per-instance parameter."""
    bundle, repo = Path(bundle), Path(repo)
    manifest = read_manifest(bundle)
    target = choose_target(manifest, target, bundle)
    info = backend_for(target)
    entry = manifest.record(target, bundle)
    folder = bundle / entry.folder
    missing = [f for f in info.files if not (folder / f).is_file()]
    if missing:
        raise BundleError(f"{folder} lacks {', '.join(missing)}: target {target} is not a complete engine")
    model = name or manifest.model_name
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", model):
        raise InputSpecError(f"model name {model!r} is not usable as a Triton model folder; pass --name")
    profile = (entry.details or {}).get("profile") or {}  # a fixed batch profile (TensorRT): its batch range
    if profile:
        max_batch = min(max_batch, min(int(shapes[2][0]) for shapes in profile.values()))
    inputs, outputs = engine_tensors(manifest)
    parameters = dict(registry.facts(target).triton_parameters(folder) or {})
    if threads and info.threads_parameter:
        parameters[info.threads_parameter] = str(threads)
    config = model_config(model, target, max_batch, inputs, outputs, max_delay_s, queue_capacity, instances,
                          parameters=parameters or None)
    notes = [f"{target}: {note}" for note in registry.facts(target).triton_notes(folder)]
    repo.mkdir(parents=True, exist_ok=True)
    version = version_number(manifest, target)  # the number `optimize serve` answers as
    with atomic.StagedFolder(repo / model) as stage:
        (stage / version).mkdir()
        for file in info.files:
            shutil.copyfile(folder / file, stage / version / file)
        (stage / "config.pbtxt").write_text(to_pbtxt(config))
        for output in manifest.outputs:  # Triton's classification extension names classes from these
            if output.get("labels"):
                shutil.copyfile(bundle / output["labels"], stage / Path(output["labels"]).name)
    return {"model": model, "target": target, "path": str(repo / model), "version": version, "config": config,
            "notes": notes}
