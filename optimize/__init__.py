"""Take a trained PyTorch model to a measured, deployable inference engine.

Importing this package imports no inference backend and no torch: every backend is
imported inside the function that needs it (see ``optimize.targets.registry``).

What it is made of, top to bottom. A module imports only from layers below its own (inside
functions too); groups on one line are siblings that do not import each other. A test
(``tests/test_layers.py``) holds the code to this list.

    __main__                          ``python -m optimize``
    cli                               one file per command: flags -> configs; owns the console
    search                            many builds as trials (Ray Tune, Optuna, MLflow)
    auto                              build, then benchmark and pick the winner (--target auto)
    build | tune | serve (top-level)  the build's stages | the serving configuration, measured | the server
    bench | deploy | inspect          measuring engines, load models, reports | Triton, Kubernetes | per-layer error
    select | drift                    the winner's rule | drift profiles and tests
    bundle                            the bundle folder, the typed manifest, the stage cache
    targets                           Backend and Runner contracts, the registry, one module per backend
    passes                            graph passes: prune, distill, ONNX export, precision
    validate                          the accuracy gate and evaluation against the FP32 model
    inputs                            checkpoints, calibration data, tensor specs, tokenizers
    environment | quiet | atomic | plots | oip   versions and machine | third-party noise | atomic writes | figures | gRPC messages
    cpu | errors                      the CPU's facts | the error families
"""

import logging

__version__ = "0.2.0"

# The library logs and never prints: without a handler of the application's, nothing is shown
# (the CLI installs its console; ``logging.basicConfig(level="INFO")`` shows the same lines).
logging.getLogger(__name__).addHandler(logging.NullHandler())
