"""Imports point down (STYLE.md): checked on the source, so a new import cannot quietly invert a layer."""

import ast
from pathlib import Path

TOP = Path(__file__).parents[2]


def imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved)."""
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
    return found


def local(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] in {"controlplane", "webhook", "bootstrap", "protos"}}


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
        n
        for n in imports(TOP / "bootstrap" / "iptables.py")
        if n.split(".")[0]
        not in {"__future__", "ipaddress", "re", "subprocess", "collections", "dataclasses", "pathlib"}
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
