"""The config cache across model changes: replaced snapshots forget their encoded bodies, streams that
name all of a snapshot share its set of names, and a build gives the freed heap back."""

import dataclasses

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from meshplane.controlplane import meshfile, server
from meshplane.controlplane.cache import ConfigCache, ViewRequest
from meshplane.controlplane.delta import DeltaStreamState
from meshplane.controlplane.model import InterceptionMode, MeshModel
from meshplane.controlplane.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot
from meshplane.controlplane.stream import StreamState

MESH = """
services:
  - {name: web, namespace: shop, ports: [{port: 80, name: http}], selector: {app: web}, addresses: [10.96.0.1]}
  - {name: db, namespace: shop, ports: [{port: 5432, name: tcp}], selector: {app: db}, addresses: [10.96.0.2]}
workloads:
  - {name: web-1, namespace: shop, serviceAccount: web, labels: {app: web}, address: 10.0.0.1}
  - {name: db-1, namespace: shop, serviceAccount: db, labels: {app: db}, address: 10.0.0.2}
"""


class NoSecrets:
    trust_bundle_pem = b""


def snapshots(cache: ConfigCache) -> dict[str, Snapshot]:
    view = cache.view(cache.model.workloads[0])
    out = {t: cache.resources(view, t) for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)}
    assert all(isinstance(s, Snapshot) for s in out.values())
    return out  # type: ignore[return-value]


def test_a_model_change_retires_the_snapshots_it_replaces() -> None:
    model = meshfile.parse(MESH)
    cache = ConfigCache(model, NoSecrets())  # type: ignore[arg-type]
    before = snapshots(cache)
    for s in before.values():
        s.memo("body", lambda: b"encoded once")
        assert s.memo("body", lambda: b"again") == b"encoded once"
    # db-1 moves: its endpoints change, nothing else does.
    moved = dataclasses.replace(model.workloads[1], address="10.0.0.3")
    changed = dataclasses.replace(model, workloads=(model.workloads[0], moved))
    # Staged as the server stages a change: with the views of the connected proxies.
    cache.adopt(cache.staged(changed, [(model.workloads[0], InterceptionMode.REDIRECT, False, False)]))
    after = snapshots(cache)
    assert after[ENDPOINT].diff(before[ENDPOINT]) == (("outbound|5432||db.shop.svc.cluster.local",), ())
    for t in (CLUSTER, LISTENER, ROUTE):
        assert after[t].diff(before[t]) == ((), ()), t
    for t, s in before.items():
        # Still whole (streams that hold it diff against it), but it keeps no bodies.
        assert s.versions() == {n: r.version for n, r in s.items()}, t
        assert s.memo("body", lambda: b"again") == b"again", t


def test_streams_that_subscribe_to_all_of_a_snapshot_share_one_set_of_names() -> None:
    cache = ConfigCache(meshfile.parse(MESH), NoSecrets())  # type: ignore[arg-type]
    view = cache.view(cache.model.workloads[0])
    endpoints = cache.resources(view, ENDPOINT)
    assert isinstance(endpoints, Snapshot)
    everything = sorted(endpoints)

    def source(type_url: str) -> dict[str, object]:
        return cache.resources(view, type_url)  # type: ignore[return-value]

    deltas = [DeltaStreamState(source) for _ in range(2)]  # type: ignore[arg-type]
    for d in deltas:
        d.on_request(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, resource_names_subscribe=everything))
    sotws = [StreamState(source) for _ in range(2)]  # type: ignore[arg-type]
    for s in sotws:
        s.on_request(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=everything))
    held = [d.types[ENDPOINT].names for d in deltas] + [s.types[ENDPOINT].names for s in sotws]
    assert all(names is endpoints.names() for names in held)
    # Naming only part of it: a set of the stream's own, with exactly those names.
    deltas[0].on_request(
        discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, resource_names_unsubscribe=everything[:1])
    )
    assert deltas[0].types[ENDPOINT].names == set(everything[1:])
    assert deltas[1].types[ENDPOINT].names is endpoints.names()


def test_a_model_build_hands_the_freed_heap_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server builds each model in a thread, then trims the C heap there: the generation before was
    freed by then, and glibc keeps freed pages otherwise (RSS drifted up with every change)."""
    calls: list[str] = []
    model = meshfile.parse(MESH)
    cache = ConfigCache(model, NoSecrets())  # type: ignore[arg-type]

    def build(m: MeshModel, wanted: list[ViewRequest]) -> ConfigCache:
        calls.append("build")
        return cache.staged(m, wanted)

    monkeypatch.setattr(server, "_MALLOC_TRIM", lambda pad: calls.append(f"trim {pad}") or 1)
    staged, cpu = server._timed(build, model, [(model.workloads[0], InterceptionMode.REDIRECT, False, False)])
    assert calls == ["build", "trim 0"] and staged.views() == 1 and cpu >= 0
