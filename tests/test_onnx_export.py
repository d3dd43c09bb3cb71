import numpy as np
import onnx
import pytest
import torch

from optimize.errors import ExportError, ParityError
from optimize.passes.onnx_export import FP32_EXPORT_TOLERANCE, compare_outputs, export_onnx, export_program
from optimize.passes.weight_only import quantize_weights
from optimize.inputs.specs import dynamic_spec


@torch.library.custom_op("testlib::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.sin()


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class UsesMystery(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)

    def forward(self, x):
        return mystery(self.inner(x))


def test_parity_error_names_output_element_and_tolerance():
    ref = {"logits": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}
    got = {"logits": np.array([[1.0, 2.0], [3.0, 4.5]], np.float32)}
    with pytest.raises(ParityError) as info:
        compare_outputs(ref, got, FP32_EXPORT_TOLERANCE, "ONNX export vs PyTorch")
    assert "output 'logits'" in str(info.value) and "index (1, 1)" in str(info.value)
    assert "atol 0.0001" in str(info.value)
    report = compare_outputs(ref, ref, FP32_EXPORT_TOLERANCE, "same")
    assert report["logits"]["max_abs_error"] == 0.0


def test_dynamic_batch_and_sequence_axes(tmp_path, tiny_checkpoint):
    spec = dynamic_spec("x", (2, 3, 16, 16), "float32", sequence=False)
    example = {"x": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    program = export_program(tiny_checkpoint["model"], example, [spec])
    export_onnx(program, example, [spec], ["output"], tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_unsupported_operator_names_op_and_module(tmp_path):
    spec = dynamic_spec("x", (2, 4), "float32", sequence=False)
    example = {"x": np.ones((2, 4), np.float32)}
    program = export_program(UsesMystery().eval(), example, [spec])
    with pytest.raises(ExportError) as info:
        export_onnx(program, example, [spec], ["output"], tmp_path / "m.onnx")
    assert "testlib" in str(info.value) and "mystery" in str(info.value)
    assert "no ONNX translation" in str(info.value)
    assert not (tmp_path / "m.onnx").exists()


def test_weight_only_int8_keeps_outputs_close(tmp_path):
    import onnxruntime as ort

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).eval()
    spec = dynamic_spec("x", (2, 64), "float32", sequence=False)
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    export_onnx(export_program(model, {"x": x[:2]}, [spec]), {"x": x[:2]}, [spec], ["output"], tmp_path / "f.onnx")
    details = quantize_weights(tmp_path / "f.onnx", tmp_path / "q.onnx")
    assert details["quantized_nodes"] == 2
    q = onnx.load(str(tmp_path / "q.onnx"))
    int8 = [i for i in q.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) == 2
    fp32 = ort.InferenceSession(str(tmp_path / "f.onnx")).run(None, {"x": x})[0]
    int8_out = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"x": x})[0]
    cos = (fp32 * int8_out).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8_out, axis=1)
    assert cos.min() > 0.999 and not np.array_equal(fp32, int8_out)


def test_weight_only_int8_on_an_old_opset_is_a_user_error_naming_the_fix(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from optimize.errors import BuildError

    weight = numpy_helper.from_array(np.ones((64, 32), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), tmp_path / "old.onnx")
    with pytest.raises(BuildError, match="opset 12: weight-only INT8 needs opset 13 or newer"):
        quantize_weights(tmp_path / "old.onnx", tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_a_batch_size_fixed_by_forward_names_the_cause_and_fix():
    from support import load_tiny

    spec = dynamic_spec("x", (2, 4), "float32", sequence=False)
    with pytest.raises(ExportError) as info:
        export_program(load_tiny().LenBatch().eval(), {"x": np.ones((2, 4), np.float32)}, [spec])
    message = str(info.value)
    assert "fixes the batch axis" in message and "len(x)" in message and "x.shape[0]" in message
