"""``optimize search``: the accuracy/latency frontier over pruning, precision, INT8 scheme,
calibration, backend and threads (Ray Tune runs the trials, Optuna proposes them, MLflow records
them). ``optimize.search.runner.run_search`` is the entry point; the CLI only builds its plan."""
