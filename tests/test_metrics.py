"""The server's metrics against exact exposition text, on a fresh registry."""

from serve.metrics import ServerMetrics

EXPECTED_COUNTERS = '''# HELP inference_requests_total Inference requests by protocol and outcome.
# TYPE inference_requests_total counter
inference_requests_total{model="digits",outcome="ok",protocol="http",version="abc123"} 2.0
inference_requests_total{model="digits",outcome="client_error",protocol="http",version="abc123"} 1.0
inference_requests_total{model="digits",outcome="rejected",protocol="http",version="abc123"} 0.0
inference_requests_total{model="digits",outcome="server_error",protocol="http",version="abc123"} 0.0
inference_requests_total{model="digits",outcome="ok",protocol="grpc",version="abc123"} 0.0
inference_requests_total{model="digits",outcome="client_error",protocol="grpc",version="abc123"} 0.0
inference_requests_total{model="digits",outcome="rejected",protocol="grpc",version="abc123"} 0.0
inference_requests_total{model="digits",outcome="server_error",protocol="grpc",version="abc123"} 1.0
'''

EXPECTED_BATCH = '''# HELP inference_batch_size Rows per engine call.
# TYPE inference_batch_size histogram
inference_batch_size_bucket{le="1.0",model="digits",version="abc123"} 1.0
inference_batch_size_bucket{le="2.0",model="digits",version="abc123"} 1.0
inference_batch_size_bucket{le="4.0",model="digits",version="abc123"} 2.0
inference_batch_size_bucket{le="8.0",model="digits",version="abc123"} 2.0
inference_batch_size_bucket{le="16.0",model="digits",version="abc123"} 2.0
inference_batch_size_bucket{le="32.0",model="digits",version="abc123"} 2.0
inference_batch_size_bucket{le="64.0",model="digits",version="abc123"} 2.0
inference_batch_size_bucket{le="128.0",model="digits",version="abc123"} 2.0
inference_batch_size_bucket{le="+Inf",model="digits",version="abc123"} 2.0
inference_batch_size_count{model="digits",version="abc123"} 2.0
inference_batch_size_sum{model="digits",version="abc123"} 4.0
'''

EXPECTED_GAUGES = '''# HELP inference_requests_in_flight Requests being handled now.
# TYPE inference_requests_in_flight gauge
inference_requests_in_flight{model="digits",version="abc123"} 0.0
# HELP inference_queue_capacity Requests the queue holds before rejecting.
# TYPE inference_queue_capacity gauge
inference_queue_capacity{model="digits",version="abc123"} 64.0
# HELP model_info The model served (always 1); content_hash: what answers requests.
# TYPE model_info gauge
model_info{bundle="bundle",content_hash="",model="digits",precision="int8",target="openvino-int8",version="abc123"} 1.0
'''

EXPECTED_NON_FINITE = '''# HELP inference_non_finite_samples_total Samples holding NaN or an infinity, in their inputs (answered, or refused with --reject-non-finite) or in the engine's outputs.
# TYPE inference_non_finite_samples_total counter
inference_non_finite_samples_total{model="digits",tensor="input",version="abc123"} 3.0
inference_non_finite_samples_total{model="digits",tensor="output",version="abc123"} 0.0
'''


def test_exposition_is_exactly_as_designed():
    metrics = ServerMetrics("digits", "abc123", "openvino-int8", "int8", "bundle", 64)
    metrics.finished("ok", 0.003)
    metrics.finished("ok", 0.2)
    metrics.finished("client_error", 0.0001)
    metrics.finished("server_error", 0.01, "grpc")
    metrics.computed(0.002, 1)
    metrics.computed(0.004, 3)
    metrics.queued(0.0007)
    metrics.non_finite_inputs.inc(3)
    text = metrics.render().decode()
    assert EXPECTED_COUNTERS in text
    assert EXPECTED_BATCH in text
    assert EXPECTED_GAUGES in text
    assert 'inference_request_duration_seconds_bucket{le="0.005",model="digits",protocol="http",version="abc123"} 1.0' in text
    assert 'inference_request_duration_seconds_count{model="digits",protocol="http",version="abc123"} 2.0' in text
    assert 'inference_request_duration_seconds_count{model="digits",protocol="grpc",version="abc123"} 0.0' in text
    assert 'inference_queue_duration_seconds_bucket{le="0.001",model="digits",version="abc123"} 1.0' in text
    assert 'inference_compute_duration_seconds_sum{model="digits",version="abc123"} 0.006' in text
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert families == {"inference_requests_total", "inference_request_duration_seconds", "inference_queue_duration_seconds",
                        "inference_compute_duration_seconds", "inference_batch_size", "inference_requests_in_flight",
                        "inference_queue_capacity", "inference_text_truncated_total",
                        "inference_non_finite_samples_total", "model_info"}
    assert EXPECTED_NON_FINITE in text
