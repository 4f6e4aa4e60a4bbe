"""The ADS state machine against a hand-written fake source: no gRPC, no Envoy."""

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, wrappers_pb2
from google.rpc import status_pb2

from meshplane.controlplane.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resource, Resources
from meshplane.controlplane.stream import StreamState


class FakeSource:
    """type URL -> {name: version}; each resource packs its version string."""

    def __init__(self, **types: dict[str, str]) -> None:
        self.types = {_URL[k]: v for k, v in types.items()}

    def __call__(self, type_url: str) -> Resources:
        out = {}
        for name, version in self.types.get(type_url, {}).items():
            packed = any_pb2.Any()
            packed.Pack(wrappers_pb2.StringValue(value=f"{name}@{version}"))
            out[name] = Resource(name, version, packed)
        return out


_URL = {"cds": CLUSTER, "eds": ENDPOINT, "lds": LISTENER, "rds": ROUTE}


def req(
    type_url: str, names: list[str] | None = None, nonce: str = "", version: str = "", error: str | None = None
) -> discovery_pb2.DiscoveryRequest:
    r = discovery_pb2.DiscoveryRequest(
        type_url=type_url, resource_names=names or [], response_nonce=nonce, version_info=version
    )
    if error:
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return r


def names(resp: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for r in resp.resources:
        v = wrappers_pb2.StringValue()
        r.Unpack(v)
        out.append(v.value)
    return out


def test_first_request_is_answered_even_when_empty() -> None:
    state = StreamState(FakeSource())
    out = state.on_request(req(CLUSTER))
    assert out.kind == "request"
    (resp,) = out.responses
    assert resp.type_url == CLUSTER and resp.nonce and list(resp.resources) == []


def test_ack_sends_nothing_and_records_version() -> None:
    state = StreamState(FakeSource(cds={"a": "1"}))
    (resp,) = state.on_request(req(CLUSTER)).responses
    out = state.on_request(req(CLUSTER, nonce=resp.nonce, version=resp.version_info))
    assert out.kind == "ack" and out.responses == []
    assert state.types[CLUSTER].acked_version == resp.version_info


def test_nack_is_recorded_and_not_resent() -> None:
    source = FakeSource(cds={"a": "1"})
    state = StreamState(source, clock=lambda: 42.0)
    (resp,) = state.on_request(req(CLUSTER)).responses
    out = state.on_request(req(CLUSTER, nonce=resp.nonce, version="", error="bad cluster a"))
    assert out.kind == "nack" and out.responses == []
    assert out.nack is not None and out.nack.message == "bad cluster a" and out.nack.version == resp.version_info
    assert state.types[CLUSTER].last_nack == out.nack
    assert state.on_change() == []  # nothing changed: the bad config is not pushed again
    source.types[CLUSTER] = {"a": "2"}
    (fixed,) = state.on_change()
    assert names(fixed) == ["a@2"]


def test_stale_nonce_is_ignored() -> None:
    source = FakeSource(eds={"x": "1"})
    state = StreamState(source)
    (first,) = state.on_request(req(ENDPOINT, ["x"])).responses
    source.types[ENDPOINT] = {"x": "2", "y": "1"}
    (second,) = state.on_change()
    # A subscription change that answers the older nonce is not acted on...
    out = state.on_request(req(ENDPOINT, ["x", "y"], nonce=first.nonce))
    assert out.kind == "stale" and out.responses == []
    assert state.types[ENDPOINT].names == {"x"}
    # ...the same change on the current nonce is.
    (third,) = state.on_request(req(ENDPOINT, ["x", "y"], nonce=second.nonce)).responses
    assert names(third) == ["x@2", "y@1"]


def test_subscriptions_remember_names_that_do_not_exist_yet() -> None:
    source = FakeSource(rds={"80": "1"})
    state = StreamState(source)
    (resp,) = state.on_request(req(ROUTE, ["80", "8080"])).responses
    assert names(resp) == ["80@1"]
    source.types[ROUTE] = {"80": "1", "8080": "1", "9090": "1"}
    (pushed,) = state.on_change()
    assert names(pushed) == ["80@1", "8080@1"]  # never a name that was not asked for


def test_unsubscribing_and_nothing_to_send() -> None:
    state = StreamState(FakeSource(rds={"80": "1"}))
    assert state.on_request(req(ROUTE, ["nope"])).responses == []  # nothing exists: no empty answer
    (resp,) = state.on_request(req(ROUTE, ["80"])).responses
    (gone,) = state.on_request(req(ROUTE, [], nonce=resp.nonce)).responses
    assert list(gone.resources) == []


def test_no_push_when_nothing_changed() -> None:
    source = FakeSource(cds={"a": "1"}, lds={"l": "1"})
    state = StreamState(source)
    state.on_request(req(CLUSTER))
    state.on_request(req(LISTENER))
    assert state.on_change() == []
    source.types[LISTENER] = {"l": "2"}
    (resp,) = state.on_change()
    assert resp.type_url == LISTENER


def test_endpoints_are_owed_after_clusters_and_sent_on_envoys_request() -> None:
    source = FakeSource(cds={"c": "1"}, eds={"c": "1"})
    state = StreamState(source)
    state.on_request(req(CLUSTER))
    (eds,) = state.on_request(req(ENDPOINT, ["c"])).responses
    state.on_request(req(ENDPOINT, ["c"], nonce=eds.nonce, version=eds.version_info))
    source.types[CLUSTER] = {"c": "2"}  # e.g. its allowed SANs changed; endpoints did not
    (cds,) = state.on_change()  # not the unchanged endpoints: Envoy asks for them next
    assert cds.type_url == CLUSTER
    # Envoy re-creates the cluster and re-requests its endpoints with the same names and nonce.
    (again,) = state.on_request(req(ENDPOINT, ["c"], nonce=eds.nonce, version=eds.version_info)).responses
    assert names(again) == ["c@1"]
    ack = state.on_request(req(ENDPOINT, ["c"], nonce=again.nonce, version=again.version_info))
    assert ack.kind == "ack" and ack.responses == []


def test_a_cluster_added_with_new_endpoints_costs_one_eds_round_trip() -> None:
    source = FakeSource(cds={"a": "1"}, eds={"a": "1"})
    state = StreamState(source)
    state.on_request(req(CLUSTER))
    (eds,) = state.on_request(req(ENDPOINT, ["a"])).responses
    state.on_request(req(ENDPOINT, ["a"], nonce=eds.nonce, version=eds.version_info))
    source.types.update({CLUSTER: {"a": "1", "b": "1"}, ENDPOINT: {"a": "1", "b": "1"}})
    (cds,) = state.on_change()
    assert cds.type_url == CLUSTER
    # Envoy asks for the new cluster's endpoints with the nonce it holds: answered, not stale.
    out = state.on_request(req(ENDPOINT, ["a", "b"], nonce=eds.nonce, version=eds.version_info))
    assert out.kind == "ack" and [names(r) for r in out.responses] == [["a@1", "b@1"]]


def test_push_order_and_removals_last() -> None:
    source = FakeSource(cds={"old": "1", "keep": "1"}, eds={"old": "1", "keep": "1"}, lds={"l": "1"}, rds={"r": "1"})
    state = StreamState(source)
    for t, n in ((CLUSTER, None), (ENDPOINT, ["old", "keep"]), (LISTENER, None), (ROUTE, ["r"])):
        state.on_request(req(t, n))
    source.types.update(
        {
            CLUSTER: {"keep": "1", "new": "1"},
            ENDPOINT: {"keep": "1", "new": "1"},
            LISTENER: {"l": "2"},
            ROUTE: {"r": "2"},
        }
    )
    pushed = state.on_change()
    assert [r.type_url for r in pushed] == [CLUSTER, ENDPOINT, LISTENER, ROUTE, CLUSTER]
    assert names(pushed[0]) == ["keep@1", "new@1", "old@1"]  # make before break
    assert names(pushed[-1]) == ["keep@1", "new@1"]  # the removal, after routes moved away


def test_a_first_request_with_a_nonce_is_a_new_subscription() -> None:
    """After a control-plane restart Envoy opens with the nonce the old server gave it."""
    state = StreamState(FakeSource(cds={"a": "1"}))
    out = state.on_request(req(CLUSTER, nonce="41", version="old"))
    assert out.kind == "request" and len(out.responses) == 1
    (resp,) = out.responses
    assert state.on_request(req(CLUSTER, nonce="41", version="old")).kind == "stale"
    assert state.on_request(req(CLUSTER, nonce=resp.nonce, version=resp.version_info)).kind == "ack"


def test_a_reconnecting_proxy_that_holds_the_version_is_sent_nothing() -> None:
    source = FakeSource(cds={"a": "1"}, eds={"a": "1"})
    first = StreamState(source)
    (cds,) = first.on_request(req(CLUSTER)).responses
    (eds,) = first.on_request(req(ENDPOINT, ["a"])).responses
    again = StreamState(source)  # a new stream: the control plane restarted with the same config
    out = again.on_request(req(CLUSTER, nonce="9", version=cds.version_info))
    assert out.kind == "resumed" and out.responses == []
    assert again.on_request(req(ENDPOINT, ["a"], nonce="3", version=eds.version_info)).responses == []
    source.types[ENDPOINT] = {"a": "2"}  # and a later change is pushed as usual
    (pushed,) = again.on_change()
    assert pushed.type_url == ENDPOINT and names(pushed) == ["a@2"]
    stale = StreamState(source)  # a proxy holding an older version gets the current one
    assert len(stale.on_request(req(CLUSTER, version="old")).responses) == 1
