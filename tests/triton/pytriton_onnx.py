"""A real Triton server (PyTriton) serving an ONNX file through ONNX Runtime in a Python callback.

Run with the interpreter of the PyTriton virtualenv (``.venv-triton``, made by ``scripts/test.sh``),
never imported by the project's own environment:

    LD_LIBRARY_PATH=<interpreter lib folder> .venv-triton/bin/python tests/triton/pytriton_onnx.py \\
        MODEL.onnx NAME HTTP_PORT GRPC_PORT [MAX_BATCH]

The Python backend's stub links ``libpython3.11.so``; pointed at the interpreter's own ``lib``
folder it finds the same build as the one running this script.
"""

import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def main() -> None:
    onnx, name, http_port, grpc_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    max_batch = int(sys.argv[5]) if len(sys.argv) > 5 else 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()

    @batch
    def infer(**feeds):
        values = session.run(None, {i.name: feeds[i.name] for i in inputs})
        return {o.name: v for o, v in zip(outputs, values)}

    config = TritonConfig(http_port=http_port, grpc_port=grpc_port, metrics_port=0, http_address="127.0.0.1",
                          grpc_address="127.0.0.1")
    # PyTriton's default puts statistics behind a token; plain Triton serves them to anyone.
    security = TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"])
    with Triton(config=config, security_config=security) as triton:
        triton.bind(model_name=name, infer_func=infer,
                    inputs=[Tensor(name=i.name, dtype=TYPES[i.type], shape=tuple(i.shape[1:])) for i in inputs],
                    outputs=[Tensor(name=o.name, dtype=TYPES[o.type], shape=tuple(o.shape[1:])) for o in outputs],
                    config=ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher()))
        triton.serve()


if __name__ == "__main__":
    main()
