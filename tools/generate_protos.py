"""Regenerate the committed protobuf and gRPC code under protos/.

Run from anywhere: ``python tools/generate_protos.py [--out DIR]``. The
output depends on the grpcio-tools version, which the ``dev`` extra pins, so
the regeneration test can compare byte for byte.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from grpc_tools import protoc
import grpc_tools

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def proto_files() -> list[pathlib.Path]:
    """Return every .proto file under protos/, sorted for a stable order."""
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: pathlib.Path) -> None:
    """Write the _pb2, _pb2_grpc and .pyi files for every proto into out_dir.

    Raises:
        RuntimeError: protoc reported an error.
    """
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in proto_files():
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto.relative_to(PROTO_ROOT)),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=PROTO_ROOT,
        help="directory to write into (default: protos/, beside the sources)",
    )
    generate(parser.parse_args().out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
