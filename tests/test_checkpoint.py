import pickle

import pytest
import torch

from optimize.inputs.checkpoint import load_checkpoint, parse_arch_args
from optimize.errors import CheckpointError
from support import WritesAFile


def test_state_dict_with_arch(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint["ckpt"], tiny_checkpoint["arch"])
    assert loaded.format == "state-dict" and loaded.input_names == ["x"]
    assert not loaded.module.training


def test_arch_kwargs_reach_the_factory(tmp_path, tiny_checkpoint):
    wide = tiny_checkpoint["module"].tiny_cnn(width=4)
    torch.save(wide.state_dict(), tmp_path / "w4.pt")
    loaded = load_checkpoint(tmp_path / "w4.pt", tiny_checkpoint["arch"], parse_arch_args(("width=4",)))
    assert loaded.module.conv1.out_channels == 4


def test_mismatched_state_dict_lists_keys_and_shapes(tmp_path, tiny_checkpoint):
    state = tiny_checkpoint["model"].state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["head.bias"]
    state["conv1.weight"] = torch.zeros(2, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "bad.pt", tiny_checkpoint["arch"])
    text = str(info.value)
    assert "missing keys [head.bias]" in text
    assert "unexpected keys [extra.weight]" in text
    assert "conv1.weight: checkpoint (2, 3, 3, 3) vs model (8, 3, 3, 3)" in text


def test_lightning_dict_with_prefix(tmp_path, tiny_checkpoint):
    state = {f"model.{k}": v for k, v in tiny_checkpoint["model"].state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "lightning.ckpt")
    loaded = load_checkpoint(tmp_path / "lightning.ckpt", tiny_checkpoint["arch"])
    assert loaded.format == "lightning"
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(loaded.module(x), tiny_checkpoint["model"](x))


def test_torchscript_and_exported_program(tmp_path, tiny_checkpoint):
    model = tiny_checkpoint["model"]
    torch.jit.save(torch.jit.script(model), tmp_path / "m.ts")
    program = torch.export.export(model, (torch.randn(2, 3, 16, 16),))
    torch.export.save(program, tmp_path / "m.pt2")
    x = torch.randn(2, 3, 16, 16)
    for name, kind in (("m.ts", "torchscript"), ("m.pt2", "exported-program")):
        loaded = load_checkpoint(tmp_path / name)
        assert loaded.format == kind and loaded.input_names == ["x"]
        assert torch.allclose(loaded.module(x), model(x), atol=1e-6)


def test_malicious_pickle_does_not_run_without_trust(tmp_path):
    target = tmp_path / "pwned.txt"
    torch.save({"weights": WritesAFile(target)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "evil.pt", "tests/tiny_models.py:tiny_cnn")
    assert "--trust-checkpoint" in str(info.value)
    assert not target.exists()


def test_pickled_module_loads_only_with_trust(tmp_path):
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()), tmp_path / "full.pt")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(tmp_path / "full.pt")
    loaded = load_checkpoint(tmp_path / "full.pt", trust=True)
    assert loaded.format == "pickled-module"


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"hello, these are my notes\n", "is not a PyTorch file: it starts with 'hello, these are my note' \\(text\\)"),
    (b"\x00\x01garbage", "is corrupt or not a PyTorch file: it starts with .* \\(binary\\)"),
    (b"PK\x03\x04 truncated zip", "corrupt or not a PyTorch file"),
    (pickle.dumps([1, 2, 3]), "refusing to load it"),
])
def test_corrupt_files(tmp_path, content, message):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


MYNET = """
import torch


class MyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)
"""


def test_a_trusted_pickle_of_the_users_class_loads_with_arch_naming_its_file(tmp_path):
    import subprocess
    import sys

    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "mynet.py").write_text(MYNET)
    subprocess.run([sys.executable, "-c", "import torch, mynet; torch.save(mynet.MyNet(), 'full.pt')"],
                   cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "net")}, check=True)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(tmp_path / "full.pt")
    assert "(it pickles mynet.MyNet, a Python class or function)" in str(refused.value)
    with pytest.raises(CheckpointError, match="pickles classes from module 'mynet', which cannot be imported here: "
                                              "pass --arch path/to/mynet.py:ClassName"):
        load_checkpoint(tmp_path / "full.pt", trust=True)
    loaded = load_checkpoint(tmp_path / "full.pt", f"{tmp_path}/net/mynet.py:MyNet", trust=True)
    assert loaded.format == "pickled-module" and loaded.input_names == ["x"]


def test_safetensors_weights_load_like_a_state_dict(tmp_path, tiny_checkpoint):
    from safetensors.torch import save_file

    save_file(tiny_checkpoint["model"].state_dict(), tmp_path / "tiny.safetensors")
    loaded = load_checkpoint(tmp_path / "tiny.safetensors", tiny_checkpoint["arch"])
    x = torch.randn(2, 3, 16, 16)
    assert loaded.format == "state-dict" and torch.allclose(loaded.module(x), tiny_checkpoint["model"](x))


def test_missing_file_and_bad_arch(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="cannot import module 'no_such_module'"):
        load_checkpoint(tiny_checkpoint["ckpt"], "no_such_module:Net")
    with pytest.raises(CheckpointError, match="has no callable named 'Nope'"):
        load_checkpoint(tiny_checkpoint["ckpt"], "tests/tiny_models.py:Nope")
    with pytest.raises(CheckpointError, match="pass --arch"):
        load_checkpoint(tiny_checkpoint["ckpt"])


USERS_MODELS = """
import torch


class MyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)
"""


@pytest.mark.service
def test_a_users_own_models_py_wins_over_ours_from_the_console_script(tmp_path):
    """``optimize build net.pt --arch models:MyNet`` in the user's folder, through the installed
    console script (which, unlike ``python -m``, does not put the folder on the path): their own
    ``models.py`` is the one loaded, not a module of ours."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "models.py").write_text(USERS_MODELS)
    torch.save({"fc.weight": torch.randn(3, 4), "fc.bias": torch.randn(3)}, tmp_path / "net.pt")
    script = Path(sys.executable).parent / "optimize"
    done = subprocess.run([str(script), "build", "net.pt", "--arch", "models:MyNet", "--input-shape", "1x4",
                           "--target", "ort-fp32", "--out", "bundle"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["source"]["arch"] == "models:MyNet" and manifest["outputs"][0]["shape"] == [-1, 3]


def test_a_module_named_like_one_of_ours_already_imported_still_resolves_to_the_users_file(tmp_path, monkeypatch):
    import sys

    import serve  # ours, imported in this process already (as in a test, or a long-lived program)
    from optimize.inputs.factory import resolve_factory

    (tmp_path / "serve.py").write_text("def MyNet():\n    return 'theirs'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert resolve_factory("serve:MyNet")() == "theirs"
    assert sys.modules["serve"] is serve  # everything else still sees ours
