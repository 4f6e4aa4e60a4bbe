"""The shared push path sends exactly what the general one does.

A stream whose source is the cache's snapshots takes shortcuts (a diff between snapshots, bodies
encoded once); one whose source is plain dicts works everything out per stream. Driven by the same
random requests and mesh changes, both must answer every step with the same bytes.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, message
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshplane.controlplane.delta import DeltaStreamState
from meshplane.controlplane.resources import CLUSTER, ENDPOINT, Resource, Resources, Snapshot
from meshplane.controlplane.stream import StreamState

NAMES = ["a", "b", "c", "d"]
TYPES = [CLUSTER, ENDPOINT]


def _packed(type_url: str, name: str) -> any_pb2.Any:
    msg: message.Message = (
        cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
        if type_url == CLUSTER
        else endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    )
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


class Mesh:
    """type URL -> {name: version}; served as one snapshot per change, or as fresh dicts."""

    def __init__(self) -> None:
        self.types: dict[str, dict[str, str]] = {CLUSTER: {"a": "1", "b": "1"}, ENDPOINT: {"a": "1", "b": "1"}}
        self._snapshots: dict[str, Snapshot] = {}

    def change(self, type_url: str, name: str, version: str | None) -> None:
        if version is None:
            self.types[type_url].pop(name, None)
        else:
            self.types[type_url][name] = version
        self._snapshots.pop(type_url, None)

    def _items(self, type_url: str) -> list[tuple[str, Resource]]:
        return [(n, Resource(n, v, _packed(type_url, n))) for n, v in self.types.get(type_url, {}).items()]

    def snapshot(self, type_url: str) -> Resources:
        if type_url not in self._snapshots:
            self._snapshots[type_url] = Snapshot(self._items(type_url))
        return self._snapshots[type_url]

    def plain(self, type_url: str) -> Resources:
        return dict(self._items(type_url))


step = st.one_of(
    st.tuples(
        st.just("change"), st.sampled_from(TYPES), st.sampled_from(NAMES), st.sampled_from([None, "1", "2", "3"])
    ),
    st.tuples(st.just("push")),
    st.tuples(st.just("ack"), st.sampled_from(TYPES), st.booleans()),
    st.tuples(st.just("nack"), st.sampled_from(TYPES)),
    st.tuples(
        st.just("subscribe"), st.lists(st.sampled_from(NAMES), max_size=3), st.booleans(), st.sampled_from(TYPES)
    ),
)


def _bytes(responses: list[object]) -> list[bytes]:
    return [r.encode() for r in responses]  # type: ignore[attr-defined]


def _delta_request(step: tuple[object, ...], nonces: dict[str, str]) -> discovery_pb2.DeltaDiscoveryRequest | None:
    kind = step[0]
    if kind == "ack":
        return discovery_pb2.DeltaDiscoveryRequest(type_url=step[1], response_nonce=nonces.get(step[1], ""))
    if kind == "nack":
        r = discovery_pb2.DeltaDiscoveryRequest(type_url=step[1], response_nonce=nonces.get(step[1], ""))
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message="no"))
        return r
    if kind == "subscribe":  # names of clusters too: a wildcard subscription may also name resources
        names, type_url = list(step[1]), step[3]
        if step[2]:
            return discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_unsubscribe=names)
        return discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=names)
    return None


held = st.dictionaries(st.sampled_from(NAMES), st.sampled_from(["1", "2"]), max_size=3)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(step, max_size=30), held, held)
def test_delta_snapshots_send_what_plain_sources_send(
    steps: list[tuple[object, ...]], clusters: dict[str, str], endpoints: dict[str, str]
) -> None:
    """`clusters`, `endpoints`: what the proxy says it holds when it opens the stream (a reconnect)."""
    mesh = Mesh()
    fast, slow = DeltaStreamState(mesh.snapshot), DeltaStreamState(mesh.plain)
    nonces: dict[str, str] = {}
    opening = [
        discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, initial_resource_versions=clusters),
        discovery_pb2.DeltaDiscoveryRequest(
            type_url=ENDPOINT, resource_names_subscribe=["a", "b"], initial_resource_versions=endpoints
        ),
    ]
    for req in opening + [s for s in steps]:  # type: ignore[operator]
        if isinstance(req, tuple):
            if req[0] == "change":
                mesh.change(req[1], req[2], req[3])  # type: ignore[arg-type]
                continue
            if req[0] == "push":
                a, b = fast.on_change(), slow.on_change()
                assert _bytes(a) == _bytes(b)  # type: ignore[arg-type]
                nonces.update({r.type_url: r.nonce for r in a})
                continue
            built = _delta_request(req, nonces)
            if built is None or (req[0] == "ack" and not req[2]):
                continue
            req = built
        x, y = fast.on_request(req), slow.on_request(req)
        assert (x.kind, _bytes(x.responses)) == (y.kind, _bytes(y.responses))  # type: ignore[arg-type]
        nonces.update({r.type_url: r.nonce for r in x.responses})
        for t in TYPES:
            assert fast.types.get(t) is None or fast.types[t].held == slow.types[t].held


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(step, max_size=30))
def test_sotw_snapshots_send_what_plain_sources_send(steps: list[tuple[object, ...]]) -> None:
    mesh = Mesh()
    fast, slow = StreamState(mesh.snapshot), StreamState(mesh.plain)
    sent: dict[str, tuple[str, str]] = {}
    subscribed = ["a", "b"]

    def request(type_url: str, error: bool = False) -> discovery_pb2.DiscoveryRequest:
        nonce, version = sent.get(type_url, ("", ""))
        r = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            response_nonce=nonce,
            version_info=version,
            resource_names=subscribed if type_url == ENDPOINT else [],
        )
        if error:
            r.error_detail.CopyFrom(status_pb2.Status(code=3, message="no"))
        return r

    def answer(req: discovery_pb2.DiscoveryRequest) -> None:
        x, y = fast.on_request(req), slow.on_request(req)
        assert (x.kind, _bytes(x.responses)) == (y.kind, _bytes(y.responses))  # type: ignore[arg-type]
        sent.update({r.type_url: (r.nonce, r.version) for r in x.responses})

    answer(request(CLUSTER))
    answer(request(ENDPOINT))
    for s in steps:
        if s[0] == "change":
            mesh.change(s[1], s[2], s[3])  # type: ignore[arg-type]
        elif s[0] == "push":
            a, b = fast.on_change(), slow.on_change()
            assert _bytes(a) == _bytes(b)  # type: ignore[arg-type]
            sent.update({r.type_url: (r.nonce, r.version) for r in a})
        elif s[0] == "ack" and s[2]:
            answer(request(s[1]))  # type: ignore[arg-type]
        elif s[0] == "nack":
            answer(request(s[1], error=True))  # type: ignore[arg-type]
        elif s[0] == "subscribe" and s[3] == ENDPOINT:
            names = set(subscribed) - set(s[1]) if s[2] else set(subscribed) | set(s[1])  # type: ignore[arg-type]
            subscribed[:] = sorted(names)
            answer(request(ENDPOINT))
