"""The batching loop on its own: grouping by input signature, max batch, max delay, overload, error
fan-out and drain, driven through a real ``Batcher`` with an engine whose calls the test holds open;
and the app answering an engine's failure with a 500 while logging its traceback once."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import numpy as np
import pytest

from optimize.inputs.specs import TensorSpec
from serve.app import InferenceApp
from serve.service import InferenceService
from serve.batching import Batcher, BatchingConfig, Overloaded
from serve.metrics import ServerMetrics
from serve.model import ServedModel

HOLD_S = 5.0  # the longest a test keeps the engine busy; every wait below is far shorter


class HeldEngine:
    """A Runner that doubles its input and records each call's batch; ``hold()`` makes calls wait
    until ``release()`` (in the engine's worker thread, never the event loop)."""

    inputs = [TensorSpec("x", (-1, 4))]
    outputs = [TensorSpec("y", (-1, 4))]
    settings: dict = {}

    def __init__(self, fail: Exception | None = None):
        self.calls: list[dict[str, tuple]] = []
        self.started = threading.Event()
        self._open = threading.Event()
        self._open.set()
        self.fail = fail

    def hold(self) -> None:
        self._open.clear()
        self.started.clear()

    def release(self) -> None:
        self._open.set()

    def infer(self, feeds):
        self.calls.append({name: array.shape for name, array in feeds.items()})
        self.started.set()
        assert self._open.wait(HOLD_S), "the test never released the engine"
        if self.fail is not None:
            raise self.fail
        return {"y": feeds["x"] * 2}

    def close(self) -> None:
        pass


def rows(n: int, width: int = 4, start: float = 0.0) -> dict[str, np.ndarray]:
    return {"x": (np.arange(n * width, dtype=np.float32).reshape(n, width) + start)}


async def started(engine: HeldEngine) -> None:
    """Wait, without blocking the loop, until the engine is inside a call."""
    deadline = time.monotonic() + HOLD_S
    while not engine.started.is_set():
        assert time.monotonic() < deadline, "the engine was never called"
        await asyncio.sleep(0.001)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 20))


async def busy(config: BatchingConfig, engine: HeldEngine | None = None):
    """A started batcher whose one engine is held inside a first one-row call:
    (engine, batcher, that call's future). Whatever is sent next queues."""
    engine = engine or HeldEngine()
    batcher = Batcher([engine], config)
    batcher.start()
    engine.hold()
    first = asyncio.ensure_future(batcher.infer(rows(1)))
    await started(engine)
    return engine, batcher, first


def test_requests_stack_only_with_the_same_signature_and_get_their_own_rows():
    async def main():
        engine, batcher, first = await busy(BatchingConfig(max_batch=8))  # the next three queue behind it
        a = asyncio.ensure_future(batcher.infer(rows(2, start=100)))
        b = asyncio.ensure_future(batcher.infer(rows(1, width=6)))
        c = asyncio.ensure_future(batcher.infer(rows(3, start=200)))
        await asyncio.sleep(0.01)
        engine.release()
        results = await asyncio.gather(first, a, b, c)
        batcher.close()
        return engine.calls, results

    calls, (first, a, b, c) = run(main())
    assert [call["x"] for call in calls] == [(1, 4), (5, 4), (1, 6)]  # a and c together, b alone
    np.testing.assert_array_equal(a["y"], rows(2, start=100)["x"] * 2)
    np.testing.assert_array_equal(c["y"], rows(3, start=200)["x"] * 2)
    assert b["y"].shape == (1, 6) and first["y"].shape == (1, 4)


def test_token_inputs_of_any_length_batch_together_padded_to_the_longest():
    async def main():
        engine = HeldEngine()
        batcher = Batcher([engine], BatchingConfig(max_batch=8), pad={"x": -1})
        batcher.start()
        engine.hold()
        first = asyncio.ensure_future(batcher.infer(rows(1)))
        await started(engine)
        a = asyncio.ensure_future(batcher.infer(rows(2, width=3, start=100)))
        b = asyncio.ensure_future(batcher.infer(rows(1, width=6, start=200)))
        await asyncio.sleep(0.01)
        engine.release()
        results = await asyncio.gather(first, a, b)
        batcher.close()
        return engine.calls, results

    calls, (_, a, b) = run(main())
    assert [call["x"] for call in calls] == [(1, 4), (3, 6)]  # lengths 3 and 6 in one call of length 6
    np.testing.assert_array_equal(a["y"][:, :3], rows(2, width=3, start=100)["x"] * 2)
    assert (a["y"][:, 3:] == -2).all()  # the padding, doubled by this engine
    np.testing.assert_array_equal(b["y"], rows(1, width=6, start=200)["x"] * 2)


def test_batches_never_exceed_max_batch_rows():
    async def main():
        engine, batcher, first = await busy(BatchingConfig(max_batch=4, queue_capacity=32))
        queued = [asyncio.ensure_future(batcher.infer(rows(n, start=10 * i))) for i, n in enumerate([1, 2, 3, 1, 4, 2])]
        await asyncio.sleep(0.01)
        engine.release()
        results = await asyncio.gather(first, *queued)
        batcher.close()
        return engine.calls, results

    calls, results = run(main())
    sizes = [call["x"][0] for call in calls]
    assert max(sizes) <= 4 and sum(sizes) == 1 + 13
    assert sizes[1:] == [4, 3, 4, 2]  # oldest first, then whatever still fits: (1+2+1) (3) (4) (2)
    for i, (n, result) in enumerate(zip([1, 2, 3, 1, 4, 2], results[1:])):
        np.testing.assert_array_equal(result["y"], rows(n, start=10 * i)["x"] * 2)


def test_max_delay_holds_a_part_full_batch_for_company_only_while_an_engine_is_busy():
    async def scenario(delay_s: float):
        busy, spare = HeldEngine(), HeldEngine()
        batcher = Batcher([busy, spare], BatchingConfig(max_batch=8, max_delay_s=delay_s, instances=2))
        batcher.start()
        busy.hold()
        first = asyncio.ensure_future(batcher.infer(rows(1)))
        await started(busy)  # one engine busy, the other free
        second = asyncio.ensure_future(batcher.infer(rows(1, start=1)))
        await asyncio.sleep(0.02)  # well inside a 0.5 s delay
        third = asyncio.ensure_future(batcher.infer(rows(1, start=2)))
        await asyncio.gather(second, third)
        busy.release()
        await first
        batcher.close()
        return [call["x"][0] for call in spare.calls]

    assert run(scenario(0.5)) == [2]  # the second waited for the third: one call of two rows
    assert run(scenario(0.0)) == [1, 1]  # no delay: the free engine took each at once


def test_a_full_queue_rejects_at_once_while_the_engine_is_busy():
    async def main():
        engine, batcher, running = await busy(BatchingConfig(max_batch=1, queue_capacity=2))
        waiting = [asyncio.ensure_future(batcher.infer(rows(1))) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="queue is full"):
            await batcher.infer(rows(1))
        # "At once" as an ordering: answered while the engine is still held, so it waited for nothing.
        still_busy = not engine._open.is_set()
        engine.release()
        await asyncio.gather(running, *waiting)
        batcher.close()
        return still_busy

    assert run(main())


def test_an_engine_error_reaches_every_request_of_its_batch_and_the_loop_goes_on():
    async def main():
        engine, batcher, first = await busy(BatchingConfig(max_batch=8), HeldEngine(fail=RuntimeError("kernel exploded")))
        batch = [asyncio.ensure_future(batcher.infer(rows(1))) for _ in range(3)]
        await asyncio.sleep(0.01)
        engine.release()
        outcomes = await asyncio.gather(first, *batch, return_exceptions=True)
        engine.fail = None
        after = await batcher.infer(rows(2))
        batcher.close()
        return engine.calls, outcomes, after

    calls, outcomes, after = run(main())
    assert [c["x"][0] for c in calls] == [1, 3, 2]
    assert all(isinstance(o, RuntimeError) and "exploded" in str(o) for o in outcomes)
    assert after["y"].shape == (2, 4)


def test_drain_waits_for_queued_work_and_says_when_it_ran_out_of_time():
    async def main():
        engine, batcher, first = await busy(BatchingConfig(max_batch=1))
        pending = [first] + [asyncio.ensure_future(batcher.infer(rows(1))) for _ in range(2)]
        timed_out = await batcher.drain(0.05)
        asyncio.get_running_loop().call_later(0.05, engine.release)
        drained = await batcher.drain(HOLD_S)
        done = all(p.done() and not p.exception() for p in pending)
        batcher.close()
        return timed_out, drained, done, batcher.queued, batcher.busy

    timed_out, drained, done, queued, running = run(main())
    assert (timed_out, drained, done, queued, running) == (False, True, True, 0, 0)


async def _post(app: InferenceApp, body: bytes) -> tuple[int, dict]:
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer", "headers": []}
    await app(scope, receive, send)
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_engine_failure_is_a_500_logged_with_its_traceback_once(caplog):
    engine = HeldEngine(fail=ValueError("bad kernel state"))
    model = ServedModel("m", "v1", "ort-fp32", "fp32", [TensorSpec("x", (-1, 4))],
                        [{"name": "y", "shape": [-1, 4], "dtype": "float32"}], max_batch=8)

    async def main():
        batcher = Batcher([engine], BatchingConfig())
        batcher.start()
        app = InferenceApp(InferenceService(model, batcher, ServerMetrics("m", "v1", "ort-fp32", "fp32", "b", 64)))
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                       "data": [0.0, 1.0, 2.0, 3.0]}]}).encode()
        answers = [await _post(app, body) for _ in range(3)]
        batcher.close()
        return answers

    with caplog.at_level(logging.ERROR, logger="serve"):
        answers = run(main())
    assert all(status == 500 for status, _ in answers)
    assert "bad kernel state" in answers[0][1]["error"]
    logged = [r for r in caplog.records if "bad kernel state" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
