"""The mesh file parser, fed documents built from a grammar around its schema, mutations of them,
and random text and bytes.

Property: `parse` returns a model or raises `MeshFileError` whose message names the file, and for
a schema error also a line and the field's path; it never raises anything else.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.control import event as hypothesis_event

from meshplane.controlplane import meshfile
from meshplane.controlplane.errors import MeshFileError
from meshplane.controlplane.model import MeshModel

SOURCE = "fuzz/mesh.yaml"
TOP_KEYS = ["trustDomain", "domainSuffix", "mtls", "outboundTrafficPolicy", "services", "workloads"]


def event(name: str) -> None:
    if currently_in_test_context():
        hypothesis_event(name)


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))


# -- a grammar around the schema: mostly valid values, with wrong ones at every level ----------------

anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
names = st.sampled_from(["reviews", "web", "a", "db-1", "x" * 63, "x" * 64, "Web", "a.b", "-a", "", "1abc"])
dns_names = names | st.sampled_from(["cluster.local", "example.org", "a..b", "x" * 254])
enums = st.sampled_from(["STRICT", "PERMISSIVE", "DISABLE", "strict", "ALLOW_ANY", "REGISTRY_ONLY", "maybe", ""])
protocols = st.sampled_from(["HTTP", "HTTP2", "GRPC", "TCP", "http", "udp", "", "TLS"])
ips = st.sampled_from(["10.0.0.7", "::1", "fd00::7", "10.0.0.256", "10.0.0", "not-an-ip", "", "1.2.3.4/32"])
port_numbers = st.integers(min_value=-2, max_value=70_000) | st.sampled_from([1, 80, 9080, 65535])
label_keys = st.sampled_from(["app", "version", "example.com/tier", "a/b/c", "-x", "x" * 64, "", "Ünï"])
label_values = st.sampled_from(["v1", "reviews", "", "a b", "x" * 64, "-x"]) | st.integers(0, 10) | st.floats()


def maybe_wrong(right: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a plausible value; sometimes anything at all."""
    return st.one_of(right, right, right, anything)


def mapping(required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A mapping with the schema's fields, sometimes one field too many or one required field missing."""
    base = st.fixed_dictionaries(
        {k: maybe_wrong(v) for k, v in required.items()}, optional={k: maybe_wrong(v) for k, v in optional.items()}
    )

    def damage(doc: dict[str, Any], extra: str | None, drop: bool) -> dict[str, Any]:
        doc = dict(doc)
        if extra is not None:
            doc[extra] = 1
        if drop and doc:
            doc.pop(next(iter(doc)))
        return doc

    return st.builds(damage, base, st.none() | st.none() | st.text(max_size=10), st.booleans())


ports = mapping(
    {"port": port_numbers}, {"name": st.sampled_from(["http", "grpc-api", "tcp", "web"]) | names, "protocol": protocols}
)
ports = st.one_of(ports, mapping({"port": port_numbers}, {"targetPort": port_numbers}))
label_maps = st.dictionaries(label_keys, label_values, max_size=3)
services = mapping(
    {"name": names, "ports": st.lists(ports, max_size=3)},
    {"namespace": names, "selector": label_maps, "addresses": st.lists(maybe_wrong(ips), max_size=2)},
)
workloads = mapping(
    {"name": dns_names, "address": ips},
    {"namespace": names, "serviceAccount": dns_names, "labels": label_maps, "mtls": enums},
)
documents = mapping(
    {},
    {
        "trustDomain": dns_names,
        "domainSuffix": dns_names,
        "mtls": enums,
        "outboundTrafficPolicy": enums,
        "services": st.lists(services, max_size=3),
        "workloads": st.lists(workloads, max_size=3),
    },
)


def dump(doc: Any, flow: bool | None) -> str:
    return yaml.safe_dump(doc, default_flow_style=flow, allow_unicode=True, sort_keys=False)


yaml_texts = st.builds(dump, documents, st.sampled_from([False, None, True]))


@st.composite
def mutated_texts(draw: st.DrawFn) -> str:
    """A valid-looking document with a few characters inserted, deleted, or the text cut short."""
    text = draw(yaml_texts)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text)))
        how = draw(st.sampled_from(["insert", "delete", "cut"]))
        if how == "insert":
            text = text[:i] + draw(st.sampled_from(list(":-[]{},&*!|>'\"#%@`\t\n ")) | st.text(max_size=3)) + text[i:]
        elif how == "delete":
            text = text[:i] + text[i + 1 :]
        else:
            text = text[:i]
    return text


YAML_SPECIALS = [
    "a: &a [*a]",  # a recursive alias
    "<<: {mtls: STRICT}",
    "? [a, b]\n: c",
    "services: !!python/object:os.system {}",
    "trustDomain: !!binary aGVsbG8=",
    "workloads: [{name: w, address: !!binary CgAABw==}]",
    "workloads: [{name: w, address: 167772167}]",
    "workloads: [{name: w, address: true}]",
    "services: [{name: s, ports: [{port: 80}], addresses: [!!binary CgAABw==]}]",
    "mtls: !!set {STRICT}",
    "trustDomain: 2001-12-14",
    "%YAML 1.1\n---\nmtls: STRICT",
    "--- a\n--- b",
    "\ufeffmtls: STRICT",
    "mtls: \x00",
    "services: [" * 5000,
    "services: " + "[" * 5000 + "]" * 5000,
    "services: " + "{a: " * 5000 + "b" + "}" * 5000,
    "x: " + "- " * 5000 + "y",
    "services:\n" + "".join(f"{'  ' * i}- \n" for i in range(2000)),
    "services: [{name: s, ports: [{port: 80}], selector: {app: .nan}}]",
    "services: [{name: s, ports: [{port: 80}], selector: {1: a}}]",
    "workloads: [{name: w, address: 10.0.0.1, labels: {app: [1]}}]",
    "mtls: STRICT\nmtls: STRICT",
    "services: [{name: s, ports: [{port: 80}, {port: 80}]}, {name: s, ports: [{port: 81}]}]",
]


def _load(text: str) -> Any:
    """The document as plain data, read by the same YAML parser as the mesh file's (libyaml if built)."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


class _PlainLineLoader(meshfile._LineLoader):  # type: ignore[misc]
    """The mesh file's loader without its shortcuts: PyYAML's own tag resolution and construction."""

    resolve = yaml.resolver.BaseResolver.resolve
    construct_object = yaml.constructor.BaseConstructor.construct_object


def outcome(text: str, loader: type[Any]) -> str:
    try:
        return repr(yaml.load(text, Loader=loader))
    except (yaml.YAMLError, MeshFileError, RecursionError) as e:
        return f"{type(e).__name__}: {e}"


def same_as_pyyaml(text: str) -> None:
    """The mesh file's loader takes shortcuts (resolved tags remembered, plain strings built directly):
    it must read exactly what it reads without them, or fail the same way."""
    assert outcome(text, meshfile._LineLoader) == outcome(text, _PlainLineLoader)


# -- the property --------------------------------------------------------------------------------------


def check(text: str) -> MeshModel | None:
    same_as_pyyaml(text)
    try:
        model = meshfile.parse(text, SOURCE)
    except MeshFileError as e:
        assert str(e).startswith(SOURCE), str(e)
        assert e.path == SOURCE
        problem = e.problem
        if problem.startswith("invalid YAML"):
            event("invalid YAML")
            return None
        assert e.line is not None and 1 <= e.line <= text.count("\n") + 2, (e.line, str(e))
        try:
            doc = _load(text)
        except (yaml.YAMLError, RecursionError):
            doc = None
        if isinstance(doc, dict) and doc and not re.match(r"^(keys must be strings|duplicate key)", problem):
            # A schema error: the message starts with the field's path, e.g. services[0].ports[1].port.
            top = [k for k in doc if isinstance(k, str) and problem.startswith(k)]
            assert top, f"no field path in {str(e)!r}"
        event("schema error")
        return None
    assert isinstance(model, MeshModel)
    # Nothing was converted behind the user's back: addresses were strings, label values strings or ints.
    doc = _load(text) or {}
    for i, w in enumerate(doc.get("workloads") or []):
        assert isinstance(w["address"], str) and model.workloads[i].address
        assert all(isinstance(v, str | int) for v in (w.get("labels") or {}).values())
    for s in doc.get("services") or []:
        assert all(isinstance(a, str) for a in s.get("addresses") or [])
        assert all(isinstance(v, str | int) for v in (s.get("selector") or {}).values())
    event("model")
    return model


@fuzz(400)
@given(yaml_texts)
def test_grammar_documents(text: str) -> None:
    check(text)


@fuzz(300)
@given(mutated_texts())
def test_mutated_documents(text: str) -> None:
    check(text)


@fuzz(300)
@given(st.text(max_size=200) | st.text(alphabet=":-[]{},&*!|>'\"#%@ \n\tabcmtlsS1", max_size=80))
@example("")
@example("~")
@example("[]")
@example("- a")
@example("42")
def test_random_text(text: str) -> None:
    check(text)


@pytest.mark.parametrize("text", YAML_SPECIALS, ids=range(len(YAML_SPECIALS)))
def test_yaml_specials(text: str) -> None:
    check(text)


@fuzz(100)
@given(st.binary(max_size=200))
@example(b"\xff\xfe\x00m")
@example(b"mtls: \xc3")
def test_random_bytes_from_a_file(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path: Path = tmp_path_factory.mktemp("mesh", numbered=True) / "mesh.yaml"
    path.write_bytes(data)
    try:
        meshfile.load(path)
    except MeshFileError as e:
        assert str(e).startswith(str(path))


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("workloads: [{name: w, address: 167772167}]", "workloads[0].address"),  # was 10.0.0.7
        ("workloads: [{name: w, address: true}]", "workloads[0].address"),  # was 0.0.0.1
        ("workloads: [{name: w, address: !!binary CgAABw==}]", "workloads[0].address"),  # 4 bytes, was 10.0.0.7
        ("services: [{name: s, ports: [{port: 80}], addresses: [!!binary CgAABw==]}]", "services[0].addresses[0]"),
        ("workloads: [{name: w, address: 10.0.0.1, labels: {version: 1.10}}]", "workloads[0].labels.version"),
        ("services: [{name: s, ports: [{port: 80}], selector: {app: .nan}}]", "services[0].selector.app"),
    ],
)
def test_values_yaml_reads_as_something_else_are_errors(text: str, field: str) -> None:
    """Found by fuzzing: non-string addresses and float label values were silently converted."""
    with pytest.raises(MeshFileError) as e:
        meshfile.parse(text, SOURCE)
    assert e.value.line == 1 and e.value.problem.startswith(field + ":"), str(e.value)
