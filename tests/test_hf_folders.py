"""Hugging Face model folders as checkpoints: refused where they should be (one line each), and
built from the folder alone where they can be: a ViT image classifier with its preprocessing, a
BERT text classifier with its tokenizer and label names (served through Triton's classification
extension). The packaged all-MiniLM-L6-v2 folder is built in tests/test_reference_models.py."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from support import run_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --- refusals: one line, before anything heavy is imported -----------------------------------------

def _folder(tmp_path, **config):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"], **config}))
    (folder / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    return folder


def _one_line(result, *words):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    line = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and all(w in line[0] for w in words), result.stderr
    return line[0]


def test_a_hub_id_says_models_are_not_downloaded(tmp_path):
    result = run_cli("build", "google/vit-base-patch16-224", "--calib", "x.npy", "--out", tmp_path / "b")
    _one_line(result, "google/vit-base-patch16-224", "Hub model id", "not downloaded", "save_pretrained", "no file or folder")


def test_remote_code_is_refused_without_trust(tmp_path):
    folder = _folder(tmp_path, auto_map={"AutoModel": "modeling_mine.MyModel"})
    result = run_cli("build", folder, "--calib", "x.npy", "--out", tmp_path / "b")
    _one_line(result, "auto_map", "AutoModel", "--trust-checkpoint", "refusing")


def test_without_transformers_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    result = run_cli("build", _folder(tmp_path), "--calib", "x.npy", "--out", tmp_path / "b")
    _one_line(result, "Hugging Face model folder", "pip install 'optimize[hf]'")


def test_a_folder_without_config_is_said_so(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line(run_cli("build", tmp_path / "empty", "--calib", "x.npy", "--out", tmp_path / "b"), "without config.json")


@pytest.mark.slow
def test_a_folder_without_weights_is_said_so(tmp_path):
    folder = _folder(tmp_path)
    pytest.importorskip("transformers")
    (folder / "model.safetensors").write_bytes(b"garbage, not safetensors")  # a damaged weights file
    _one_line(run_cli("build", folder, "--calib", "x.npy", "--out", tmp_path / "d"), "could not load it as BertModel",
              "SafetensorError", "model.safetensors")
    (folder / "model.safetensors").unlink()
    pytest.importorskip("transformers")
    _one_line(run_cli("build", folder, "--calib", "x.npy", "--out", tmp_path / "c"), "no weights", "save_pretrained")


def test_classification_strings_are_tritons():
    from serve.protocol import ProtocolError, classification_count, classify

    scores = np.asarray([[0.1, 2.5, -1.0], [3.0, 0.0, 1.0]], np.float32)
    got = classify(scores, 2, ["cat", "dog", "eel"])
    assert got.shape == (2, 2) and list(got[0]) == ["2.500000:1:dog", "0.100000:0:cat"]
    assert list(classify(scores, 1, None)[1]) == ["3.000000:0"]
    assert classification_count(3.0, "logits") == 3  # JSON's 3.0 is an integer
    for bad in (0, -1, True, "2", 1.5):
        with pytest.raises(ProtocolError, match="positive integer"):
            classification_count(bad, "logits")


def test_optional_arguments_the_data_leaves_out_stay_at_their_defaults():
    import inspect

    import torch

    from optimize.inputs.binding import bound

    class Scaled(torch.nn.Module):
        def forward(self, x, scale=None, shift=None):
            return x * (2.0 if scale is None else scale) + (0.0 if shift is None else shift)

    model = Scaled()
    assert bound(model, ["x", "scale", "shift"], ["x", "scale"]) is model  # a prefix: called as it is
    fed = bound(model, ["x", "scale", "shift"], ["x", "shift"])
    assert list(inspect.signature(fed.forward).parameters) == ["x", "shift"]
    x = torch.ones(2, 3)
    assert torch.equal(fed(x, torch.full((2, 3), 5.0)), torch.full((2, 3), 7.0))  # scale at its default, 2


# --- built from folders -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pytest.importorskip("transformers")
    from models.hf_folders import make

    out = tmp_path_factory.mktemp("hf")
    made = {**make(out, ("vit",)), **make(out, ("text",), epochs=2)}  # the text classifier's quality is not under test
    return {"root": out, **made}


@pytest.mark.slow
def test_vit_folder_uses_its_preprocessing_and_labels(folders, tmp_path):
    from optimize.bundle import read_manifest

    root = folders["root"]
    plain = run_cli("build", root / "vit", "--calib", root / "images", "--target", "ort-fp32", "--out", tmp_path / "a")
    assert plain.returncode == 0, plain.stderr
    assert "preprocessor_config.json states: size 32x32, mean 0.5,0.5,0.5, std 0.5,0.5,0.5" in plain.stderr
    assert "matched to the model's label names" in plain.stderr
    flags = run_cli("build", root / "vit", "--calib", root / "images", "--target", "ort-fp32", "--image-size",
                    "32x32", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--out", tmp_path / "b")
    assert flags.returncode == 0, flags.stderr
    assert "preprocessor_config.json states" not in flags.stderr
    a, b = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    accuracy = a.targets["ort-fp32"].accuracy["held_out"]["accuracy_pct"]
    assert accuracy == b.targets["ort-fp32"].accuracy["held_out"]["accuracy_pct"]
    assert accuracy > 80, accuracy  # the digits it was trained on, read as it was trained
    assert a.outputs == [{"name": "logits", "shape": [-1, 10], "dtype": "float32", "labels": "labels.txt"}]
    assert [s.name for s in a.inputs] == ["pixel_values"]
    assert (tmp_path / "a" / "labels.txt").read_text().split()[:3] == ["zero", "one", "two"]
    assert a.source["kind"] == "hf-folder" and a.source["folder"]["class"] == "ViTForImageClassification"
    assert a.stages["export"]["route"] == "torch.export"
    # The torch-eager baseline of `optimize bench` reads the program's dict output by field.
    from optimize.bench.torch_runner import TorchProgramRunner

    held = np.load(tmp_path / "a" / "data" / "heldout.npz")
    runner = TorchProgramRunner(tmp_path / "a" / "program.pt2", a.inputs, a.output_names)
    try:
        got = runner.infer({"pixel_values": held["pixel_values"][:4]})["logits"]
    finally:
        runner.close()
    assert got.shape == (4, 10) and np.allclose(got, np.load(tmp_path / "a" / "data" / "reference.npz")["logits"][:4],
                                                atol=1e-4)
    # The Triton export carries the labels file and names it on the output.
    exported = run_cli("export", "triton", tmp_path / "a", tmp_path / "repo")
    assert exported.returncode == 0, exported.stderr
    model = tmp_path / "repo" / a.model_name
    assert (model / "labels.txt").read_text() == (tmp_path / "a" / "labels.txt").read_text()
    assert 'label_filename: "labels.txt"' in (model / "config.pbtxt").read_text()


@pytest.mark.slow
def test_text_classifier_folder_is_served_with_label_names(folders, tmp_path):
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    from optimize.bundle import read_manifest
    from support import Server

    root = folders["root"]
    out = tmp_path / "bundle"
    result = run_cli("build", root / "text", "--calib", root / "text.npz", "--target", "ort-fp32", "--name", "docs",
                     "--out", out)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out)
    assert manifest.task == "classify" and manifest.text is not None  # the folder's tokenizer, its label names
    assert [s.name for s in manifest.inputs] == ["input_ids", "attention_mask"]  # token_type_ids: its default
    assert manifest.outputs[0]["name"] == "logits" and manifest.outputs[0]["labels"] == "labels.txt"
    samples = json.loads((root / "text_samples.json").read_text())[:4]
    texts = np.asarray([s["text"] for s in samples], dtype=object).reshape(-1, 1)
    packages = (out / "labels.txt").read_text().split()
    with Server(out) as server:
        http = triton_http.InferenceServerClient(server.url[len("http://"):])
        grpc = triton_grpc.InferenceServerClient(server.grpc_url)
        assert "classification" in http.get_server_metadata()["extensions"]
        answers = []
        for client, triton in ((http, triton_http), (grpc, triton_grpc)):
            tensor = triton.InferInput("text", list(texts.shape), "BYTES")
            tensor.set_data_from_numpy(texts)
            got = client.infer("docs", [tensor], outputs=[triton.InferRequestedOutput("logits", class_count=3)])
            top = got.as_numpy("logits")
            assert top.shape == (len(texts), 3)
            answers.append(top)
            plain = client.infer("docs", [tensor]).as_numpy("logits")
            for row, scores in zip(top, plain):
                value, index, label = row[0].decode().split(":")
                assert int(index) == int(np.argmax(scores)) and label == packages[int(index)]
                assert abs(float(value) - float(scores.max())) < 1e-5
        assert (answers[0] == answers[1]).all()
        body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]}],
                           "outputs": [{"name": "logits", "parameters": {"classification": 99}}]}).encode()
        from support import http as post

        status, answer, _ = post("POST", server.url + "/v2/models/docs/infer", body)
        assert status == 400 and "more classes than the 8" in json.loads(answer)["error"]


REMOTE_CONFIG = """
from transformers import PretrainedConfig


class MineConfig(PretrainedConfig):
    model_type = "mine"

    def __init__(self, width=4, **kwargs):
        self.width = width
        super().__init__(**kwargs)
"""
REMOTE_MODEL = """
import torch
from transformers import PreTrainedModel

from .configuration_mine import MineConfig


class MineModel(PreTrainedModel):
    config_class = MineConfig
    main_input_name = "input_values"

    def __init__(self, config):
        super().__init__(config)
        self.fc = torch.nn.Linear(config.width, 3)
        self.post_init()

    def forward(self, input_values=None, return_dict=None):
        return {"logits": self.fc(input_values).relu()}
"""


@pytest.mark.slow
def test_remote_code_loads_with_trust(tmp_path):
    """A folder with its own modeling code (auto_map) builds once the user says they trust it."""
    pytest.importorskip("transformers")
    import importlib.util

    from optimize.bundle import read_manifest

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "configuration_mine.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_mine.py").write_text(REMOTE_MODEL)
    (folder / "__init__.py").write_text("")
    spec = importlib.util.spec_from_file_location("mine_pkg", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["mine_pkg"] = package
    try:
        from mine_pkg.modeling_mine import MineConfig, MineModel  # noqa: F401 (made importable above)

        MineModel(MineConfig()).save_pretrained(folder)
    finally:
        for name in [n for n in sys.modules if n.startswith("mine_pkg")]:
            del sys.modules[name]
    (folder / "__init__.py").unlink()
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["MineModel"], auto_map={"AutoConfig": "configuration_mine.MineConfig",
                                                         "AutoModel": "modeling_mine.MineModel"})
    (folder / "config.json").write_text(json.dumps(config))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32))
    refused = run_cli("build", folder, "--calib", tmp_path / "x.npy", "--target", "ort-fp32", "--out", tmp_path / "a")
    _one_line(refused, "auto_map", "--trust-checkpoint")
    trusted = run_cli("build", folder, "--calib", tmp_path / "x.npy", "--target", "ort-fp32", "--trust-checkpoint",
                      "--out", tmp_path / "b")
    assert trusted.returncode == 0, trusted.stderr
    manifest = read_manifest(tmp_path / "b")
    assert manifest.source["folder"]["chosen_by"] == "auto_map AutoModel (--trust-checkpoint)"
    assert [s.name for s in manifest.inputs] == ["input_values"] and manifest.output_names == ["logits"]


@pytest.mark.slow
def test_export_falls_back_to_draft_export_and_records_the_route(tmp_path):
    import torch

    from optimize.inputs.specs import dynamic_spec
    from optimize.passes import onnx_export as export

    class Branchy(torch.nn.Module):  # data-dependent control flow: torch.export refuses it
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            if x.mean() > -100:
                return self.fc(x)
            return self.fc(-x)

    model = Branchy().eval()
    spec = dynamic_spec("x", (2, 4), "float32", sequence=False)
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    want = {"output": model(torch.from_numpy(x)).detach().numpy()}

    def check(path):
        got = export.onnx_outputs(path, [{"x": x[:8]}, {"x": x[8:]}])
        return export.compare_outputs(want, got, export.FP32_EXPORT_TOLERANCE, "parity")

    made = export.export_checked(model, {"x": x[:2]}, [spec], ["output"], tmp_path / "m.onnx", check)
    assert made.route == "draft export" and made.program is not None
    assert len(made.failed) == 1 and made.failed[0].startswith("torch.export: ") and "data-dependent" in made.failed[0]
    assert made.parity["output"]["max_abs_error"] < 1e-4
