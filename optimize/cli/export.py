"""``optimize export triton``, ``kserve`` and ``perf-data``: hand a bundle to Triton or Kubernetes, and its
held-out samples to Triton's load generator."""

from __future__ import annotations

from pathlib import Path

import click

from optimize.errors import InputSpecError


@click.group("export")
def command() -> None:
    """Export a bundle for another server: a Triton model repository, Kubernetes manifests, or load data."""


@command.command("triton")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("repo", type=click.Path(path_type=Path))
@click.option("--target", help="Target to export (default: the winner, else the first built).")
@click.option("--name", help="Model name in the repository (default: the bundle's model name).")
@click.option("--max-batch", type=int, default=8, show_default=True, help="max_batch_size (TensorRT: at most its profile's).")
@click.option("--instances", type=int, default=1, show_default=True, help="Instances in the instance group.")
@click.option("--max-delay-ms", type=float, default=0.0, show_default=True, help="Dynamic batching queue delay.")
@click.option("--queue-capacity", type=int, default=64, show_default=True, help="Requests queued before rejecting.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="Threads per instance, as the backend's parameter (0: the backend's default).")
def triton(bundle: Path, repo: Path, target: str | None, name: str | None, max_batch: int, instances: int,
           max_delay_ms: float, queue_capacity: int, threads: int) -> None:
    """Write REPO/<model>/config.pbtxt and REPO/<model>/<version>/<engine> for Triton Inference Server.
    --max-batch, --instances, --max-delay-ms and --threads default to what optimize tune recorded
    for the target (serving.json).

    \b
      optimize export triton bundle/ model_repository/ --target ort-int8
      tritonserver --model-repository model_repository/
    """
    from optimize.cli.serving_options import tuned_values
    from optimize.deploy.triton import export_repository

    if max_batch < 1 or instances < 1 or max_delay_ms < 0 or queue_capacity < 1 or threads < 0:
        raise InputSpecError("--max-batch, --instances and --queue-capacity must be positive, --max-delay-ms and "
                             "--threads not negative")
    knobs, record = tuned_values(bundle, target, {"max_batch": max_batch, "instances": instances,
                                                  "max_delay_ms": max_delay_ms, "threads": threads})
    result = export_repository(bundle, repo, target, knobs["max_batch"], knobs["instances"],
                               knobs["max_delay_ms"] / 1000, queue_capacity, name, threads=knobs["threads"])
    for note in result["notes"]:
        click.echo(f"note: {note}", err=True)
    if record is not None:
        click.echo(f"note: serving configuration from {bundle / 'serving.json'} (optimize tune on "
                   f"{record['measured_on'].get('cpu')}): {record['label']}", err=True)
    click.echo(f"{result['target']} -> {result['path']} (config.pbtxt, {result['version']}/)")


@command.command("kserve")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--image", required=True, help="The serving image (built from this project's Dockerfile).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("k8s"), show_default=True,
              help="Folder for inferenceservice.yaml and deployment.yaml.")
@click.option("--name", help="Kubernetes name (default: from the model name).")
@click.option("--namespace", help="Namespace to set on every object.")
@click.option("--target", help="Target to serve (default: the winner, else the first built).")
@click.option("--storage-uri", help="KServe: fetch the bundle from here into /mnt/models (default: baked into the image at /bundle).")
@click.option("--cpu", default="2", show_default=True,
              help="CPU request (default with a tuned bundle: its instances x threads per instance).")
@click.option("--memory", default="2Gi", show_default=True, help="Memory request and limit.")
@click.option("--gpus", type=int, default=0, show_default=True, help="nvidia.com/gpu limit (TensorRT targets need 1).")
@click.option("--min-replicas", type=int, default=1, show_default=True)
@click.option("--max-replicas", type=int, default=4, show_default=True)
@click.option("--queue-target-ms", type=float, default=50.0, show_default=True,
              help="Mean queue time the autoscaler holds (the plain Deployment's HPA; KServe raw mode with KEDA).")
@click.option("--drain-delay", type=float, default=5.0, show_default=True, help="Seconds to keep serving after SIGTERM.")
@click.option("--grace", type=float, default=30.0, show_default=True, help="Seconds to finish queued work.")
@click.option("--mode", type=click.Choice(["raw", "serverless"]), default="raw", show_default=True,
              help="KServe deployment mode: raw (Deployment + HPA or KEDA, no Knative) or serverless (Knative, "
                   "scales on concurrency).")
@click.option("--autoscaler", type=click.Choice(["hpa", "keda"]), default="hpa", show_default=True,
              help="Raw mode: an HPA on CPU utilisation, or KEDA on the mean queue time from Prometheus.")
@click.option("--cpu-target", type=int, default=70, show_default=True, help="Raw mode with the HPA: CPU utilisation %.")
@click.option("--concurrency-target", type=int, default=8, show_default=True,
              help="Serverless mode: requests in flight per pod.")
@click.option("--prometheus-url", help="Raw mode with KEDA: the Prometheus KEDA queries for the queue time.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True,
              help="The InferenceService's one protocol (Knative routes one port); the plain Deployment has both.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="HTTP container port.")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8081, show_default=True,
              help="gRPC container port (h2c).")
def kserve(bundle: Path, image: str, out: Path, name: str | None, namespace: str | None, target: str | None,
           storage_uri: str | None, cpu: str, memory: str, gpus: int, min_replicas: int, max_replicas: int,
           queue_target_ms: float, drain_delay: float, grace: float, mode: str, autoscaler: str, cpu_target: int,
           concurrency_target: int, prometheus_url: str | None, protocol: str, port: int, grpc_port: int) -> None:
    """Write a KServe InferenceService (inferenceservice.yaml) and a plain Deployment, Service and
    HorizontalPodAutoscaler (deployment.yaml) that run the serving image on this bundle.

    \b
      optimize export kserve bundle/ --image registry.example.com/my-model:1 --out k8s/
      kubectl apply -f k8s/inferenceservice.yaml      # with KServe
      kubectl apply -f k8s/deployment.yaml            # without (autoscaling needs prometheus-adapter)
    """
    from optimize.deploy.kubernetes import DeployConfig, kserve_manifests, plain_manifests, to_yaml

    if port == grpc_port:
        raise InputSpecError(f"--port and --grpc-port are both {port}; give them different ports")
    if not 0 < min_replicas <= max_replicas or gpus < 0 or drain_delay < 0 or grace < 0 or queue_target_ms <= 0:
        raise InputSpecError("need 0 < --min-replicas <= --max-replicas, --gpus, --drain-delay and --grace not "
                             "negative, --queue-target-ms positive")
    from optimize.bundle.folder import choose_target, read_manifest

    from optimize.targets import registry

    target = choose_target(read_manifest(bundle), target, bundle)
    from optimize.bundle.serving import tuned_knobs

    tuned = tuned_knobs(bundle, target)
    source = click.get_current_context().get_parameter_source("cpu")
    if tuned is not None and tuned.threads and source is click.core.ParameterSource.DEFAULT:
        cpu = str(tuned.instances * tuned.threads)  # the cores the tuned engines were measured with
        click.echo(f"note: CPU request {cpu}: {tuned.label} (serving.json, which the served bundle also carries)",
                   err=True)
    if registry.facts(target).needs_gpu_to_serve and gpus == 0:
        gpus = 1  # e.g. a TensorRT engine needs its GPU
    config = DeployConfig(image, name, namespace, target, storage_uri, cpu, memory, gpus, min_replicas, max_replicas,
                          queue_target_ms / 1000, drain_delay, grace, mode=mode, autoscaler=autoscaler,
                          cpu_target_pct=cpu_target, concurrency_target=concurrency_target,
                          prometheus_url=prometheus_url, port=port, grpc_port=grpc_port, protocol=protocol)
    config.check()
    files = {"inferenceservice.yaml": to_yaml(kserve_manifests(bundle, config)),
             "deployment.yaml": to_yaml(plain_manifests(bundle, config))}
    from optimize import atomic

    for file, text in files.items():
        atomic.write_text(out / file, text)
        click.echo(str(out / file))


@command.command("perf-data")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--rows", type=int, default=64, show_default=True, help="Held-out samples to write (at most all).")
def perf_data(bundle: Path, out: Path, rows: int) -> None:
    """Write the bundle's held-out samples as perf_analyzer's --input-data JSON, so a load test sends
    real inputs (perf_analyzer's default random bytes hold NaN and inf and values no real input has).

    \b
      optimize export perf-data bundle/ perf.json
      perf_analyzer -m digits -u localhost:8000 --input-data perf.json --concurrency-range 1:8
    """
    from optimize.deploy.perf_data import write_perf_data

    count = write_perf_data(bundle, out, rows)
    click.echo(f"{count} held-out samples -> {out}")
