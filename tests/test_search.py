"""``optimize search`` end to end: a local Ray runs the trials, a real MLflow tracking server (SQLite
on loopback) records them, and the runs are read back with ``MlflowClient``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support import free_port, run_cli, run_process, wait_for

pytest.importorskip("ray.tune", reason="optimize[search] is not installed")
pytest.importorskip("mlflow", reason="optimize[search] is not installed")
pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    import urllib.request

    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    process = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                                "--port", str(port), "--workers", "1",
                                "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                                "--artifacts-destination", str(folder / "artifacts")],
                               stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"))
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, (folder / "server.log").read_text()[-2000:]
        try:
            return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 120, "the MLflow server", every_s=0.5)
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)


# Judged as regression (max abs error) within 1e-4: the FP32 engine passes, INT8 and the pruned
# model (not recovered) fail their gate, deterministically.
STRICT = ("--task", "regress", "--max-accuracy-drop", "0.0001")


def search_args(tiny: dict, out: Path, *extra: str) -> list[str]:
    return ["search", tiny["ckpt"], "--arch", tiny["arch"], "--calib", tiny["calib"], "--name", "tiny",
            "--target", "ort-fp32,ort-int8", "--prune", "0,0.9", "--int8-scheme", "static", "--calib-method",
            "minmax", "--recover-steps", "0", "--duration", "0.3s", "--rounds", "2", "--out", out, *extra]


def test_search_records_every_trial_in_mlflow(tiny_checkpoint, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "best"
    result = run_process(*search_args(tiny_checkpoint, out, *STRICT, "--mlflow", mlflow_server), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    search = json.loads((tmp_path / "best.search" / "trials.json").read_text())
    records = {r["key"]: r for r in search["trials"]}
    assert len(records) == 4
    failed = [r for r in records.values() if r["status"] == "failed"]
    assert len(failed) == 3 and all("accuracy gate" in r["reason"] for r in failed)
    # Each trial's build logs to its own build.log, and only there: not through Ray to this console.
    for key in records:
        assert "building ort-" in (tmp_path / "best.search" / "trials" / key / "build.log").read_text()
    assert "building ort-" not in result.stderr and "NOT recovered" not in result.stderr, result.stderr[-2000:]
    measured = [r for r in records.values() if r["status"] == "ok"]
    assert [r["label"] for r in measured] == ["ort-fp32, prune 0, all threads"]
    assert all(r["node"]["id"] and r["torch_p50_ms"] > 0 and r["speedup_vs_torch"] > 0 for r in measured)
    # No benchmark overlapped a build or another benchmark.
    for r in measured:
        for other in records.values():
            if other is not r:
                for span in ("build", "bench"):
                    if other.get(span):
                        assert other[span]["end"] <= r["bench"]["start"] or other[span]["start"] >= r["bench"]["end"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["search"]["trial"] == search["winner"]["key"]
    assert manifest["winner"]["target"] == records[search["winner"]["key"]]["config"]["target"]
    assert (out / "search" / "report.md").is_file() and (tmp_path / "best.search" / "frontier.png").is_file()
    assert "## Frontier" in (tmp_path / "best.search" / "report.md").read_text()
    assert run_cli("inspect", out).returncode == 0
    # The winner's page is refreshed: it names the search's choice and shows its frontier.
    page = (out / "report.html").read_text()
    assert "<h2>Search</h2>" in page and f"<b>{manifest['winner']['target']}</b>" in page

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("optimize")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("optimize.kind") == "search"]
    assert len(parents) == 1
    assert {"report.md", "frontier.png", "trials.json"} <= {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["trial"] for r in children) == sorted(records)
    for child in children:
        record = records[child.data.tags["trial"]]
        assert child.data.tags["status"] == record["status"]
        assert child.data.params["trial.target"] == record["config"]["target"]
        assert child.data.tags["code_fingerprint"] == manifest["versions"]["optimize_code"]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"record.json", "build.log"} <= artifacts
        if record["status"] == "ok":
            assert "manifest.json" in artifacts and child.data.metrics["latency_p50_ms"] > 0
            assert child.info.status == "FINISHED"
        else:
            assert child.info.status == "FAILED" and "accuracy gate" in child.data.tags["reason"]


def test_interrupted_search_reuses_finished_trials(tiny_checkpoint, tmp_path):
    out = tmp_path / "best"
    # Three trials of a four-configuration space: Optuna proposes them, its study kept in SQLite.
    args = [sys.executable, "-m", "optimize", *map(str, search_args(tiny_checkpoint, out, "--parallel", "1",
                                                                    "--trials", "3"))]
    trials = tmp_path / "best.search" / "trials"
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    try:
        wait_for(lambda: len(list(trials.glob("*/record.json"))) >= 2 or process.poll() is not None, 600,
                 "two finished trials", every_s=0.2)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-3000:]
    finished = {p.parent.name: p.stat().st_mtime for p in trials.glob("*/record.json")}
    assert 2 <= len(finished) < 3, stderr[-3000:]
    assert not out.exists()  # no winner was written from half a search
    result = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(finished)} finished trial(s) are reused" in result.stderr
    search = json.loads((tmp_path / "best.search" / "trials.json").read_text())
    assert {r["key"] for r in search["trials"]} >= set(finished)
    import optuna

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'best.search' / 'study.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 3  # the first run's trials are in the reloaded study, and the one it added
    for record in search["trials"]:
        if record["key"] in finished:
            assert record["reused"] is False  # the record as first written, not rebuilt
            assert (trials / record["key"] / "record.json").stat().st_mtime == finished[record["key"]]
    assert (out / "manifest.json").is_file()


def test_missing_extra_names_it(monkeypatch):
    from optimize.search import runner

    monkeypatch.setattr(runner, "_importable", lambda module: module != "optuna")
    with pytest.raises(runner.SearchExtraMissing, match=r"pip install 'optimize\[search\]'"):
        runner.require_extras()


def test_build_and_bench_record_a_run_each(tiny_checkpoint, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from support import build_tiny

    bundle = build_tiny(tiny_checkpoint, tmp_path / "bundle", "--target", "ort-fp32", "--mlflow", mlflow_server)
    benched = run_cli("bench", bundle, "--batch-sizes", "1", "--concurrency", "1", "--rate", "50",
                      "--duration", "0.5s", "--rounds", "1", "--no-cross-check", "--mlflow", mlflow_server)
    assert benched.returncode == 0, benched.stderr[-3000:]
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("optimize")
    mine = [r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("bundle") == str(bundle.resolve())]
    kinds = {r.data.tags["optimize.kind"]: r for r in mine}
    assert set(kinds) == {"build", "bench"}
    assert kinds["build"].data.metrics["ort-fp32.size_bytes"] > 0
    assert kinds["bench"].data.metrics["ort-fp32.batch_1.p50_ms"] > 0
    assert "report.md" in {a.path for a in client.list_artifacts(kinds["bench"].info.run_id)}


def test_search_runs_on_an_existing_ray_cluster(tiny_checkpoint, tmp_path):
    """``--ray-address``: the same search on a Ray head started apart (``ray start --block``)."""
    port = free_port()
    ray = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen([ray, "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--object-store-memory", str(100 << 20), "--include-dashboard", "false",
                             "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out = tmp_path / "best"
        args = search_args(tiny_checkpoint, out, "--ray-address", f"127.0.0.1:{port}")
        args[args.index("0,0.9")] = "0"
        args[args.index("ort-fp32,ort-int8")] = "ort-fp32"
        result = wait_for(lambda: _run_when_up(args), 120, "the Ray head", every_s=1)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"the cluster at 127.0.0.1:{port}" in result.stderr
        record = json.loads((tmp_path / "best.search" / "trials.json").read_text())["trials"][0]
        assert record["status"] == "ok" and record["node"]["id"]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def _run_when_up(args: list) -> subprocess.CompletedProcess | None:
    result = run_process(*args, timeout=600)
    if result.returncode != 0 and "cannot reach the Ray cluster" in result.stderr:
        return None  # the head is still starting
    return result


def test_a_sqlite_store_keeps_artifacts_beside_it_not_in_the_current_folder(tiny_checkpoint, tmp_path, monkeypatch):
    """MLflow's default artifact root for a database store is ``./mlruns`` of the current folder."""
    from mlflow.tracking import MlflowClient

    from support import build_tiny

    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    store = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    (tmp_path / "runs").mkdir()
    build_tiny(tiny_checkpoint, tmp_path / "bundle", "--target", "ort-fp32", "--mlflow", store)
    assert list(work.iterdir()) == []
    experiment = MlflowClient(tracking_uri=store).get_experiment_by_name("optimize")
    assert experiment.artifact_location == (tmp_path / "runs" / "mlflow-artifacts").as_uri()
    assert list((tmp_path / "runs" / "mlflow-artifacts").rglob("manifest.json"))
