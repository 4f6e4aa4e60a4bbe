"""The YAML mesh file -> `MeshModel`, with errors that name the file, line and field."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from . import names, scope
from .errors import MeshFileError
from .model import (
    MeshModel,
    MtlsMode,
    OutboundPolicy,
    Port,
    Protocol,
    Service,
    SidecarScope,
    Workload,
    labels,
)

_DNS_LABEL = names.DNS_LABEL
_DNS_NAME = names.DNS_NAME

_E = TypeVar("_E", MtlsMode, OutboundPolicy, Protocol)


class _Map(dict[str, Any]):
    """A YAML mapping that remembers the line of itself and of each key."""

    line: int = 0
    lines: dict[str, int]


class _Seq(list[Any]):
    line: int = 0
    lines: list[int]


# libyaml's parser, where PyYAML was built with it, reads the same marks several times faster.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR = "tag:yaml.org,2002:str"


class _LineLoader(_SafeLoader):  # type: ignore[valid-type, misc]
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._resolved: dict[str, str] = {}

    # The two overrides below halve the load of a large file. A mesh file repeats the same few
    # keys and values thousands of times; PyYAML matched each against its regexps again.
    def resolve(self, kind: type[yaml.Node], value: str, implicit: tuple[bool, bool]) -> Any:
        if kind is not yaml.ScalarNode or not implicit[0]:
            return super().resolve(kind, value, implicit)
        tag = self._resolved.get(value)
        if tag is None:
            tag = self._resolved[value] = super().resolve(kind, value, implicit)
        return tag

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # Most of a mesh file is plain strings: no anchor bookkeeping or constructor lookup for them.
        if node.tag == _STR and node.__class__ is yaml.ScalarNode:
            return node.value
        return super().construct_object(node, deep)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        out = _Map()
        out.line = node.start_mark.line + 1
        out.lines = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise MeshFileError("", f"keys must be strings, got {key!r}", key_node.start_mark.line + 1)
            if key in out:
                raise MeshFileError("", f"duplicate key {key!r}", key_node.start_mark.line + 1)
            out[key] = self.construct_object(value_node, deep=True)
            out.lines[key] = value_node.start_mark.line + 1
        return out

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> Any:
        out = _Seq(self.construct_object(child, deep=True) for child in node.value)
        out.line = node.start_mark.line + 1
        out.lines = [child.start_mark.line + 1 for child in node.value]
        return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _LineLoader.construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _LineLoader.construct_sequence)


def load(path: str | Path) -> MeshModel:
    """Read and validate the mesh file at `path`. Raises `MeshFileError`."""
    return parse(read(path), str(path))


def read(path: str | Path) -> str:
    """The file's text, or `MeshFileError` saying why it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise MeshFileError(str(path), f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise MeshFileError(str(path), f"not UTF-8 text ({e.reason})") from None


def parse(text: str, source: str = "<mesh>", *, empty: bool = True) -> MeshModel:
    """Parse mesh-file YAML `text`; `source` names it in errors. Without `empty`, a text with no YAML
    document at all is an error, not a mesh without services (a reload: see `MeshFileWatcher`)."""
    try:
        doc = yaml.load(text, Loader=_LineLoader)
    except MeshFileError as e:
        raise MeshFileError(source, e.problem, e.line) from None
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise MeshFileError(source, f"invalid YAML: {e.problem}", line) from None
    except yaml.YAMLError as e:
        raise MeshFileError(source, f"invalid YAML: {e}") from None
    if doc is None:
        if not empty:
            raise MeshFileError(
                source, "the file is empty (no YAML document); to remove every service, write `services: []`"
            )
        doc = _Map()
        doc.lines = {}
    return _Parser(source).mesh(doc)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str, line: int | None) -> MeshFileError:
        return MeshFileError(self.source, f"{where}: {problem}" if where else problem, line)

    # -- generic field readers ------------------------------------------------

    def map(self, value: Any, where: str, line: int | None, allowed: set[str]) -> _Map:
        if not isinstance(value, _Map):
            raise self.fail(where, f"must be a mapping, got {_kind(value)}", line)
        unknown = sorted(set(value) - allowed)
        if unknown:
            key = unknown[0]
            raise self.fail(
                f"{where}.{key}" if where else key,
                f"unknown field (expected one of: {', '.join(sorted(allowed))})",
                value.lines[key],
            )
        return value

    def seq(self, m: _Map, key: str, where: str) -> _Seq:
        value = m.get(key)
        if value is None:
            empty = _Seq()
            empty.lines = []
            return empty
        if not isinstance(value, _Seq):
            raise self.fail(f"{where}{key}", f"must be a list, got {_kind(value)}", m.lines[key])
        return value

    def string(
        self,
        m: _Map,
        key: str,
        where: str,
        *,
        default: str | None = None,
        pattern: re.Pattern[str] | None = None,
        what: str = "",
    ) -> str:
        value = m.get(key)
        if value is None:
            if default is None:
                raise self.fail(f"{where}{key}", "is required", m.line)
            return default
        if not isinstance(value, str) or not value:
            raise self.fail(f"{where}{key}", f"must be a non-empty string, got {_kind(value)}", m.lines[key])
        if pattern is not None and not pattern.match(value):
            raise self.fail(f"{where}{key}", f"{value!r} is not {what}", m.lines[key])
        return value

    def enum(self, m: _Map, key: str, where: str, kind: type[_E], default: _E | None) -> _E | None:
        value = m.get(key)
        if value is None:
            return default
        try:
            return kind(str(value).upper()) if isinstance(value, str) else kind(value)
        except ValueError:
            choices = " | ".join(e.value for e in kind)
            raise self.fail(f"{where}{key}", f"must be one of {choices}, got {value!r}", m.lines[key]) from None

    def port_number(self, m: _Map, key: str, where: str, *, required: bool) -> int | None:
        value = m.get(key)
        if value is None:
            if required:
                raise self.fail(f"{where}{key}", "is required", m.line)
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.fail(f"{where}{key}", f"must be an integer from 1 to 65535, got {value!r}", m.lines[key])
        return value

    def label_map(self, m: _Map, key: str, where: str) -> dict[str, str]:
        value = m.get(key)
        if value is None:
            return {}
        value = self.map(value, f"{where}{key}", m.lines[key], set(value) if isinstance(value, dict) else set())
        out: dict[str, str] = {}
        for k, v in value.items():
            if isinstance(v, float):  # 1.10 would silently become "1.1", and .nan "nan"
                raise self.fail(
                    f"{where}{key}.{k}", f"YAML reads {v!r} as a number; quote the label value", value.lines[k]
                )
            text = str(v) if isinstance(v, int) and not isinstance(v, bool) else v
            if not names.is_label_key(k) or not isinstance(text, str) or not names.is_label_value(text):
                raise self.fail(f"{where}{key}.{k}", f"is not a valid Kubernetes label ({k}={v!r})", value.lines[k])
            out[k] = text
        return out

    def ip(self, value: Any, where: str, line: int) -> str:
        try:
            if not isinstance(value, str):  # ip_address() takes 7 as 0.0.0.7, true as 0.0.0.1, 4 bytes as packed
                raise ValueError
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise self.fail(where, f"must be an IP address, got {value!r}", line) from None

    def items(self, m: _Map, key: str, build: Callable[[_Map, str], Any], allowed: set[str]) -> list[Any]:
        out = []
        seq = self.seq(m, key, "")
        for i, item in enumerate(seq):
            where = f"{key}[{i}]"
            out.append(build(self.map(item, where, seq.lines[i], allowed), where + "."))
        return out

    # -- the schema -----------------------------------------------------------

    def mesh(self, doc: Any) -> MeshModel:
        top = self.map(
            doc,
            "",
            getattr(doc, "line", 1),
            {
                "trustDomain",
                "domainSuffix",
                "mtls",
                "outboundTrafficPolicy",
                "services",
                "workloads",
                "sidecars",
            },
        )
        trust_domain = self.string(
            top,
            "trustDomain",
            "",
            default="cluster.local",
            pattern=_DNS_NAME,
            what="a DNS name (lowercase letters, digits, '-' and '.')",
        )
        suffix = self.string(top, "domainSuffix", "", default="cluster.local", pattern=_DNS_NAME, what="a DNS name")
        mtls = self.enum(top, "mtls", "", MtlsMode, MtlsMode.STRICT)
        policy = self.enum(top, "outboundTrafficPolicy", "", OutboundPolicy, OutboundPolicy.ALLOW_ANY)
        services = self.items(top, "services", self.service, {"name", "namespace", "ports", "selector", "addresses"})
        workloads = self.items(
            top, "workloads", self.workload, {"name", "namespace", "serviceAccount", "labels", "address", "mtls"}
        )
        sidecars = self.items(top, "sidecars", self.sidecar, {"namespace", "workloadSelector", "egress"})
        self.unique(top, "services", [(s.namespace, s.name) for s in services], "service")
        self.unique(top, "workloads", [(w.namespace, w.name) for w in workloads], "workload")
        self.one_default_per_namespace(top, sidecars)
        assert mtls is not None and policy is not None
        return MeshModel(
            trust_domain=trust_domain,
            domain_suffix=suffix,
            mtls=mtls,
            outbound_policy=policy,
            services=tuple(services),
            workloads=tuple(workloads),
            sidecars=tuple(sidecars),
        )

    def unique(self, top: _Map, key: str, names: list[tuple[str, str]], what: str) -> None:
        seen: set[tuple[str, str]] = set()
        for i, name in enumerate(names):
            if name in seen:
                raise self.fail(
                    f"{key}[{i}]", f"duplicate {what} {name[1]!r} in namespace {name[0]!r}", top[key].lines[i]
                )
            seen.add(name)

    def one_default_per_namespace(self, top: _Map, sidecars: list[SidecarScope]) -> None:
        """Istio leaves two selector-less Sidecars of one namespace undefined; here it is an error."""
        seen: set[str] = set()
        for i, sidecar in enumerate(sidecars):
            if not sidecar.selector:
                if sidecar.namespace in seen:
                    raise self.fail(
                        f"sidecars[{i}]",
                        f"a second entry without workloadSelector for namespace {sidecar.namespace!r}",
                        top["sidecars"].lines[i],
                    )
                seen.add(sidecar.namespace)

    def sidecar(self, m: _Map, where: str) -> SidecarScope:
        """Istio's Sidecar, egress hosts only: `{namespace, workloadSelector: {labels}, egress: [{hosts}]}`."""
        namespace = m.get("namespace")
        if namespace != "*":
            namespace = self.string(m, "namespace", where, pattern=_DNS_LABEL, what="a namespace or '*'")
        selector: dict[str, str] = {}
        if "workloadSelector" in m:
            if namespace == "*":
                raise self.fail(
                    f"{where}workloadSelector",
                    "the mesh-wide default (namespace '*') selects every workload; give a namespace",
                    m.lines["workloadSelector"],
                )
            ws = self.map(m["workloadSelector"], f"{where}workloadSelector", m.lines["workloadSelector"], {"labels"})
            selector = self.label_map(ws, "labels", f"{where}workloadSelector.")
        listeners = self.seq(m, "egress", where)
        if not listeners:
            raise self.fail(f"{where}egress", "needs at least one entry with hosts", m.lines.get("egress", m.line))
        hosts = []
        for i, item in enumerate(listeners):
            lw = f"{where}egress[{i}]."
            listener = self.map(item, lw[:-1], listeners.lines[i], {"hosts"})
            seq = self.seq(listener, "hosts", lw)
            if not seq:
                raise self.fail(f"{lw}hosts", "needs at least one host", listener.lines.get("hosts", listener.line))
            for j, host in enumerate(seq):
                if not isinstance(host, str):
                    raise self.fail(f"{lw}hosts[{j}]", f"must be a string, got {_kind(host)}", seq.lines[j])
                try:
                    hosts.append(scope.parse_host(host))
                except ValueError as e:
                    raise self.fail(f"{lw}hosts[{j}]", str(e), seq.lines[j]) from None
        return SidecarScope(namespace=namespace, egress=tuple(hosts), selector=labels(selector))

    def service(self, m: _Map, where: str) -> Service:
        name = self.string(m, "name", where, pattern=_DNS_LABEL, what="a DNS label")
        namespace = self.string(m, "namespace", where, default="default", pattern=_DNS_LABEL, what="a DNS label")
        ports_seq = self.seq(m, "ports", where)
        if not ports_seq:
            raise self.fail(f"{where}ports", "needs at least one port", m.lines.get("ports", m.line))
        ports: list[Port] = []
        for i, item in enumerate(ports_seq):
            pw = f"{where}ports[{i}]."
            pm = self.map(item, pw[:-1], ports_seq.lines[i], {"port", "name", "protocol", "targetPort"})
            number = self.port_number(pm, "port", pw, required=True)
            assert number is not None
            pname = self.string(pm, "name", pw, default=f"port-{number}")
            protocol = self.enum(pm, "protocol", pw, Protocol, None) or Protocol.from_port_name(pname)
            if any(p.port == number for p in ports):
                raise self.fail(f"{pw}port", f"port {number} is listed twice", pm.lines["port"])
            ports.append(Port(number, pname, protocol, self.port_number(pm, "targetPort", pw, required=False)))
        addresses = self.seq(m, "addresses", where)
        return Service(
            name=name,
            namespace=namespace,
            ports=tuple(ports),
            selector=labels(self.label_map(m, "selector", where)),
            addresses=tuple(self.ip(a, f"{where}addresses[{i}]", addresses.lines[i]) for i, a in enumerate(addresses)),
        )

    def workload(self, m: _Map, where: str) -> Workload:
        if "address" not in m:
            raise self.fail(f"{where}address", "is required", m.line)
        return Workload(
            name=self.string(m, "name", where, pattern=_DNS_NAME, what="a DNS name"),
            namespace=self.string(m, "namespace", where, default="default", pattern=_DNS_LABEL, what="a DNS label"),
            service_account=self.string(
                m, "serviceAccount", where, default="default", pattern=_DNS_NAME, what="a DNS name"
            ),
            address=self.ip(m["address"], f"{where}address", m.lines["address"]),
            labels=labels(self.label_map(m, "labels", where)),
            mtls=self.enum(m, "mtls", where, MtlsMode, None),
        )


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
