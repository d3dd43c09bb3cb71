"""A Hugging Face model folder as a checkpoint: what ``save_pretrained`` writes.

``config.json`` names the class (``architectures[0]``; without it, the auto class for what the
config describes: a classifier where it names its labels, else the bare encoder); the weights are
``model.safetensors`` (sharded too: ``model.safetensors.index.json``), read with no pickle, or
``pytorch_model.bin``, which transformers reads with ``weights_only``. A folder that asks for its own
Python code (``auto_map``) is refused as an untrusted pickle is, unless ``--trust-checkpoint``.
Nothing is downloaded: a Hub model id is answered with how to save the model locally.

A sentence-transformers folder (``modules.json``) gets its pooling and normalisation, so the
engine gives what ``SentenceTransformer.encode`` gives. The model is fed by name: the engine's
inputs are the ``forward`` arguments the data provides (``pixel_values``; ``input_ids``,
``attention_mask``, ...), the others stay at their defaults, and its outputs are the ModelOutput's
fields (``logits``, ``last_hidden_state``, ``pooler_output``).

Also read from the folder, for the build to use: the label names (``id2label``), the image
preprocessing (``preprocessor_config.json``) and the tokenizer (``tokenizer.json``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimize.errors import CheckpointError
from optimize.inputs.binding import forward_with
from optimize.quiet import quieted

if TYPE_CHECKING:
    import torch

    from optimize.inputs.calibration import ImageOptions

EXTRA = "pip install 'optimize[hf]'"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# The tensor arguments a transformers forward may take from data, in no particular order: the
# engine's inputs are those the model's forward has, in its order.
DATA_ARGUMENTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values", "pixel_mask",
                  "input_values", "input_features", "bbox", "decoder_input_ids")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pt2", ".bin", ".ckpt", ".safetensors", ".ts", ".jit", ".zip", ".tar")
POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def looks_like_hub_id(text: str) -> bool:
    """``org/name`` or ``name``, not a path here and not a checkpoint file's name."""
    path = Path(text)
    return (not path.exists() and bool(HUB_ID.match(text)) and not text.lower().endswith(CHECKPOINT_SUFFIXES)
            and not text.startswith("."))


def hub_id_error(text: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {text} is no file or folder here; as a Hugging Face Hub model id it is not fetched (models "
        f"are not downloaded): save it to a folder where it can be downloaded (huggingface-cli download {text} "
        f"--local-dir DIR, or from_pretrained('{text}').save_pretrained('DIR')) and give DIR")


def read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {folder}: config.json is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {folder}: config.json is not a JSON object")
    return config


def _modules(folder: Path) -> list[dict[str, Any]] | None:
    """sentence-transformers' ``modules.json``, where the folder has one."""
    file = folder / "modules.json"
    if not file.is_file():
        return None
    try:
        modules = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {folder}: modules.json is not readable JSON ({exc})") from None
    return modules if isinstance(modules, list) else None


@dataclasses.dataclass(frozen=True)
class Pooling:
    """sentence-transformers' Pooling (one mode) and whether Normalize follows it."""

    mode: str  # cls | mean | max | mean_sqrt_len
    normalize: bool

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sentence_modules(folder: Path) -> tuple[Path, Pooling] | None:
    """(the transformer's folder, its pooling) of a sentence-transformers folder; None for another."""
    modules = _modules(folder)
    if modules is None:
        return None
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unknown = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if unknown or "Transformer" not in kinds:
        raise CheckpointError(f"checkpoint {folder}: sentence-transformers modules {unknown or kinds} are not "
                              f"supported (Transformer, Pooling and Normalize are); export the model's encoder alone")
    transformer = modules[kinds.index("Transformer")]
    pooling = Pooling("cls", "Normalize" in kinds)
    if "Pooling" in kinds:
        config_file = folder / modules[kinds.index("Pooling")].get("path", "") / "config.json"
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {folder}: the pooling configuration {config_file} is not readable "
                                  f"({exc})") from None
        modes = [mode for key, mode in POOLING_MODES.items() if config.get(key)]
        others = [k for k, v in config.items() if k.startswith("pooling_mode") and v and k not in POOLING_MODES]
        if len(modes) != 1 or others:
            raise CheckpointError(f"checkpoint {folder}: pooling {modes + others} is not supported; one of "
                                  f"{', '.join(POOLING_MODES.values())} is")
        pooling = Pooling(modes[0], "Normalize" in kinds)
    return folder / transformer.get("path", ""), pooling


def folder_sha256(folder: Path) -> str:
    """The configuration and weight files' names and contents (not tokenizer or preprocessing files)."""
    digest = hashlib.sha256()
    names = sorted(p for p in folder.rglob("*") if p.is_file() and (
        p.name == "config.json" or p.name == "modules.json" or p.suffix in (".safetensors", ".bin")
        or p.name.endswith(".index.json")))
    for path in names:
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _transformers(folder: Path) -> Any:
    try:
        import transformers
    except ImportError:
        raise CheckpointError(f"checkpoint {folder} is a Hugging Face model folder; reading it needs the "
                              f"transformers library: {EXTRA}") from None
    return transformers


def _model_class(transformers: Any, config: dict[str, Any], folder: Path, trust: bool) -> tuple[Any, str]:
    """(the class whose from_pretrained loads the folder, how it was chosen)."""
    remote = config.get("auto_map")
    architectures = config.get("architectures") or []
    if architectures:
        cls = getattr(transformers, str(architectures[0]), None)
        if cls is not None:
            return cls, f"architectures[0] {architectures[0]}"
        if not remote:
            raise CheckpointError(
                f"checkpoint {folder}: its architecture {architectures[0]} is not in transformers "
                f"{transformers.__version__}; upgrade transformers or save the model with a class it has")
    if remote:  # trusted: the auto class the folder's own code registers for
        kinds = [k for k in remote if str(k).startswith("AutoModel")] if isinstance(remote, dict) else []
        if not kinds:
            raise CheckpointError(f"checkpoint {folder}: its auto_map names no AutoModel class")
        return getattr(transformers, kinds[-1]), f"auto_map {kinds[-1]} (--trust-checkpoint)"
    labels = config.get("id2label") or {}
    named = isinstance(labels, dict) and any(not str(v).startswith("LABEL_") for v in labels.values())
    image = "image_size" in config or "num_channels" in config
    if named:
        auto = "AutoModelForImageClassification" if image else "AutoModelForSequenceClassification"
        return getattr(transformers, auto), f"{auto} (config.json names labels, no architectures)"
    return transformers.AutoModel, "AutoModel (config.json names no architectures)"


def _weights(folder: Path) -> str:
    found = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not found:
        raise CheckpointError(f"checkpoint {folder} has config.json but no weights ({', '.join(WEIGHT_FILES[::2])}"
                              f" or their sharded .index.json): save the model with save_pretrained")
    return found[0]


def load_model_folder(folder: Path, trust: bool) -> tuple[torch.nn.Module, list[str], dict[str, Any]]:
    """(the model fed by name, its input names in order, what the manifest records of it)."""
    import torch

    sentence = sentence_modules(folder)
    model_folder, pooling = sentence if sentence else (folder, None)
    if not is_model_folder(model_folder):
        raise CheckpointError(f"checkpoint {folder}: the transformer of its modules.json has no config.json "
                              f"in {model_folder}")
    config = read_config(model_folder)
    remote = config.get("auto_map")
    if remote and not trust:
        raise CheckpointError(
            f"checkpoint {folder} asks for its own Python code (config.json auto_map: "
            f"{', '.join(sorted(remote)) if isinstance(remote, dict) else remote}), which runs when loaded; "
            f"refusing to load it. Pass --trust-checkpoint if you trust where this folder came from")
    transformers = _transformers(folder)
    cls, chosen = _model_class(transformers, config, model_folder, trust)
    weights = _weights(model_folder)
    options: dict[str, Any] = {"local_files_only": True, "dtype": torch.float32}
    if trust and config.get("auto_map"):
        options["trust_remote_code"] = True
    try:
        transformers.utils.logging.disable_progress_bar()  # no per-tensor progress bar on the console
        with quieted(loggers=("transformers",)):
            model = cls.from_pretrained(str(model_folder), attn_implementation="eager", **options)
    except Exception as exc:  # transformers' or safetensors' own refusal of the user's files (--debug shows why)
        text = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"checkpoint {folder}: transformers could not load it as {cls.__name__} "
                              f"({type(exc).__name__}: {text}); is {weights} complete and saved by save_pretrained?") from exc
    model.eval()
    if pooling is not None and isinstance(getattr(model, "pooler", None), torch.nn.Module):
        # sentence-transformers pools the hidden states; the model's own pooler (a dense layer and a
        # tanh) would be computed and thrown away. transformers' encoders skip a pooler set to None.
        model.pooler = None
    names = _data_arguments(model)
    module = HuggingFaceModel(model, names, pooling)
    labels = config.get("id2label") if cls.__name__.endswith("Classification") or "ForImage" in cls.__name__ else None
    info = {"class": cls.__name__, "chosen_by": chosen, "weights": weights, "model_type": config.get("model_type"),
            "transformers": transformers.__version__, "main_input": getattr(model, "main_input_name", names[0])}
    if pooling is not None:
        info["sentence_transformers"] = pooling.to_json()
    if isinstance(labels, dict) and labels:
        info["labels"] = [str(labels.get(str(i), labels.get(i, i))) for i in range(len(labels))]
    return module, names, info


def _data_arguments(model: Any) -> list[str]:
    """The model's tensor inputs in forward's order, its main input first."""
    import inspect

    parameters = list(inspect.signature(model.forward).parameters)
    names = [n for n in parameters if n in DATA_ARGUMENTS]
    main = getattr(model, "main_input_name", None)
    if main in names:
        names.remove(main)
        names.insert(0, main)
    if not names:
        raise CheckpointError(f"{type(model).__name__}.forward takes none of {', '.join(DATA_ARGUMENTS)}: "
                              f"its inputs are not known")
    return names


@functools.cache
def _module_class() -> Any:
    import torch

    class HuggingFaceModel(torch.nn.Module):
        """A transformers model fed by name, returning its tensor outputs by field name (with
        sentence-transformers pooling: ``sentence_embedding``)."""

        def __init__(self, model: Any, names: list[str], pooling: Pooling | None):
            super().__init__()
            self.model = model
            self.pooling = pooling
            self.input_names = list(names)
            type(self).forward = forward_with(self.input_names, 1, "run")

        def bind(self, feeds: list[str]) -> "HuggingFaceModel":
            """The same model, fed only ``feeds`` (in that order); the rest stay at their defaults."""
            bound = type("HuggingFaceModel", (type(self),), {"forward": forward_with(list(feeds), len(feeds), "run")})
            clone = bound.__new__(bound)
            clone.__dict__ = self.__dict__.copy()
            clone.input_names = list(feeds)
            return clone

        def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
            given = {k: v for k, v in feeds.items() if v is not None}
            result = self.model(**given, return_dict=True)
            if self.pooling is not None:
                return {"sentence_embedding": _pool(result[0], given.get("attention_mask"), self.pooling)}
            return {k: v for k, v in result.items() if isinstance(v, torch.Tensor)}

    return HuggingFaceModel


def HuggingFaceModel(model: Any, names: list[str], pooling: Pooling | None) -> torch.nn.Module:
    """A module class of its own per model (its forward's signature is that model's inputs)."""
    base = _module_class()
    cls = type("HuggingFaceModel", (base,), {})
    return cls(model, names, pooling)


def _pool(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: Pooling) -> torch.Tensor:
    """sentence-transformers' Pooling (and Normalize) on the last hidden state."""
    import torch

    if pooling.mode == "cls":
        pooled = hidden[:, 0]
    else:
        weights = (mask if mask is not None else torch.ones(hidden.shape[:2], dtype=hidden.dtype)).unsqueeze(-1)
        weights = weights.to(hidden.dtype)
        if pooling.mode == "max":
            pooled = torch.where(weights > 0, hidden, torch.full_like(hidden, -1e9)).max(dim=1).values
        else:
            total = (hidden * weights).sum(1)
            count = weights.sum(1).clamp(min=1e-9)
            pooled = total / (count.sqrt() if pooling.mode == "mean_sqrt_len" else count)
    if pooling.normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled


# What else the folder says, for the build.

def image_options(folder: Path, given: ImageOptions, stated: frozenset[str]) -> tuple[ImageOptions, str | None]:
    """``given`` with the size, mean and std the folder's ``preprocessor_config.json`` states, where no
    flag (named in ``stated``) set them; and a sentence saying which were used, or None."""
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return given, None
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {folder}: preprocessor_config.json is not readable JSON ({exc})") from None
    changes: dict[str, Any] = {}
    said: list[str] = []
    size = config.get("size") if config.get("do_resize", True) else None
    if "size" not in stated and isinstance(size, dict):
        if "height" in size and "width" in size:
            changes["size"] = (int(size["height"]), int(size["width"]))
        elif "shortest_edge" in size:
            edge = int(size["shortest_edge"])
            changes["size"] = (edge, edge)
            said.append(f"shortest_edge {edge} read as {edge}x{edge}")
    elif "size" not in stated and isinstance(size, int):
        changes["size"] = (size, size)
    rescale = config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else 1.0
    if abs(float(rescale) * 255 - 1) > 1e-6:
        raise CheckpointError(f"checkpoint {folder}: preprocessor_config.json rescales pixels by {rescale}; images "
                              f"are read scaled to [0, 1] (1/255): pass the data as arrays instead of a folder")
    if config.get("do_normalize", True):
        for key, field in (("image_mean", "mean"), ("image_std", "std")):
            value = config.get(key)
            if field not in stated and isinstance(value, (list, tuple)) and value:
                changes[field] = tuple(float(v) for v in value)
    elif not {"mean", "std"} & stated:
        changes.update(mean=(0.0,), std=(1.0,))
    if not changes:
        return given, None
    used = dataclasses.replace(given, **changes)
    parts = [f"size {'x'.join(map(str, used.size))}" if "size" in changes else None,
             f"mean {','.join(f'{m:g}' for m in used.mean)}" if "mean" in changes else None,
             f"std {','.join(f'{s:g}' for s in used.std)}" if "std" in changes else None]
    kept = sorted(stated & {"size", "mean", "std"})
    text = (f"images are preprocessed as {folder.name}/preprocessor_config.json states: "
            f"{', '.join(p for p in parts if p)}" + (f" ({'; '.join(said)})" if said else "")
            + (f"; flags kept for {', '.join(kept)}" if kept else ""))
    return used, text


def tokenizer_folder(folder: Path) -> Path | None:
    """The folder's tokenizer (``tokenizer.json``), where it has one."""
    return folder if (folder / "tokenizer.json").is_file() else None
