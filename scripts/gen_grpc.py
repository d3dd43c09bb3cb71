"""Compile the vendored Triton protos (optimize/oip/proto) into optimize/oip with grpcio-tools.

    python scripts/gen_grpc.py          # rewrite the generated modules
    python scripts/gen_grpc.py --check  # exit 1 when they differ from what the protos give

Two edits are made to what protoc writes:
- ``import model_config_pb2`` becomes a package import, so the modules load as ``optimize.oip.*``
  without touching ``sys.path``;
- the descriptors go into a pool of this package's own (``optimize.oip.POOL``) instead of protobuf's
  default pool, where tritonclient registers the same ``inference.*`` messages: both can then be
  imported by one process (a client embedding the server, the tests).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "optimize" / "oip"
PROTOS = ("grpc_service.proto", "model_config.proto")


def generate(out: Path) -> None:
    from grpc_tools import protoc

    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PACKAGE / 'proto'}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
            *(str(PACKAGE / "proto" / p) for p in PROTOS)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out / "model_config_pb2_grpc.py").unlink()  # no services in it: an empty module
    for file in out.glob("*_pb2*.py"):
        text = re.sub(r"^import (\w+_pb2) as", r"from optimize.oip import \1 as", file.read_text(), flags=re.M)
        text = text.replace("_descriptor_pool.Default().AddSerializedFile(", "POOL.AddSerializedFile(")
        if "POOL.AddSerializedFile" in text:
            marker = "# @@protoc_insertion_point(imports)"
            text = text.replace(marker, "from optimize.oip import POOL\n" + marker, 1)
        file.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as folder:
        generate(Path(folder))
        produced = {f.name: f.read_text() for f in Path(folder).glob("*.py")}
    if check:
        stale = [n for n, text in produced.items() if not (PACKAGE / n).is_file() or (PACKAGE / n).read_text() != text]
        if stale:
            print(f"stale generated modules: {stale}; run python scripts/gen_grpc.py", file=sys.stderr)
            return 1
        return 0
    for name, text in produced.items():
        (PACKAGE / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
