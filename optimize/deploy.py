"""Kubernetes manifests for the serving image: a KServe InferenceService, or a plain
Deployment + Service + HorizontalPodAutoscaler.

Both speak the Open Inference Protocol on the container port, probe ``/v2/health/ready`` (readiness)
and ``/v2/health/live`` (liveness), and give the pod time to drain: SIGTERM turns readiness off and
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

from optimize.bundle import choose_target, read_manifest
from optimize.errors import InputSpecError

QUEUE_METRIC = "inference_queue_time_seconds"  # per pod, from prometheus-adapter


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


def _name(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-")
    if not name:
        raise InputSpecError(f"cannot make a Kubernetes name from {text!r}; pass --name")
    return name


def _container(config: DeployConfig, bundle_path: str, target: str, drain_delay_s: float,
               name: str = "server") -> dict[str, Any]:
    probe = {"httpGet": {"path": "/v2/health/ready", "port": config.port}, "periodSeconds": 5,
             "timeoutSeconds": 2, "failureThreshold": 3}
    resources: dict[str, Any] = {"requests": {"cpu": config.cpu, "memory": config.memory},
                                 "limits": {"memory": config.memory}}
    if config.gpus:
        resources["limits"]["nvidia.com/gpu"] = str(config.gpus)
    return {
        "name": name, "image": config.image,
        "command": ["optimize", "serve", bundle_path, "--host", "0.0.0.0", "--port", str(config.port),
                    "--target", target, "--drain-delay", f"{drain_delay_s:g}", "--grace", f"{config.grace_s:g}"],
        "ports": [{"name": "http", "containerPort": config.port, "protocol": "TCP"}],
        "readinessProbe": probe,
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": config.port}, "periodSeconds": 10,
                          "timeoutSeconds": 2, "failureThreshold": 3},
        "startupProbe": {"httpGet": {"path": "/v2/health/live", "port": config.port}, "periodSeconds": 2,
                         "failureThreshold": 60},
        "resources": resources,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "allowPrivilegeEscalation": False},
    }


def _termination_s(config: DeployConfig) -> int:
    return int(math.ceil(config.drain_delay_s + config.grace_s + 5))


def kserve_manifests(bundle: Path, config: DeployConfig) -> list[dict[str, Any]]:
    """One InferenceService running the serving image as a custom predictor container."""
    manifest = read_manifest(bundle)
    target = choose_target(manifest, config.target, bundle)
    name = _name(config.name or manifest.model_name)
    path = "/mnt/models" if config.storage_uri else "/bundle"
    container = _container(config, path, target, config.drain_delay_s, name="kserve-container")
    if config.storage_uri:
        container["env"] = [{"name": "STORAGE_URI", "value": config.storage_uri}]
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": name},
                                "annotations": {"serving.kserve.io/deploymentMode": "RawDeployment",
                                                "optimize/target": target}}
    if config.namespace:
        metadata["namespace"] = config.namespace
    predictor = {"minReplicas": config.min_replicas, "maxReplicas": config.max_replicas,
                 "scaleMetric": "concurrency", "scaleTarget": 8,
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
               "spec": {"selector": labels, "ports": [{"name": "http", "port": config.port,
                                                       "targetPort": "http", "protocol": "TCP"}]}}
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta(),
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                    "minReplicas": config.min_replicas, "maxReplicas": config.max_replicas,
                    "metrics": [{"type": "Pods", "pods": {
                        "metric": {"name": QUEUE_METRIC},
                        "target": {"type": "AverageValue", "averageValue": f"{int(config.queue_target_s * 1000)}m"}}}],
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}}}
    return [deployment, service, hpa]


def to_yaml(documents: list[dict[str, Any]]) -> str:
    import yaml

    return "---\n".join(yaml.safe_dump(d, sort_keys=False, default_flow_style=False) for d in documents)
