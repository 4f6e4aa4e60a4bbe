"""The fake API server against the real `kubernetes` client: lists, paging, watches, failures, TokenReview.

These tests also pin down what this client version does at the edges (observed with kubernetes 37):

- A watch from a compacted resourceVersion: the server sends one ERROR event (Status 410 Expired).
  `Watch.stream` never yields it: it reconnects once with the same resourceVersion, gets the
  ERROR again and raises `ApiException(status=410)`. With `timeout_seconds` it raises on the first.
- A watch connection dropped mid-stream: `Watch.stream` raises `urllib3.exceptions.ProtocolError`
  ("Response ended prematurely"); it does not reconnect.
- A watch stream the server ends cleanly: without `timeout_seconds`, `Watch.stream` silently
  re-watches from the last resourceVersion it saw (events or bookmarks); with it, the generator ends.
"""

import asyncio
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, watch

from tests.fakekube import (
    API_AUDIENCE,
    INITIAL_EVENTS_END,
    ApiError,
    FakeKube,
    endpoint_slice,
    namespace,
    pod,
    service,
)

PODS_DEMO = "/api/v1/namespaces/demo/pods"


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as server:
        server.create(namespace("demo"))
        yield server


@pytest.fixture
def api(kube: FakeKube, tmp_path: Path) -> Iterator[client.ApiClient]:
    path = kube.write_kubeconfig(tmp_path / "kubeconfig")
    api_client = config.new_client_from_config(config_file=str(path))
    try:
        yield api_client
    finally:
        api_client.close()


class Watching:
    """Runs `Watch.stream(func, *args, **kwargs)` in a thread; events, then how it ended, in a queue."""

    def __init__(self, func: Any, *args: Any, **kwargs: Any) -> None:
        self.watch = watch.Watch()
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(func, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, func: Any, args: Any, kwargs: Any) -> None:
        try:
            for event in self.watch.stream(func, *args, **kwargs):
                self.events.put((event["type"], event))
        except Exception as exc:
            self.events.put(("RAISED", exc))
        else:
            self.events.put(("ENDED", None))

    def next(self, timeout: float = 5.0) -> tuple[str, Any]:
        return self.events.get(timeout=timeout)

    def stop(self) -> None:
        self.watch.stop()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive()


def raw(response: Any) -> Any:
    """The JSON body of a `_preload_content=False` call."""
    return json.loads(response.data)


def test_kubeconfig_works_with_load_kube_config(kube: FakeKube, tmp_path: Path) -> None:
    path = kube.write_kubeconfig(tmp_path / "config", namespace="demo")
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=configuration)
    assert configuration.host == kube.url
    with client.ApiClient(configuration) as api_client:
        names = [n.metadata.name for n in client.CoreV1Api(api_client).list_namespace().items]
    assert names == ["demo"]


def test_wrong_token_is_unauthorized(kube: FakeKube) -> None:
    configuration = client.Configuration()
    configuration.host = kube.url
    configuration.api_key = {"authorization": "Bearer wrong"}
    with client.ApiClient(configuration) as api_client, pytest.raises(client.ApiException) as caught:
        client.CoreV1Api(api_client).list_namespace()
    assert caught.value.status == 401
    assert json.loads(caught.value.body)["reason"] == "Unauthorized"


def test_objects_have_the_api_shapes(kube: FakeKube, api: client.ApiClient) -> None:
    kube.create(pod("web-1", "demo", ip="10.0.0.5", labels={"app": "web"}, service_account="web"))
    kube.create(service("web", "demo", selector={"app": "web"}, ports=[("http", 8080)]))
    kube.create(endpoint_slice("web-abcde", "demo", "web", addresses=["10.0.0.5"], target_pods=["web-1"]))
    kube.create(endpoint_slice("web-empty", "demo", "web", ports=[]))
    core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)

    listed = raw(core.list_namespaced_pod("demo", _preload_content=False))
    assert listed["kind"] == "PodList" and listed["apiVersion"] == "v1"
    assert listed["metadata"] == {"resourceVersion": kube.resource_version}
    item = listed["items"][0]
    assert "kind" not in item and "apiVersion" not in item  # as the real server: no TypeMeta on items
    assert set(item["metadata"]) >= {"name", "namespace", "uid", "resourceVersion", "creationTimestamp", "labels"}

    one = core.read_namespaced_pod("web-1", "demo")
    assert (one.kind, one.api_version, one.status.pod_ip) == ("Pod", "v1", "10.0.0.5")
    assert one.spec.service_account_name == "web"
    svc = core.read_namespaced_service("web", "demo")
    assert svc.spec.cluster_ip.startswith("10.96.") and svc.spec.ports[0].target_port == 8080

    slices = {s.metadata.name: s for s in discovery.list_endpoint_slice_for_all_namespaces().items}
    assert slices["web-abcde"].endpoints[0].addresses == ["10.0.0.5"]
    assert slices["web-abcde"].endpoints[0].target_ref.name == "web-1"
    assert slices["web-empty"].endpoints is None and slices["web-empty"].ports is None  # null, as the real server
    assert [s.metadata.name for s in discovery.list_namespaced_endpoint_slice("demo").items] == [
        "web-abcde",
        "web-empty",
    ]

    with pytest.raises(client.ApiException) as caught:
        core.read_namespaced_pod("missing", "demo")
    status = json.loads(caught.value.body)
    assert (caught.value.status, status["kind"], status["reason"]) == (404, "Status", "NotFound")


def test_selectors(kube: FakeKube, api: client.ApiClient) -> None:
    kube.create(namespace("other"))
    for name, ns, app in [("a", "demo", "web"), ("b", "demo", "db"), ("c", "other", "web")]:
        kube.create(pod(name, ns, labels={"app": app, "tier": "x"}))
    core = client.CoreV1Api(api)

    def names(**kwargs: Any) -> list[str]:
        return [p.metadata.name for p in core.list_pod_for_all_namespaces(**kwargs).items]

    assert names() == ["a", "b", "c"]
    assert names(label_selector="app=web") == ["a", "c"]
    assert names(label_selector="app!=web,tier==x") == ["b"]
    assert names(label_selector="app in (db, cache)") == ["b"]
    assert names(label_selector="!tier") == []
    assert names(field_selector="metadata.namespace=other") == ["c"]
    assert names(field_selector="metadata.name=b") == ["b"]


def test_list_paging_is_a_consistent_snapshot(kube: FakeKube, api: client.ApiClient) -> None:
    for i in range(5):
        kube.create(pod(f"p{i}", "demo"))
    core = client.CoreV1Api(api)

    first = core.list_namespaced_pod("demo", limit=2)
    assert [p.metadata.name for p in first.items] == ["p0", "p1"]
    assert first.metadata.remaining_item_count == 3
    kube.create(pod("p2a", "demo"))  # written between pages: not part of the snapshot
    kube.delete("Pod", "p3", "demo")
    names = [p.metadata.name for p in first.items]
    token = first.metadata.var_continue
    pages = 1
    while token:
        page = core.list_namespaced_pod("demo", limit=2, _continue=token)
        assert page.metadata.resource_version == first.metadata.resource_version
        names += [p.metadata.name for p in page.items]
        token = page.metadata.var_continue
        pages += 1
        assert pages <= 5
    assert names == ["p0", "p1", "p2", "p3", "p4"]
    assert pages == 3 and kube.count(PODS_DEMO) == 3


def test_expired_continue_token_is_410(kube: FakeKube, api: client.ApiClient) -> None:
    for i in range(3):
        kube.create(pod(f"p{i}", "demo"))
    core = client.CoreV1Api(api)
    first = core.list_namespaced_pod("demo", limit=1)
    kube.create(pod("later", "demo"))
    kube.compact()
    with pytest.raises(client.ApiException) as caught:
        core.list_namespaced_pod("demo", limit=1, _continue=first.metadata.var_continue)
    status = json.loads(caught.value.body)
    assert (caught.value.status, status["reason"], status["code"]) == (410, "Expired", 410)


def test_watch_sees_added_modified_deleted_in_order(kube: FakeKube, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    start = core.list_namespaced_pod("demo").metadata.resource_version
    watching = Watching(core.list_namespaced_pod, "demo", resource_version=start)
    try:
        kube.wait_for_watches(1)
        kube.create(pod("p", "demo", labels={"v": "1"}))
        updated = kube.get("Pod", "p", "demo")
        assert updated is not None
        updated["metadata"]["labels"]["v"] = "2"
        written = kube.update(updated)
        assert kube.update(written) == written  # no change: no write, no event
        kube.delete("Pod", "p", "demo")
        events = [watching.next() for _ in range(3)]
    finally:
        watching.stop()
    kube.wait_for_watches(0)  # the server noticed that the client went away
    assert [t for t, _ in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert [e["object"].metadata.labels["v"] for _, e in events] == ["1", "2", "2"]
    versions = [int(e["object"].metadata.resource_version) for _, e in events]
    assert versions == sorted(versions) and versions[0] > int(start)
    assert all(e["raw_object"]["kind"] == "Pod" for _, e in events)  # event objects carry their kind


def test_watch_without_resource_version_starts_with_the_current_state(kube: FakeKube, api: client.ApiClient) -> None:
    kube.create(pod("a", "demo"))
    kube.create(pod("b", "demo"))
    watching = Watching(client.CoreV1Api(api).list_namespaced_pod, "demo", timeout_seconds=5)
    try:
        first = [watching.next() for _ in range(2)]
    finally:
        watching.stop()
    assert [(t, e["object"].metadata.name) for t, e in first] == [("ADDED", "a"), ("ADDED", "b")]


def test_watch_resumes_from_a_resource_version(kube: FakeKube, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    kube.create(pod("old", "demo"))
    after_old = kube.resource_version
    kube.create(pod("new", "demo"))
    kube.delete("Pod", "old", "demo")
    watching = Watching(core.list_namespaced_pod, "demo", resource_version=after_old, timeout_seconds=5)
    try:
        events = [watching.next() for _ in range(2)]
    finally:
        watching.stop()
    assert [(t, e["object"].metadata.name) for t, e in events] == [("ADDED", "new"), ("DELETED", "old")]


def test_a_label_change_moves_an_object_in_and_out_of_a_selective_watch(kube: FakeKube, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    start = kube.resource_version
    watching = Watching(core.list_namespaced_pod, "demo", resource_version=start, label_selector="app=web")
    try:
        kube.wait_for_watches(1)
        kube.create(pod("p", "demo", labels={"app": "db"}))
        for app in ("web", "db"):
            obj = kube.get("Pod", "p", "demo")
            assert obj is not None
            obj["metadata"]["labels"]["app"] = app
            kube.update(obj)
        events = [watching.next() for _ in range(2)]
    finally:
        watching.stop()
    assert [t for t, _ in events] == ["ADDED", "DELETED"]


def test_expired_resource_version_raises_410_after_one_retry(kube: FakeKube, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    stale = kube.resource_version
    kube.create(pod("p", "demo"))
    kube.compact()

    # What the server sends: HTTP 200, one ERROR event with a 410 Status, end of stream.
    response = core.list_namespaced_pod("demo", watch=True, resource_version=stale, _preload_content=False)
    lines = response.data.decode().splitlines()
    assert response.status == 200 and len(lines) == 1
    event = json.loads(lines[0])
    assert event["type"] == "ERROR"
    assert event["object"]["kind"] == "Status" and event["object"]["code"] == 410
    assert event["object"]["reason"] == "Expired" and "too old resource version" in event["object"]["message"]

    # What the client does: retries once with the same resourceVersion, then raises.
    before = kube.count(PODS_DEMO, watch=True)
    with pytest.raises(client.ApiException) as caught:
        list(watch.Watch().stream(core.list_namespaced_pod, "demo", resource_version=stale))
    assert caught.value.status == 410 and "Expired" in caught.value.reason
    assert kube.count(PODS_DEMO, watch=True) - before == 2

    with pytest.raises(client.ApiException) as caught:  # no retry when timeout_seconds is given
        list(watch.Watch().stream(core.list_namespaced_pod, "demo", resource_version=stale, timeout_seconds=5))
    assert caught.value.status == 410
    assert kube.count(PODS_DEMO, watch=True) - before == 3


def test_history_is_bounded() -> None:
    with FakeKube(history=3) as small, small.new_client() as api_client:
        small.create(namespace("demo"))
        first = small.resource_version
        for i in range(4):
            small.create(pod(f"p{i}", "demo"))
        kept = str(int(first) + 1)  # the last 3 changes are kept: a watch from here still works
        core = client.CoreV1Api(api_client)
        events = list(watch.Watch().stream(core.list_namespaced_pod, "demo", resource_version=kept, timeout_seconds=1))
        assert [e["object"].metadata.name for e in events] == ["p1", "p2", "p3"]
        with pytest.raises(client.ApiException) as caught:
            list(watch.Watch().stream(core.list_namespaced_pod, "demo", resource_version=first, timeout_seconds=1))
        assert caught.value.status == 410


def test_bookmarks(kube: FakeKube, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    start = kube.resource_version
    with_marks = Watching(core.list_namespaced_pod, "demo", resource_version=start, allow_watch_bookmarks=True)
    without = Watching(core.list_namespaced_pod, "demo", resource_version=start)
    try:
        kube.wait_for_watches(2)
        kube.create(namespace("elsewhere"))  # moves the global resourceVersion, not a pod event
        rv = kube.bookmark()
        kind, event = with_marks.next()
        assert kind == "BOOKMARK"
        assert event["raw_object"] == {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv}}
        assert with_marks.watch.resource_version == rv  # the client resumes from the bookmark
        kube.create(pod("p", "demo"))
        assert without.next()[0] == "ADDED"  # no bookmark before it
    finally:
        with_marks.stop()
        without.stop()


def test_initial_events_end_with_an_annotated_bookmark(kube: FakeKube, api: client.ApiClient) -> None:
    kube.create(pod("a", "demo"))
    response = client.CoreV1Api(api).list_namespaced_pod(
        "demo",
        watch=True,
        allow_watch_bookmarks=True,
        send_initial_events=True,
        resource_version_match="NotOlderThan",
        timeout_seconds=1,
        _preload_content=False,
    )
    events = [json.loads(line) for line in response.data.decode().splitlines()]
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["annotations"] == {INITIAL_EVENTS_END: "true"}


def test_periodic_bookmarks() -> None:
    with FakeKube(bookmark_interval=0.2) as kube, kube.new_client() as api_client:
        core = client.CoreV1Api(api_client)
        response = core.list_namespace(
            watch=True,
            resource_version=kube.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=1,
            _preload_content=False,
        )
        types = [json.loads(line)["type"] for line in response.data.decode().splitlines()]
    assert 2 <= len(types) <= 5 and set(types) == {"BOOKMARK"}


def test_timeout_seconds_ends_the_stream(kube: FakeKube, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    watching = Watching(core.list_namespaced_pod, "demo", resource_version=kube.resource_version, timeout_seconds=1)
    assert watching.next(timeout=5) == ("ENDED", None)
    watching.stop()
    assert kube.count(PODS_DEMO, watch=True) == 1


def test_a_dropped_connection_ends_the_clients_stream(kube: FakeKube, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    watching = Watching(core.list_namespaced_pod, "demo", resource_version=kube.resource_version)
    try:
        kube.wait_for_watches(1)
        kube.create(pod("p", "demo"))
        assert watching.next()[0] == "ADDED"
        assert kube.drop_watches() == 1
        kind, error = watching.next()
    finally:
        watching.stop()
    assert kind == "RAISED" and isinstance(error, urllib3.exceptions.ProtocolError)
    assert kube.count(PODS_DEMO, watch=True) == 1  # the client did not reconnect by itself
    assert kube.open_watches == 0


def test_a_clean_end_makes_the_client_rewatch_from_its_last_version(kube: FakeKube, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    watching = Watching(core.list_namespaced_pod, "demo", resource_version=kube.resource_version)
    try:
        kube.wait_for_watches(1)
        kube.create(pod("a", "demo"))
        assert watching.next()[0] == "ADDED"
        seen = kube.resource_version
        kube.drop_watches(graceful=True)
        kube.wait_for_watches(2, total=True)
        kube.create(pod("b", "demo"))
        kind, event = watching.next()
    finally:
        watching.stop()
    assert (kind, event["object"].metadata.name) == ("ADDED", "b")  # nothing lost, nothing repeated
    rewatch = kube.requests(PODS_DEMO, watch=True)[1]
    assert rewatch.query["resourceVersion"] == seen


def test_expire_watches_sends_410_to_open_watches(kube: FakeKube, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    watching = Watching(core.list_namespaced_pod, "demo", resource_version=kube.resource_version, timeout_seconds=30)
    try:
        kube.wait_for_watches(1)
        assert kube.expire_watches() == 1
        kind, error = watching.next()
    finally:
        watching.stop()
    assert kind == "RAISED" and isinstance(error, client.ApiException) and error.status == 410


def test_injected_failures_and_request_counts(kube: FakeKube, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    kube.fail(PODS_DEMO, 500, times=2, watch=False)
    kube.fail(PODS_DEMO, 429, retry_after=None)
    for expected in (500, 500, 429):
        with pytest.raises(client.ApiException) as caught:
            core.list_namespaced_pod("demo")
        assert caught.value.status == expected
    assert json.loads(caught.value.body)["reason"] == "TooManyRequests"
    assert core.list_namespaced_pod("demo").items == []
    assert kube.count(PODS_DEMO) == 4
    assert kube.count("/api/v1/namespaces") == 0

    # With Retry-After, urllib3 (under the client) retries a 429 by itself, up to 3 times.
    kube.fail(PODS_DEMO, 429, times=2, retry_after=0)
    assert core.list_namespaced_pod("demo").items == []
    assert kube.count(PODS_DEMO) == 7

    kube.fail(PODS_DEMO, 503, watch=True)  # only the watch fails
    core.list_namespaced_pod("demo")
    with pytest.raises(client.ApiException) as caught:
        list(watch.Watch().stream(core.list_namespaced_pod, "demo", timeout_seconds=1))
    assert caught.value.status == 503
    assert kube.count(PODS_DEMO, watch=True) == 1


def test_token_review(kube: FakeKube, api: client.ApiClient) -> None:
    kube.add_token("good", "demo", "web", audiences=["meshplane"], pod_name="web-1")
    kube.add_token("apiserver-only", "demo", "db")
    auth = client.AuthenticationV1Api(api)

    def review(token: str, audiences: list[str] | None = None) -> Any:
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=audiences))
        return auth.create_token_review(body)

    ok = review("good", ["meshplane", "other"])
    assert ok.status.authenticated is True and ok.status.error is None
    assert ok.status.user.username == "system:serviceaccount:demo:web"
    assert "system:serviceaccounts:demo" in ok.status.user.groups
    assert ok.status.user.extra["authentication.kubernetes.io/pod-name"] == ["web-1"]
    assert ok.status.audiences == ["meshplane"]

    wrong_audience = review("good", ["someone-else"])
    assert not wrong_audience.status.authenticated and "invalid" in wrong_audience.status.error
    assert wrong_audience.status.user.username is None

    unknown = review("nope", ["meshplane"])
    assert not unknown.status.authenticated and unknown.status.error

    default_audience = review("apiserver-only")
    assert default_audience.status.authenticated and default_audience.status.audiences == [API_AUDIENCE]

    kube.revoke_token("good")
    assert not review("good", ["meshplane"]).status.authenticated
    assert kube.count("/apis/authentication.k8s.io/v1/tokenreviews") == 5


def test_controls_raise_like_the_api(kube: FakeKube) -> None:
    created = kube.create(pod("p", "demo"))
    with pytest.raises(ApiError) as exists:
        kube.create(pod("p", "demo"))
    assert exists.value.code == 409
    stale = dict(created)
    kube.update(created | {"spec": {**created["spec"], "nodeName": "node-2"}})
    with pytest.raises(ApiError) as conflict:
        kube.update(stale | {"spec": {**stale["spec"], "nodeName": "node-3"}})
    assert conflict.value.reason == "Conflict"
    assert kube.apply(pod("p", "demo", node="node-4"))["spec"]["nodeName"] == "node-4"
    with pytest.raises(ApiError):
        kube.delete("Pod", "missing", "demo")
    with pytest.raises(ValueError):
        kube.create({"kind": "ConfigMap", "metadata": {"name": "x"}})


async def test_usable_from_async_code() -> None:
    async with FakeKube() as kube:
        kube.create(namespace("demo"))
        api_client = kube.new_client()
        try:
            core = client.CoreV1Api(api_client)
            rv = kube.resource_version
            collected: list[str] = []

            def follow() -> None:
                for event in watch.Watch().stream(core.list_namespace, resource_version=rv, timeout_seconds=2):
                    collected.append(event["object"].metadata.name)
                    if len(collected) == 2:
                        return

            task = asyncio.create_task(asyncio.to_thread(follow))
            await asyncio.to_thread(kube.wait_for_watches, 1)
            kube.create(namespace("a"))
            kube.create(namespace("b"))
            await asyncio.wait_for(task, 5)
            names = await asyncio.to_thread(lambda: [n.metadata.name for n in core.list_namespace().items])
        finally:
            api_client.close()
    assert collected == ["a", "b"]
    assert names == ["a", "b", "demo"]


def test_cluster_wide_endpoint_slice_watch(kube: FakeKube, api: client.ApiClient) -> None:
    kube.create(namespace("other"))
    discovery = client.DiscoveryV1Api(api)
    watching = Watching(
        discovery.list_endpoint_slice_for_all_namespaces, resource_version=kube.resource_version, timeout_seconds=10
    )
    try:
        kube.wait_for_watches(1)
        kube.create(endpoint_slice("web-1", "demo", "web", addresses=["10.0.0.1"]))
        kube.create(endpoint_slice("web-2", "other", "web"))
        events = [watching.next() for _ in range(2)]
    finally:
        watching.stop()
    slices = [e["object"] for _, e in events]
    assert all(isinstance(s, client.V1EndpointSlice) for s in slices)
    assert [(s.metadata.namespace, s.endpoints) for s in slices][1] == ("other", None)
    assert slices[0].endpoints[0].addresses == ["10.0.0.1"]


def test_bad_parameters_are_400(kube: FakeKube, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    for kwargs in ({"label_selector": "app in web"}, {"resource_version": "abc"}, {"_continue": "garbage"}):
        with pytest.raises(client.ApiException) as caught:
            core.list_namespaced_pod("demo", **kwargs)
        assert caught.value.status == 400, kwargs


def test_stop_ends_open_watches_at_once() -> None:
    kube = FakeKube().start()
    api_client = kube.new_client()
    try:
        watching = Watching(client.CoreV1Api(api_client).list_namespace)
        kube.wait_for_watches(1)
        kube.stop()
        kind, error = watching.next()
        assert kind == "RAISED" and isinstance(error, urllib3.exceptions.ProtocolError)
        watching.stop()
    finally:
        kube.stop()
        api_client.close()
