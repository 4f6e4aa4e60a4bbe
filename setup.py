"""Compiles protos/*.proto with grpcio-tools as part of every build.

The generated modules are written next to the .proto files (and ignored by git), so
regular and editable installs see the same code, and it can never drift from the .proto
it came from.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


def compile_protos() -> None:
    """protoc names imports after the .proto's path, so compile from a `meshplane/protos/` copy:
    the generated stubs then import `meshplane.protos.ca_pb2`, the name the package installs as."""
    import shutil
    import tempfile

    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "meshplane" / "protos"
        staged.mkdir(parents=True)
        for proto in sorted((ROOT / "protos").glob("*.proto")):
            shutil.copy(proto, staged / proto.name)
            args = [
                "protoc",
                f"-I{tmp}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"meshplane/protos/{proto.name}",
            ]
            if protoc.main(args) != 0:
                raise SystemExit(f"protoc failed on {proto}")
        for generated in staged.glob("*_pb2*"):
            shutil.copy(generated, ROOT / "protos" / generated.name)


class BuildWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
