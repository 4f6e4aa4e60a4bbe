"""What installing Meshplane puts into site-packages: one `meshplane` package, nothing named after the
folders (`webhook`, `protos`, ...) that would clash with other distributions."""

import subprocess
import sys
import zipfile
from pathlib import Path

TOP = Path(__file__).parents[2]


def test_the_wheel_holds_one_meshplane_namespace(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(TOP),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("meshplane-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"meshplane", next(t for t in tops if t.endswith(".dist-info"))}, tops
    # Every package is there, and the generated stubs import the installed name.
    for package in ("controlplane", "webhook", "bootstrap", "protos", "sandbox"):
        assert f"meshplane/{package}/__init__.py" in names
    stub = zipfile.ZipFile(wheel).read("meshplane/protos/ca_pb2_grpc.py").decode()
    assert "from meshplane.protos import ca_pb2" in stub
