"""Triton's ``inference.GRPCInferenceService``: the vendored ``proto/`` files (Triton's public
``common`` repository, BSD licence in ``proto/LICENSE``) and the modules grpcio-tools compiles
from them (``scripts/gen_grpc.py``; a test checks they are current).

Their descriptors live in ``POOL``, not protobuf's default pool, where tritonclient registers the
same ``inference.*`` messages from the same protos."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
