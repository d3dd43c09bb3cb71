"""Triton's ``inference.GRPCInferenceService``: the vendored ``proto/`` files (Triton's public
``common`` repository, BSD licence in ``proto/LICENSE``) and the modules grpcio-tools compiles
from them (``scripts/gen_grpc.py``; a test checks they are current)."""
