"""``import optimize`` and ``optimize --help`` work with no backend (and no torch) importable."""

import subprocess
import sys

BLOCKER = r"""
import sys
BLOCKED = {"torch", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt", "onnxscript", "PIL", "sklearn",
           "ray", "optuna", "mlflow"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
import optimize, optimize.cli, optimize.targets.registry as registry
from optimize.build.pipeline import run_build  # the pipeline itself imports backends lazily too
import serve.server, serve.app, optimize.bench.run
from click.testing import CliRunner
for args in (["--help"], *([name, "--help"] for name in optimize.cli.COMMANDS),
             ["export", "triton", "--help"], ["export", "kserve", "--help"]):
    result = CliRunner().invoke(optimize.cli.main, args)
    assert result.exit_code == 0, (args, result.output)
    print(result.output.splitlines()[0])
searched = CliRunner().invoke(optimize.cli.main, ["search", "model.pt", "--out", "best"])
assert searched.exit_code != 0 and "pip install 'optimize[search]'" in searched.output, searched.output
print("modules:", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_package_and_help_without_backends():
    result = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage: main build" in result.stdout or "Usage: main [OPTIONS]" in result.stdout
    assert "modules: []" in result.stdout


def test_unavailable_reason_names_the_extra(monkeypatch):
    import importlib.util

    from optimize.targets import registry

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    reason = registry.unavailable_reason("openvino-fp32")
    assert reason == "package 'openvino' is not installed: pip install 'optimize[openvino]'"
