"""``optimize export triton`` and ``optimize export kserve``: checked against the real schemas.

Triton: ``config.pbtxt`` is parsed with Triton's own ``ModelConfig`` protobuf (shipped in tritonclient)
and checked against the engine it sits beside: platform or backend against the file in ``1/``, dims
and datatypes against the ONNX graph or the OpenVINO model. Kubernetes: Deployment, Service and
HorizontalPodAutoscaler against Kubernetes' JSON schemas (kubernetes-validate, strict), the
InferenceService against the schema in ``deploy/schemas`` with its predictor checked as a PodSpec.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from support import DEPLOYED, parse_pbtxt, run_cli, triton_proto
from optimize.deploy.triton import model_config, to_pbtxt

ROOT = Path(__file__).resolve().parents[1]
TYPES = {"TYPE_FP32": "float32", "TYPE_INT64": "int64", "TYPE_INT32": "int32", "TYPE_FP16": "float16"}


@pytest.fixture(scope="module")
def bundle(bundles):
    return bundles.get(*DEPLOYED)


@pytest.mark.parametrize("target", ["ort-fp32", "ort-int8", "openvino-int8"])
def test_triton_repository_matches_triton_schema_and_the_engine(bundle, tmp_path, target):
    repo = tmp_path / "repo"
    result = run_cli("export", "triton", bundle, repo, "--target", target, "--max-batch", "16",
                     "--instances", "2", "--max-delay-ms", "0.5")
    assert result.returncode == 0, result.stderr
    config = parse_pbtxt((repo / "tiny" / "config.pbtxt").read_text())
    assert config.name == "tiny" and config.max_batch_size == 16
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == 2  # KIND_CPU
    # The version folder is the version `optimize serve` answers as: a decimal integer that grows per build.
    from optimize.bundle.folder import read_manifest, version_number
    version = version_number(read_manifest(bundle), target)
    assert [p.name for p in (repo / "tiny").iterdir() if p.is_dir()] == [version] and len(version) == 19
    files = sorted(p.name for p in (repo / "tiny" / version).iterdir())
    assert files == sorted(config.default_model_filename.split() + (["model.bin"] if target.startswith("openvino") else []))
    proto = triton_proto()
    dtype = {v: k for k, v in proto.DataType.items()}
    if target.startswith("ort"):
        import onnx

        assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
        graph = onnx.load(str(repo / "tiny" / version / "model.onnx")).graph
        engine_inputs = {i.name: ([d.dim_value for d in i.type.tensor_type.shape.dim][1:],
                                  onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name)
                         for i in graph.input}
        engine_outputs = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim][1:] for o in graph.output}
    else:
        import openvino as ov

        assert config.backend == "openvino" and not config.platform
        model = ov.Core().read_model(str(repo / "tiny" / version / "model.xml"))
        engine_inputs = {p.get_any_name(): ([d.get_length() for d in list(p.get_partial_shape())[1:]],
                                            p.get_element_type().to_dtype().name) for p in model.inputs}
        engine_outputs = {p.get_any_name(): [d.get_length() for d in list(p.get_partial_shape())[1:]]
                          for p in model.outputs}
    assert {i.name: (list(i.dims), TYPES[dtype[i.data_type]]) for i in config.input} == engine_inputs
    assert {o.name: list(o.dims) for o in config.output} == engine_outputs


def test_tensorrt_config_names_the_plan_on_a_gpu_instance():
    """A trt-* entry as written for a built engine (the build itself needs a GPU: test_tensorrt.py)."""
    inputs = [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 224, 224]}]
    outputs = [{"name": "logits", "datatype": "FP16", "shape": [-1, 1000]}]
    config = parse_pbtxt(to_pbtxt(model_config("resnet", "trt-int8", 32, inputs, outputs, 0.001, 128, 1)))
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
    assert config.instance_group[0].kind == 1  # KIND_GPU
    assert list(config.input[0].dims) == [3, 224, 224] and config.max_batch_size == 32


def test_triton_export_refuses_what_triton_cannot_run(bundle, tmp_path):
    result = run_cli("export", "triton", bundle, tmp_path / "repo", "--target", "trt-int8")
    assert result.returncode != 0 and "trt-int8 is not built" in result.stderr
    assert not (tmp_path / "repo" / "tiny").exists()


def test_served_config_is_a_triton_model_config(bundle):
    """/v2/models/{m}/config comes from the same generator: it parses as Triton's ModelConfig."""
    from google.protobuf import json_format

    from serve.server import ServeConfig, create_service

    app = create_service(ServeConfig(bundle, target="ort-int8", drift=False))
    try:
        config = app.model.config(app.batcher.config.to_json())
        parsed = json_format.ParseDict(config, triton_proto().ModelConfig())
        assert parsed.platform == "onnxruntime_onnx" and list(parsed.input[0].dims) == [3, 16, 16]
    finally:
        app.batcher.close()


@pytest.fixture(scope="module")
def manifests(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("k8s")
    result = run_cli("export", "kserve", bundle, "--image", "registry.example.com/tiny:1", "--out", out,
                     "--target", "ort-int8", "--drain-delay", "7", "--grace", "20", "--namespace", "models")
    assert result.returncode == 0, result.stderr
    return {name: list(yaml.safe_load_all((out / name).read_text()))
            for name in ("inferenceservice.yaml", "deployment.yaml")}


def test_plain_manifests_pass_kubernetes_schemas(manifests):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    deployment, service, hpa = manifests["deployment.yaml"]
    for document in (deployment, service, hpa):
        kubernetes_validate.validate(document, latest_version(), strict=True)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["grpc"] == {"port": 8081, "service": "inference.GRPCInferenceService"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("http", 8080), ("h2c", 8081)]
    assert {p["name"]: p.get("appProtocol") for p in service["spec"]["ports"]} == {
        "http": None, "grpc": "kubernetes.io/h2c"}
    command = container["command"]
    assert command[command.index("--http-port") + 1] == "8080" and command[command.index("--grpc-port") + 1] == "8081"
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]  # the drain delay
    assert container["command"][container["command"].index("--drain-delay") + 1] == "0"
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 7 + 20
    metric = hpa["spec"]["metrics"][0]["pods"]
    assert metric["metric"]["name"] == "inference_queue_time_seconds" and metric["target"]["averageValue"] == "50m"
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, latest_version(), strict=True)


def test_inference_service_passes_its_schema_and_kubernetes_podspec(manifests):
    import jsonschema
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    (service,) = manifests["inferenceservice.yaml"]
    schema = json.loads((ROOT / "deploy" / "schemas" / "inferenceservice-v1beta1.json").read_text())
    jsonschema.validate(service, schema)
    predictor = dict(service["spec"]["predictor"])
    extension = set(schema["$defs"]["component"]["properties"]) - {"containers"}
    podspec = {k: v for k, v in predictor.items() if k not in extension}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": podspec}
    kubernetes_validate.validate(pod, latest_version(), strict=True)
    container = podspec["containers"][0]
    assert container["name"] == "kserve-container" and container["ports"][0]["containerPort"] == 8080
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["command"][container["command"].index("--grace") + 1] == "20"
    assert podspec["terminationGracePeriodSeconds"] >= 7 + 20
    assert service["metadata"]["namespace"] == "models"
    wrong = json.loads(json.dumps(service))
    wrong["spec"]["predictor"]["scaleMetric"] = "queue"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong, schema)
    # Raw deployment (the default) scales with an HPA on CPU; concurrency is Knative's, serverless only.
    annotations = service["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert annotations["serving.kserve.io/autoscalerClass"] == "hpa"
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("cpu", 70)
    mixed = json.loads(json.dumps(service))
    mixed["spec"]["predictor"]["scaleMetric"] = "concurrency"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(mixed, schema)


@pytest.mark.parametrize("flags,check", [
    (("--mode", "serverless", "--protocol", "grpc"), lambda service, predictor: (
        [(p["name"], p["containerPort"]) for p in predictor["containers"][0]["ports"]] == [("h2c", 8081)]
        and predictor["containers"][0]["readinessProbe"]["grpc"]["port"] == 8081
        and predictor["containers"][0]["livenessProbe"]["grpc"]["port"] == 8081)),
    (("--mode", "serverless"), lambda service, predictor: (
        service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
        and (predictor["scaleMetric"], predictor["scaleTarget"]) == ("concurrency", 8))),
    (("--autoscaler", "keda", "--prometheus-url", "http://prometheus.monitoring:9090"), lambda service, predictor: (
        service["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"
        and "scaleMetric" not in predictor
        and 'inference_queue_duration_seconds_sum{model="tiny"}' in
        predictor["autoScaling"]["metrics"][0]["external"]["metric"]["query"]
        and predictor["autoScaling"]["metrics"][0]["external"]["target"] == {"type": "Value", "value": "0.05"})),
])
def test_each_kserve_mode_scales_as_kserve_documents_it(bundle, tmp_path, flags, check):
    import jsonschema

    result = run_cli("export", "kserve", bundle, "--image", "registry.example.com/tiny:1", "--out", tmp_path,
                     "--target", "ort-int8", *flags)
    assert result.returncode == 0, result.stderr
    (service,) = yaml.safe_load_all((tmp_path / "inferenceservice.yaml").read_text())
    jsonschema.validate(service, json.loads((ROOT / "deploy" / "schemas" / "inferenceservice-v1beta1.json").read_text()))
    assert check(service, service["spec"]["predictor"])


def test_kserve_mode_mistakes_are_one_line(bundle, tmp_path):
    for flags, message in [(("--mode", "serverless", "--autoscaler", "keda"), "is for --mode raw"),
                           (("--grpc-port", "8080"), "--port and --grpc-port are both 8080"),
                           (("--autoscaler", "keda"), "pass --prometheus-url")]:
        result = run_cli("export", "kserve", bundle, "--image", "x:1", "--out", tmp_path / "k", *flags)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "k").exists()


def test_manifests_are_plain_yaml_without_anchors(bundle, tmp_path):
    assert run_cli("export", "kserve", bundle, "--image", "x:1", "--out", tmp_path).returncode == 0
    for name in ("inferenceservice.yaml", "deployment.yaml"):
        text = (tmp_path / name).read_text()
        assert "&id" not in text and "*id" not in text, name
