"""The incremental (delta) ADS state machine against a hand-written fake source: no gRPC, no Envoy."""

from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2

from meshplane.controlplane.delta import DeltaStreamState
from meshplane.controlplane.resources import CLUSTER, ENDPOINT, LISTENER, Resource, Resources


class Source:
    """type URL -> {name: version}; clusters are EDS clusters named after themselves."""

    def __init__(self, **types: dict[str, str]) -> None:
        self.types = {_URL[k]: v for k, v in types.items()}

    def __call__(self, type_url: str) -> Resources:
        out = {}
        for name, version in self.types.get(type_url, {}).items():
            packed = any_pb2.Any()
            packed.Pack(cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS))
            out[name] = Resource(name, version, packed)
        return out


_URL = {"cds": CLUSTER, "eds": ENDPOINT, "lds": LISTENER}


def req(
    type_url: str,
    subscribe: list[str] | None = None,
    unsubscribe: list[str] | None = None,
    nonce: str = "",
    initial: dict[str, str] | None = None,
    error: str | None = None,
) -> discovery_pb2.DeltaDiscoveryRequest:
    r = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url,
        resource_names_subscribe=subscribe or [],
        resource_names_unsubscribe=unsubscribe or [],
        response_nonce=nonce,
        initial_resource_versions=initial or {},
    )
    if error:
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return r


def sent(resp: discovery_pb2.DeltaDiscoveryResponse) -> dict[str, str]:
    return {r.name: r.version for r in resp.resources}


def test_wildcard_initial_sync_then_only_changes_and_removals() -> None:
    source = Source(cds={"a": "1", "b": "1"})
    state = DeltaStreamState(source)
    (first,) = state.on_request(req(CLUSTER)).responses
    assert sent(first) == {"a": "1", "b": "1"} and not first.removed_resources
    assert state.on_request(req(CLUSTER, nonce=first.nonce)).kind == "ack"
    source.types[CLUSTER] = {"a": "2", "c": "1"}
    changes, removals = state.on_change()
    assert sent(changes) == {"a": "2", "c": "1"} and not changes.removed_resources
    assert list(removals.removed_resources) == ["b"] and not removals.resources
    assert state.on_change() == []  # nothing changed since


def test_a_reconnect_that_holds_everything_is_sent_nothing_but_what_differs() -> None:
    source = Source(cds={"a": "1", "b": "2", "c": "1"})
    state = DeltaStreamState(source)
    out = state.on_request(req(CLUSTER, initial={"a": "1", "b": "1", "gone": "1"}))
    (resp,) = out.responses
    assert sent(resp) == {"b": "2", "c": "1"} and list(resp.removed_resources) == ["gone"]
    again = DeltaStreamState(source)
    assert again.on_request(req(CLUSTER, initial={"a": "1", "b": "2", "c": "1"})).responses == []
    fresh = DeltaStreamState(Source())
    (empty,) = fresh.on_request(req(CLUSTER)).responses  # a new Envoy waits for its first answer
    assert not empty.resources and not empty.removed_resources


def test_named_subscriptions_and_resources_that_do_not_exist() -> None:
    source = Source(eds={"a": "1", "b": "1"})
    state = DeltaStreamState(source)
    (resp,) = state.on_request(req(ENDPOINT, ["a", "nope"])).responses
    assert sent(resp) == {"a": "1"} and list(resp.removed_resources) == ["nope"]
    state.on_request(req(ENDPOINT, nonce=resp.nonce))
    (more,) = state.on_request(req(ENDPOINT, ["b"])).responses
    assert sent(more) == {"b": "1"} and not more.removed_resources  # "nope" is not reported twice
    state.on_request(req(ENDPOINT, nonce=more.nonce))
    assert state.on_request(req(ENDPOINT, unsubscribe=["a"])).responses == []
    source.types[ENDPOINT] = {"a": "2", "b": "2"}
    (push,) = state.on_change()
    assert sent(push) == {"b": "2"}  # "a" is no longer subscribed


def test_a_nacked_version_is_not_sent_again_until_it_changes() -> None:
    source = Source(cds={"a": "1"})
    state = DeltaStreamState(source)
    (first,) = state.on_request(req(CLUSTER)).responses
    state.on_request(req(CLUSTER, nonce=first.nonce))
    source.types[CLUSTER] = {"a": "bad"}
    (bad,) = state.on_change()
    out = state.on_request(req(CLUSTER, nonce=bad.nonce, error="invalid"))
    assert out.kind == "nack" and out.nack is not None and out.nack.resources == ("a",)
    source.types[CLUSTER] = {"a": "bad", "b": "1"}
    (push,) = state.on_change()
    assert sent(push) == {"b": "1"}  # not the rejected version again
    state.on_request(req(CLUSTER, nonce=push.nonce))
    source.types[CLUSTER] = {"a": "fixed", "b": "1"}
    (fixed,) = state.on_change()
    assert sent(fixed) == {"a": "fixed"}


def test_endpoints_of_changed_clusters_are_sent_again() -> None:
    source = Source(cds={"a": "1", "b": "1"}, eds={"a": "1", "b": "1"})
    state = DeltaStreamState(source)
    (cds,) = state.on_request(req(CLUSTER)).responses
    state.on_request(req(CLUSTER, nonce=cds.nonce))
    (eds,) = state.on_request(req(ENDPOINT, ["a", "b"])).responses
    state.on_request(req(ENDPOINT, nonce=eds.nonce))
    source.types[CLUSTER] = {"a": "2", "b": "1"}  # its SANs changed, its endpoints did not
    clusters, endpoints = state.on_change()
    assert sent(clusters) == {"a": "2"} and sent(endpoints) == {"a": "1"}


def test_a_stale_nonce_still_changes_the_subscription() -> None:
    source = Source(eds={"a": "1", "b": "1"})
    state = DeltaStreamState(source)
    assert len(state.on_request(req(ENDPOINT, ["a"])).responses) == 1
    out = state.on_request(req(ENDPOINT, ["b"], nonce="old"))
    assert out.kind == "stale" and [sent(r) for r in out.responses] == [{"b": "1"}]
