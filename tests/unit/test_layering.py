"""Imports point down (STYLE.md): checked on the source, so a new import cannot quietly invert a layer."""

import ast
import sys
from pathlib import Path

TOP = Path(__file__).parents[2]


PACKAGES = ("protos", "bootstrap", "webhook", "controlplane", "sandbox")
"""Bottom to top: a package may import only from itself and the packages before it."""
ENTRY = "controlplane.cli"
"""The composition root above every package: it wires the control plane, webhook and sandbox commands."""


def imports(path: Path) -> set[str]:
    """Names (without the `meshplane.` namespace) of the modules `path` imports, relative ones resolved."""
    package = ".".join(path.relative_to(TOP).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
    return {n.removeprefix("meshplane.") for n in found}


def local(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] in PACKAGES}


def sources() -> list[Path]:
    return [p for d in PACKAGES for p in (TOP / d).rglob("*.py") if "_pb2" not in p.name]


def test_packages_never_import_upwards() -> None:
    """No package cycle: webhook never imports controlplane, bootstrap neither, and so on down."""
    for path in sources():
        module = ".".join(path.relative_to(TOP).with_suffix("").parts)
        if module == ENTRY:
            continue
        rank = PACKAGES.index(module.split(".")[0])
        bad = {n for n in local(imports(path)) if PACKAGES.index(n.split(".")[0]) > rank and n != ENTRY}
        assert not bad, f"{module} imports {sorted(bad)} from a higher layer"


def test_installed_names_are_namespaced() -> None:
    """Every absolute import of our own code goes through `meshplane.`: the installed names."""
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                assert node.module.split(".")[0] not in PACKAGES, f"{path}: from {node.module} import ..."
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in PACKAGES, f"{path}: import {alias.name}"


def test_bootstrap_never_imports_webhook_or_the_serving_side() -> None:
    for path in (TOP / "bootstrap").glob("*.py"):
        bad = {
            n
            for n in local(imports(path))
            if n.startswith("webhook")
            or n in {"controlplane.server", "controlplane.app", "controlplane.cli", "controlplane.cache"}
        }
        assert not bad, f"{path.name} imports {bad}"


def test_iptables_is_stdlib_only() -> None:
    """The proxy image's init step runs it with no third-party packages."""
    third_party = {
        n for n in imports(TOP / "bootstrap" / "iptables.py") if n.split(".")[0] not in sys.stdlib_module_names
    }
    assert not third_party


def test_the_model_imports_nothing_local() -> None:
    assert not local(imports(TOP / "controlplane" / "model.py"))


def test_pure_core_does_no_io() -> None:
    """Generators, cache and stream state know nothing of gRPC, HTTP or Kubernetes."""
    io = {"grpc", "aiohttp", "kubernetes", "asyncio", "socket", "subprocess"}
    for path in [
        *(TOP / "controlplane" / "generate").glob("*.py"),
        TOP / "controlplane" / "cache.py",
        TOP / "controlplane" / "stream.py",
        *(TOP / "webhook" / n for n in ("policy.py", "sidecar.py", "patch.py", "review.py", "annotations.py")),
    ]:
        bad = {n for n in imports(path) if n.split(".")[0] in io}
        assert not bad, f"{path.relative_to(TOP)} imports {bad}"
