"""The build: a ``BuildPlan`` executed once by ``run_build``.

plan -> prepare (load, fit the data, split, reference outputs) -> prune (optional) -> export
(checked against PyTorch) -> per target: build the engine, gate it on accuracy, recover -> bundle.
Each stage takes its own typed config and the artifacts it needs and returns a typed record.
Choosing a winner is not part of the build: ``optimize.auto`` benchmarks a built bundle and picks.
"""
