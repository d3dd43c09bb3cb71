"""Kubernetes manifests for the serving image: a KServe InferenceService, or a plain
Deployment + Service + HorizontalPodAutoscaler.

KServe's two modes scale differently, and the InferenceService says which it uses: raw deployment
(``--mode raw``, the default: a Deployment, no Knative) scales with an HPA on CPU utilisation, or with
KEDA (``--autoscaler keda``) on the mean queue time read from Prometheus; serverless (``--mode
serverless``, Knative) scales on requests in flight per pod, and Knative routes one container port.

Both speak the Open Inference Protocol over HTTP and gRPC. The plain Deployment exposes both ports
(gRPC as ``h2c``, ``appProtocol: kubernetes.io/h2c`` so meshes and gateways speak HTTP/2 to it),
probes readiness with Kubernetes' own gRPC probe (``grpc.health.v1``) and liveness on
``/v2/health/live``. Knative routes one container port, so the InferenceService offers one protocol
(``--protocol http|grpc``): its port, named ``h2c`` for gRPC as KServe expects, and probes on that
port; metrics stay on the HTTP port either way. Both give the pod time to drain: SIGTERM turns readiness off and
the server keeps serving for the drain delay, then finishes queued work within its grace period,
so ``terminationGracePeriodSeconds`` covers both. In the plain variant a preStop sleep of the drain
delay lets the Service drop the pod before SIGTERM (the server is then told ``--drain-delay 0``), and
the autoscaler scales on the mean queue time per pod, a custom metric served by prometheus-adapter
from ``inference_queue_duration_seconds`` (rule in ``deploy/prometheus-adapter/rules.yaml``).

The bundle is either baked into the image at ``/bundle`` (``FROM my-model`` + ``COPY bundle /bundle``)
or, for KServe, fetched by its storage initializer from ``--storage-uri`` into ``/mnt/models``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from optimize.bundle.folder import choose_target, read_manifest
from optimize.errors import InputSpecError

QUEUE_METRIC = "inference_queue_time_seconds"  # per pod, from prometheus-adapter
KSERVE_MODES = ("raw", "serverless")
AUTOSCALERS = ("hpa", "keda")
PROTOCOLS = ("http", "grpc")
GRPC_SERVICE = "inference.GRPCInferenceService"  # what the gRPC probe asks grpc.health.v1 about


@dataclasses.dataclass(frozen=True)
class DeployConfig:
    image: str
    name: str | None = None
    namespace: str | None = None
    target: str | None = None
    storage_uri: str | None = None
    cpu: str = "2"
    memory: str = "2Gi"
    gpus: int = 0
    min_replicas: int = 1
    max_replicas: int = 4
    queue_target_s: float = 0.05  # mean queue time per pod the autoscaler holds
    drain_delay_s: float = 5.0
    grace_s: float = 30.0
    port: int = 8080
    grpc_port: int = 8081
    protocol: str = "http"  # the InferenceService's one protocol: http | grpc
    mode: str = "raw"  # KServe: raw (a Deployment and an HPA or KEDA) | serverless (Knative)
    autoscaler: str = "hpa"  # raw mode: hpa (on CPU) | keda (on the queue time, from Prometheus)
    cpu_target_pct: int = 70  # raw + hpa: the CPU utilisation the HPA holds
    concurrency_target: int = 8  # serverless: requests in flight per pod Knative holds
    prometheus_url: str | None = None  # raw + keda: where KEDA reads the queue time

    def check(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise InputSpecError(f"--protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if self.mode not in KSERVE_MODES:
            raise InputSpecError(f"--mode {self.mode!r} is not one of {', '.join(KSERVE_MODES)}")
        if self.autoscaler not in AUTOSCALERS:
            raise InputSpecError(f"--autoscaler {self.autoscaler!r} is not one of {', '.join(AUTOSCALERS)}")
        if self.mode == "serverless" and self.autoscaler != "hpa":
            raise InputSpecError("--autoscaler keda is for --mode raw; serverless mode scales on concurrency "
                                 "with Knative's autoscaler")
        if self.autoscaler == "keda" and not self.prometheus_url:
            raise InputSpecError("--autoscaler keda reads the queue time from Prometheus: pass --prometheus-url, "
                                 "e.g. http://prometheus.monitoring:9090")
        if not 1 <= self.cpu_target_pct <= 100 or self.concurrency_target < 1:
            raise InputSpecError("--cpu-target must be 1-100 (percent) and --concurrency-target at least 1")


def _name(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-")
    if not name:
        raise InputSpecError(f"cannot make a Kubernetes name from {text!r}; pass --name")
    return name


def _container(config: DeployConfig, bundle_path: str, target: str, drain_delay_s: float,
               name: str = "server", protocols: tuple[str, ...] = ("http", "grpc"),
               probe_on: str = "grpc") -> dict[str, Any]:
    """The serving container: both front ends listen; ``protocols`` are the ports it declares
    (the first is the one a single-port router sends to), ``probe_on`` which one is probed."""
    http_get = {"httpGet": {"path": "/v2/health/ready", "port": config.port}}
    grpc_probe = {"grpc": {"port": config.grpc_port, "service": GRPC_SERVICE}}
    ready = {**(grpc_probe if probe_on == "grpc" else http_get), "periodSeconds": 5, "timeoutSeconds": 2,
             "failureThreshold": 3}
    live = grpc_probe if probe_on == "grpc" and protocols == ("grpc",) else {
        "httpGet": {"path": "/v2/health/live", "port": config.port}}
    resources: dict[str, Any] = {"requests": {"cpu": config.cpu, "memory": config.memory},
                                 "limits": {"memory": config.memory}}
    if config.gpus:
        resources["limits"]["nvidia.com/gpu"] = str(config.gpus)
    ports = {"http": {"name": "http", "containerPort": config.port, "protocol": "TCP"},
             "grpc": {"name": "h2c", "containerPort": config.grpc_port, "protocol": "TCP"}}
    return {
        "name": name, "image": config.image,
        "command": ["optimize", "serve", bundle_path, "--host", "0.0.0.0", "--http-port", str(config.port),
                    "--grpc-port", str(config.grpc_port), "--target", target, "--drain-delay", f"{drain_delay_s:g}",
                    "--grace", f"{config.grace_s:g}"],
        "ports": [ports[p] for p in protocols],
        "readinessProbe": ready,
        "livenessProbe": {**live, "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3},
        "startupProbe": {**live, "periodSeconds": 2, "failureThreshold": 60},
        "resources": resources,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "allowPrivilegeEscalation": False},
    }


def _termination_s(config: DeployConfig) -> int:
    return int(math.ceil(config.drain_delay_s + config.grace_s + 5))


def queue_time_query(model: str) -> str:
    """PromQL: the mean time a request of ``model`` waited for an engine over the last minute."""
    selector = f'{{model="{model}"}}'
    return (f"sum(rate(inference_queue_duration_seconds_sum{selector}[1m])) / "
            f"clamp_min(sum(rate(inference_queue_duration_seconds_count{selector}[1m])), 1e-9)")


def _kserve_scaling(config: DeployConfig, model: str) -> tuple[dict[str, str], dict[str, Any]]:
    """(annotations, predictor fields) of the mode: KServe's raw mode scales with an HPA on CPU or
    memory, or with KEDA on an external metric; only serverless (Knative) mode scales on concurrency."""
    if config.mode == "serverless":
        return ({"serving.kserve.io/deploymentMode": "Serverless"},
                {"scaleMetric": "concurrency", "scaleTarget": config.concurrency_target})
    annotations = {"serving.kserve.io/deploymentMode": "RawDeployment",
                   "serving.kserve.io/autoscalerClass": config.autoscaler}
    if config.autoscaler == "hpa":
        return annotations, {"scaleMetric": "cpu", "scaleTarget": config.cpu_target_pct}
    annotations.update({"serving.kserve.io/enable-prometheus-scraping": "true", "prometheus.io/scrape": "true",
                        "prometheus.io/path": "/metrics", "prometheus.io/port": str(config.port)})
    metric = {"type": "External", "external": {
        "metric": {"backend": "prometheus", "serverAddress": config.prometheus_url, "query": queue_time_query(model)},
        "target": {"type": "Value", "value": f"{config.queue_target_s:g}"}}}
    return annotations, {"autoScaling": {"metrics": [metric]}}


def kserve_manifests(bundle: Path, config: DeployConfig) -> list[dict[str, Any]]:
    """One InferenceService running the serving image as a custom predictor container."""
    config.check()
    manifest = read_manifest(bundle)
    target = choose_target(manifest, config.target, bundle)
    name = _name(config.name or manifest.model_name)
    path = "/mnt/models" if config.storage_uri else "/bundle"
    # Knative routes one port: the chosen protocol's, probed there (metrics stay on HTTP).
    container = _container(config, path, target, config.drain_delay_s, name="kserve-container",
                           protocols=(config.protocol,), probe_on=config.protocol)
    if config.storage_uri:
        container["env"] = [{"name": "STORAGE_URI", "value": config.storage_uri}]
    annotations, scaling = _kserve_scaling(config, manifest.model_name)
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": name},
                                "annotations": {**annotations, "optimize/target": target}}
    if config.namespace:
        metadata["namespace"] = config.namespace
    predictor = {"minReplicas": config.min_replicas, "maxReplicas": config.max_replicas, **scaling,
                 "terminationGracePeriodSeconds": _termination_s(config), "containers": [container]}
    return [{"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": metadata,
             "spec": {"predictor": predictor}}]


def plain_manifests(bundle: Path, config: DeployConfig) -> list[dict[str, Any]]:
    """Deployment + Service + HorizontalPodAutoscaler (autoscaling/v2, on queue time)."""
    manifest = read_manifest(bundle)
    target = choose_target(manifest, config.target, bundle)
    name = _name(config.name or manifest.model_name)
    labels = {"app.kubernetes.io/name": name}
    container = _container(config, "/bundle", target, 0.0)
    container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", f"{config.drain_delay_s:g}"]}}}

    def meta(extra: dict[str, Any] | None = None) -> dict[str, Any]:
        out = {"name": name, "labels": dict(labels), **(extra or {})}
        if config.namespace:
            out["namespace"] = config.namespace
        return out

    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(),
        "spec": {"replicas": config.min_replicas, "selector": {"matchLabels": labels},
                 "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                 "template": {"metadata": {"labels": labels, "annotations": {
                     "prometheus.io/scrape": "true", "prometheus.io/port": str(config.port),
                     "prometheus.io/path": "/metrics", "optimize/target": target}},
                     "spec": {"terminationGracePeriodSeconds": _termination_s(config), "containers": [container]}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta(),
               "spec": {"selector": labels, "ports": [
                   {"name": "http", "port": config.port, "targetPort": "http", "protocol": "TCP"},
                   {"name": "grpc", "port": config.grpc_port, "targetPort": "h2c", "protocol": "TCP",
                    "appProtocol": "kubernetes.io/h2c"}]}}
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta(),
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                    "minReplicas": config.min_replicas, "maxReplicas": config.max_replicas,
                    "metrics": [{"type": "Pods", "pods": {
                        "metric": {"name": QUEUE_METRIC},
                        "target": {"type": "AverageValue", "averageValue": f"{int(config.queue_target_s * 1000)}m"}}}],
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}}}
    return [deployment, service, hpa]


def to_yaml(documents: list[dict[str, Any]]) -> str:
    """Plain YAML: a value used twice is written twice, never as an anchor and alias."""
    import yaml

    class Plain(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return "---\n".join(yaml.dump(d, Dumper=Plain, sort_keys=False, default_flow_style=False) for d in documents)
