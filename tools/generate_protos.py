"""Regenerate the committed protobuf and gRPC code under protos/ and examples/protos/.

Run from anywhere: ``python tools/generate_protos.py [--out DIR]``. The
output depends on the grpcio-tools version, which the ``test`` extra pins, so
the regeneration test can compare byte for byte.

The examples' protos are installed as ``session_authority.examples.protos``,
so protoc reads examples/ under the virtual path ``session_authority/examples``
and the generated imports name the installed package.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc
import grpc_tools

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
EXAMPLES_ROOT = ROOT / "examples"
EXAMPLES_PROTO_ROOT = EXAMPLES_ROOT / "protos"
EXAMPLES_VIRTUAL_PATH = "session_authority/examples"
"""Virtual path of examples/ for protoc; it matches the package that pyproject maps examples/ to."""


def proto_files() -> list[pathlib.Path]:
    """Return every .proto file under protos/, sorted for a stable order."""
    return sorted(PROTO_ROOT.rglob("*.proto"))


def example_proto_files() -> list[pathlib.Path]:
    """Return every .proto file under examples/protos/, sorted for a stable order."""
    return sorted(EXAMPLES_PROTO_ROOT.rglob("*.proto"))


def _run_protoc(include_paths: list[str], out_dir: pathlib.Path, proto_name: str) -> None:
    args = [
        "grpc_tools.protoc",
        *(f"-I{path}" for path in include_paths),
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        proto_name,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto_name}")


def generate(out_dir: pathlib.Path) -> None:
    """Write the _pb2, _pb2_grpc and .pyi files for every proto under protos/ into out_dir.

    Raises:
        RuntimeError: protoc reported an error.
    """
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in proto_files():
        _run_protoc([str(PROTO_ROOT), str(include)], out_dir, str(proto.relative_to(PROTO_ROOT)))


def generate_examples(out_dir: pathlib.Path) -> None:
    """Write the generated files of examples/protos/ into out_dir/session_authority/examples/protos/.

    Raises:
        RuntimeError: protoc reported an error.
    """
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in example_proto_files():
        name = f"{EXAMPLES_VIRTUAL_PATH}/{proto.relative_to(EXAMPLES_ROOT).as_posix()}"
        _run_protoc([f"{EXAMPLES_VIRTUAL_PATH}={EXAMPLES_ROOT}", str(include)], out_dir, name)


def _generate_examples_in_place() -> None:
    # protoc writes under the virtual path, so generate into a scratch
    # directory and copy the files beside their sources.
    with tempfile.TemporaryDirectory() as scratch:
        generated_root = pathlib.Path(scratch) / EXAMPLES_VIRTUAL_PATH
        generate_examples(pathlib.Path(scratch))
        for generated in sorted(generated_root.rglob("*")):
            if generated.is_file():
                target = EXAMPLES_ROOT / generated.relative_to(generated_root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(generated, target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help=(
            "directory to write into: protos/ code goes to DIR/session_authority/v1/ and examples/"
            " code to DIR/session_authority/examples/protos/ (default: beside the sources)"
        ),
    )
    out = parser.parse_args().out
    if out is None:
        generate(PROTO_ROOT)
        _generate_examples_in_place()
    else:
        generate(out)
        generate_examples(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
