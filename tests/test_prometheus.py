"""A real Prometheus scrapes two real servers; PromQL aggregates them; every dashboard query runs.

Prometheus (Debian's package, installed by scripts/test.sh) listens on loopback and scrapes two
``optimize serve`` processes every second. Known traffic goes to each (some of it shifted, some of
it malformed), then PromQL checks that request counts, latency quantiles from the histograms and
the drift series add up across the replicas, and every panel query of the Grafana dashboard in
``deploy/grafana`` runs and returns data. The queries and their results are printed (``-s``).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from support import HALF_HELD_OUT, Server, free_port, http, stop_process, wait_for, wait_ready

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.service,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="the prometheus server is not installed (scripts/test.sh installs Debian's)")]

# 60 reference samples and windows of 10: a fast window alarms at 10 / (3 x 300) per window,
# often enough to see an alarm in a short test (the default, a false alarm per 20,000, is not).
SMALL_DRIFT = ("--drift-window", "10", "--drift-false-alarm-every", "300")


class Prometheus:
    def __init__(self, folder: Path, targets: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "optimize", "scrape_interval": "1s", "scrape_timeout": "900ms",
                                      "static_configs": [{"targets": targets}]}]}
        (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_ready(self.process, self.url + "/-/ready", "prometheus", on_failure=self.stop)

    def query(self, expr: str) -> list[dict]:
        status, body, _ = http("GET", f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def stop(self) -> None:
        stop_process(self.process, signal.SIGTERM, 30)

    def __enter__(self) -> "Prometheus":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def bundle(bundles, tiny_checkpoint):
    return bundles.get(*HALF_HELD_OUT, calib=tiny_checkpoint["calib_labelled"])


def test_prometheus_aggregates_two_servers_and_runs_the_dashboard(bundle, tmp_path):
    held = np.load(bundle / "data" / "heldout.npz")["x"]
    shown: list[tuple[str, str]] = []
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(Server(bundle, *SMALL_DRIFT)) for _ in range(2)]
        prometheus = stack.enter_context(Prometheus(tmp_path, [s.url[len("http://"):] for s in servers]))
        try:
            def send(server, x) -> int:
                body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                               "data": x.reshape(-1).tolist()}]}).encode()
                return http("POST", server.url + "/v2/models/tiny/infer", body)[0]

            deadline = time.time() + 30  # both replicas scraped once before any traffic: rates start from zero
            while not prometheus.query('count(up{job="optimize"} == 1) == 2') and time.time() < deadline:
                time.sleep(0.3)
            # Spread over a few seconds of 1 s scrapes, so every rate() has points before and after.
            for i in range(30):  # replica 0: three windows of held-out samples, and two malformed requests;
                assert send(servers[0], held[i % len(held)][None]) == 200  # replica 1: two windows as served,
                if i < 20:                                                 # then one of shifted inputs
                    assert send(servers[1], held[i % len(held)][None]) == 200
                else:
                    assert send(servers[1], held[i % len(held)][None] + 3.0) == 200
                if i in (10, 20):
                    assert send(servers[0], np.zeros((1, 3, 8, 8), np.float32)) == 400
                time.sleep(0.15)

            def settled(expr: str, want: float) -> float:
                deadline = time.time() + 30
                while True:
                    result = prometheus.query(expr)
                    got = float(result[0]["value"][1]) if result else math.nan
                    if got == want or time.time() > deadline:
                        return got
                    time.sleep(0.5)

            def check(expr: str, got) -> None:
                shown.append((expr, json.dumps(got)))

            assert settled('sum(inference_requests_total{outcome="ok"})', 60) == 60

            def scrapes() -> list[float]:
                return sorted(float(r["value"][1]) for r in prometheus.query('count_over_time(up{job="optimize"}[10m])'))

            after = scrapes()  # two more scrapes of each replica, so rate() has points after the traffic
            wait_for(lambda: len(scrapes()) == 2 and all(n >= a + 2 for n, a in zip(scrapes(), after)), 30,
                     "two more scrapes of each replica")
            check('sum(inference_requests_total{outcome="ok"})', 60)
            assert prometheus.value('count(up{job="optimize"} == 1)') == 2
            check('count(up{job="optimize"} == 1)', 2)
            per_replica = {r["metric"]["instance"]: float(r["value"][1]) for r in
                           prometheus.query('sum by (instance) (inference_requests_total{outcome="ok"})')}
            assert sorted(per_replica.values()) == [30, 30]
            check('sum by (instance) (inference_requests_total{outcome="ok"})', per_replica)
            assert prometheus.value('sum(inference_requests_total{outcome="client_error"})') == 2
            check('sum(inference_requests_total{outcome="client_error"})', 2)

            # Latency quantiles from the histograms, across replicas and per replica.
            fleet_p50 = prometheus.value("histogram_quantile(0.5, sum by (le) (inference_request_duration_seconds_bucket))")
            each = [float(r["value"][1]) for r in prometheus.query(
                "histogram_quantile(0.5, sum by (le, instance) (inference_request_duration_seconds_bucket))")]
            assert len(each) == 2 and 0 < min(each) <= fleet_p50 <= max(each) < 1.0, (fleet_p50, each)
            check("histogram_quantile(0.5, sum by (le) (inference_request_duration_seconds_bucket))", fleet_p50)
            check("histogram_quantile(0.5, sum by (le, instance) (inference_request_duration_seconds_bucket))", each)
            fleet_p99 = prometheus.value("histogram_quantile(0.99, sum by (le) (inference_request_duration_seconds_bucket))")
            assert fleet_p50 <= fleet_p99 < 1.0
            check("histogram_quantile(0.99, sum by (le) (inference_request_duration_seconds_bucket))", fleet_p99)
            batches = prometheus.value("sum(inference_batch_size_count)")
            assert 0 < batches <= 60 + 2 * 3  # engine calls: the 60 requests (some batched) and 3 warm-up calls per replica
            check("sum(inference_batch_size_count)", batches)

            # Drift: windows of 10 samples on each replica, summed; the shifted window alarms.
            assert prometheus.value("sum(drift_samples_total)") == 60
            check("sum(drift_samples_total)", 60)
            assert prometheus.value("sum(drift_windows_total)") == 6
            check("sum(drift_windows_total)", 6)
            alarms = {r["metric"]["instance"]: float(r["value"][1])
                      for r in prometheus.query("sum by (instance) (drift_alarms_total)")}
            assert alarms[servers[1].url[len("http://"):]] >= 1, alarms
            check("sum by (instance) (drift_alarms_total)", alarms)
            estimate = prometheus.query('avg by (scale) (drift_estimated_accuracy{scale="10"})')
            assert len(estimate) == 1 and 0 <= float(estimate[0]["value"][1]) <= 1, estimate
            check('avg by (scale) (drift_estimated_accuracy{scale="10"})', estimate[0]["value"][1])
            fleet_estimate = prometheus.value("sum(drift_expected_correct_total) / sum(drift_samples_total)")
            assert 0 <= fleet_estimate <= 1
            check("sum(drift_expected_correct_total) / sum(drift_samples_total)", fleet_estimate)
            features = prometheus.value("count(count by (feature) (drift_bin_samples_total))")
            assert prometheus.value("sum(drift_bin_samples_total)") == 60 * features
            check("sum(drift_bin_samples_total) / count(count by (feature) (drift_bin_samples_total))", 60)

            # Every query of the dashboard runs and returns data.
            dashboard = json.loads((ROOT / "deploy" / "grafana" / "optimize-serving.json").read_text())
            queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
            assert len(queries) >= 15
            for expr in queries:
                concrete = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
                values = [float(r["value"][1]) for r in prometheus.query(concrete)]
                assert any(math.isfinite(v) for v in values), f"dashboard query gave no number: {concrete} -> {values}"
                check(concrete, [round(v, 6) for v in values])
            per_protocol = {r["metric"]["protocol"]: float(r["value"][1]) for r in prometheus.query(
                queries[0].replace("$__rate_interval", "1m").replace("$model", ".*"))}
            assert set(per_protocol) == {"http", "grpc"} and per_protocol["http"] > 0 and per_protocol["grpc"] == 0

            # The autoscaling metric of the plain Kubernetes variant: prometheus-adapter's query, per replica.
            import yaml

            rule = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter" / "rules.yaml").read_text())["rules"][0]
            adapter = rule["metricsQuery"].replace("<<.GroupBy>>", "instance").replace("<<.LabelMatchers>>", 'job="optimize"')
            queue = [float(r["value"][1]) for r in prometheus.query(adapter)]
            assert len(queue) == 2 and all(math.isfinite(v) and v >= 0 for v in queue), queue  # a number per replica
            check(adapter.strip(), queue)
        finally:
            print("\nPromQL checked against a real Prometheus scraping two servers:")
            for expr, got in shown:
                print(f"  {expr}\n    -> {got}")
