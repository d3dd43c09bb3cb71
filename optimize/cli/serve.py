"""``optimize serve``."""

from __future__ import annotations

from pathlib import Path

import click

from optimize.errors import InputSpecError


@click.command("serve")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", help="Target to serve (default: the bundle's winner, else its first built target).")
@click.option("--reselect", is_flag=True,
              help="Time the built targets within the accuracy budget on this CPU at start-up and serve the fastest "
                   "(the winner stays unless another is faster beyond the measured spread).")
@click.option("--model-name", help="Name served under /v2/models/ (default: the manifest's model name).")
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", "--http-port", "port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="HTTP port (Open Inference Protocol, /metrics).")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True,
              help="gRPC port (Triton's inference.GRPCInferenceService and grpc.health.v1).")
@click.option("--no-http", is_flag=True, help="No HTTP front end (and so no /metrics).")
@click.option("--no-grpc", is_flag=True, help="No gRPC front end.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="What the server logs (to stderr): start-up, readiness, drain and a summary at info.")
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="Most rows per engine call (1: no batching). This and --max-delay-ms, --instances and --threads "
                   "default to what optimize tune recorded for the target (serving.json), else to these.")
@click.option("--max-delay-ms", type=float, default=0.0, show_default=True,
              help="How long a part-full batch may wait for company while engines are busy.")
@click.option("--queue-capacity", type=int, default=64, show_default=True,
              help="Requests waiting before new ones get 503 at once.")
@click.option("--instances", type=int, default=1, show_default=True, help="Engine instances fed by the batching loop.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="Threads per engine instance (0: the build's setting).")
@click.option("--untuned", is_flag=True, help="Ignore the bundle's tuned serving configuration (serving.json).")
@click.option("--max-body-mb", type=float, default=64, show_default=True, help="Largest request body (413 above).")
@click.option("--drain-delay", type=float, default=5.0, show_default=True,
              help="Seconds requests are still accepted after SIGTERM, with readiness false.")
@click.option("--grace", type=float, default=30.0, show_default=True, help="Seconds to finish queued work after SIGTERM.")
@click.option("--drift-window", type=click.IntRange(5, 100000), default=20, show_default=True,
              help="Samples per fast drift window; the long scales are sums of these.")
@click.option("--drift-scales", help="Samples per window of each scale, multiples of --drift-window "
              "(default: 1x, 10x and 100x it: 20,200,2000).")
@click.option("--drift-false-alarm-every", type=click.FloatRange(100, None), default=20000, show_default=True,
              help="Mean unshifted requests between false alarms, all scales together.")
@click.option("--drift-accuracy-drop", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Estimated accuracy this far below the reference's fires the alert rule (exported as "
                   "drift_accuracy_alert_drop).")
@click.option("--no-drift", is_flag=True, help="Do not monitor drift.")
@click.option("--access-log", is_flag=True,
              help="Log every request as one JSON line on stderr: time, client, method, route, status, duration_ms, "
                   "rows (and text_truncated, non_finite).")
@click.option("--reject-non-finite", is_flag=True,
              help="Answer 400 to a request whose inputs hold NaN or an infinity (default: answer it; such samples are "
                   "counted in inference_non_finite_samples_total and are a drift feature).")
def command(bundle: Path, target: str | None, model_name: str | None, host: str, port: int, grpc_port: int,
            no_http: bool, no_grpc: bool, max_batch: int,
            max_delay_ms: float, queue_capacity: int, instances: int, max_body_mb: float, drain_delay: float,
            grace: float, drift_window: int, drift_scales: str | None, drift_false_alarm_every: float,
            drift_accuracy_drop: float, no_drift: bool, log_level: str,
            access_log: bool, reselect: bool, reject_non_finite: bool, threads: int, untuned: bool) -> None:
    """Serve a bundle's engine over the Open Inference Protocol (KServe v2), HTTP and gRPC, with
    Prometheus metrics.

    \b
      optimize serve bundle/ --http-port 8000 --grpc-port 8001
      curl localhost:8000/v2/models/digits        # metadata
      curl localhost:8000/metrics                 # Prometheus
      grpc_health_probe -addr localhost:8001      # gRPC health (tritonclient.grpc infers on 8001)
    """
    import logging

    from serve.batching import BatchingConfig
    from serve.server import ServeConfig, serve

    from optimize.cli.console import hand_to_root

    hand_to_root()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if access_log:  # bare JSON lines, whatever --log-level says
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access = logging.getLogger("serve.access")
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False

    for flag, value in (("--max-batch", max_batch), ("--queue-capacity", queue_capacity), ("--instances", instances)):
        if value < 1:
            raise InputSpecError(f"{flag} {value} must be at least 1")
    if threads < 0:
        raise InputSpecError(f"--threads {threads} must not be negative")
    if not untuned and not reselect:
        max_batch, max_delay_ms, instances, threads = _tuned(bundle, target, max_batch, max_delay_ms, instances, threads)
    if no_http and no_grpc:
        raise InputSpecError("--no-http and --no-grpc together leave nothing to serve; drop one")
    if not no_http and not no_grpc and port == grpc_port:
        raise InputSpecError(f"--http-port and --grpc-port are both {port}; give them different ports")
    if max_delay_ms < 0 or drain_delay < 0 or grace < 0 or max_body_mb <= 0:
        raise InputSpecError("--max-delay-ms, --drain-delay and --grace must not be negative, --max-body-mb positive")
    try:
        scales = tuple(int(x) for x in drift_scales.split(",")) if drift_scales else None
    except ValueError:
        raise InputSpecError(f"--drift-scales {drift_scales!r}: give sample counts separated by commas, "
                             f"e.g. 20,200,2000") from None
    if scales and any(s % drift_window or s < drift_window for s in scales):
        raise InputSpecError(f"--drift-scales {drift_scales}: every scale must be a multiple of --drift-window "
                             f"{drift_window}")
    batching = BatchingConfig(max_batch=max_batch, max_delay_s=max_delay_ms / 1000, queue_capacity=queue_capacity,
                              instances=instances)
    serve(ServeConfig(bundle=bundle, target=target, model_name=model_name, host=host, port=None if no_http else port,
                      grpc_port=None if no_grpc else grpc_port, batching=batching,
                      max_body_bytes=int(max_body_mb * (1 << 20)), drain_delay_s=drain_delay, grace_s=grace,
                      drift=not no_drift, drift_window=drift_window, drift_scales=scales,
                      drift_false_alarm_every=drift_false_alarm_every, drift_accuracy_drop=drift_accuracy_drop,
                      access_log=access_log, reselect=reselect, reject_non_finite=reject_non_finite, threads=threads))


def _tuned(bundle: Path, target: str | None, max_batch: int, max_delay_ms: float, instances: int,
           threads: int) -> tuple[int, float, int, int]:
    """The flags not given on the command line, from the bundle's tuned configuration for the target
    served; a warning when it was tuned on another machine."""
    import logging

    from optimize.bundle.serving import ServingKnobs, measured_elsewhere
    from optimize.cli.serving_options import given, tuned_values

    asked = {"max_batch": max_batch, "max_delay_ms": max_delay_ms, "instances": instances, "threads": threads}
    picked, record = tuned_values(bundle, target, asked)
    if record is None:
        return max_batch, max_delay_ms, instances, threads
    log = logging.getLogger("serve")
    flags = given(asked)
    log.info("serving configuration tuned by optimize tune on %s (%s, p%g <= %g ms over %s)%s: %s",
             record["measured_on"].get("cpu"), record["created"], record["slo"]["percentile"], record["slo"]["ms"],
             record["protocol"], f"; flags given win: {', '.join(flags)}" if flags else "",
             ServingKnobs(picked["instances"], picked["threads"], picked["max_batch"], picked["max_delay_ms"]).label)
    changed = measured_elsewhere(record)
    if changed:
        log.warning("the serving configuration was tuned on %s and this machine differs: %s; it may not be the best "
                    "here (rerun optimize tune here, or --untuned)", record["measured_on"].get("cpu"), "; ".join(changed))
    return picked["max_batch"], picked["max_delay_ms"], picked["instances"], picked["threads"]
