"""Packaging: committed generated code, the wheel's layout and the public surface."""

from __future__ import annotations

import filecmp
import importlib
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
GENERATED = ROOT / "protos" / "session_authority" / "v1"
EXAMPLES_GENERATED = ROOT / "examples" / "protos" / "demo" / "v1"


def test_regenerating_protos_changes_nothing(tmp_path: pathlib.Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate_protos.py"), "--out", str(tmp_path)],
        check=True,
        timeout=120,
    )

    fresh = tmp_path / "session_authority" / "v1"
    generated = sorted(p.name for p in fresh.iterdir())
    assert generated == ["session_authority_pb2.py", "session_authority_pb2.pyi", "session_authority_pb2_grpc.py"]
    for name in generated:
        assert filecmp.cmp(fresh / name, GENERATED / name, shallow=False), f"{name} differs: rerun tools/generate_protos.py"

    fresh_examples = tmp_path / "session_authority" / "examples" / "protos" / "demo" / "v1"
    generated_examples = sorted(p.name for p in fresh_examples.iterdir())
    assert generated_examples == ["demo_pb2.py", "demo_pb2.pyi", "demo_pb2_grpc.py"]
    for name in generated_examples:
        assert filecmp.cmp(fresh_examples / name, EXAMPLES_GENERATED / name, shallow=False), (
            f"examples/protos/demo/v1/{name} differs: rerun tools/generate_protos.py"
        )


def test_wheel_installs_nothing_top_level_but_the_namespace(tmp_path: pathlib.Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("*.whl")

    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}

    assert top_level == {"session_authority"}
    for expected in (
        "session_authority/v1/session_authority_pb2.py",
        "session_authority/v1/session_authority.proto",
        "session_authority/server/_table.py",
        "session_authority/server/py.typed",
        "session_authority/clients/py.typed",
        "session_authority/interceptors/py.typed",
    ):
        assert expected in names
    assert not any(name.startswith(("server/", "clients/", "interceptors/", "tests/")) for name in names)


@pytest.mark.parametrize(
    "package",
    ["session_authority.server", "session_authority.clients", "session_authority.interceptors"],
)
def test_public_names_match_all(package: str) -> None:
    module = importlib.import_module(package)

    exported = sorted(name for name in vars(module) if not name.startswith("_") and name != "annotations")
    public = [name for name in exported if not isinstance(getattr(module, name), type(sys))]

    assert module.__all__ == sorted(module.__all__)
    assert sorted(public) == module.__all__


def test_ci_runs_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = [block.split("```", 1)[0].strip() for block in setup.split("```sh\n")[1:]]

    assert len(commands) == 2
    assert commands[0].endswith("session-authority demo")
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
