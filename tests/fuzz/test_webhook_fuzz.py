"""The injection webhook over real HTTPS, fed random and malformed AdmissionReviews.

Properties: no answer is a 5xx, none hangs, and every answer is either a 400 with a message or a
well-formed AdmissionReview v1 response for the request's uid whose patch (if any) is base64
JSONPatch that applies to the pod. An "internal error" denial counts as a failure too: it is a
500 wrapped in a 200.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
from aiohttp import web
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from meshplane.controlplane.ca import CertificateAuthority
from meshplane.webhook import review
from meshplane.webhook.app import MAX_BODY, ServingCertificate, make_app
from meshplane.webhook.config import InjectionConfig
from meshplane.webhook.inject import inject
from tests.fuzz import LoopThread
from tests.harness import MESH_ROOT


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))


# -- the server: one real HTTPS webhook for the module, on its own loop -----------------------------


class Webhook:
    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.port, self.ctx = port, ctx
        self.conn: http.client.HTTPSConnection | None = None

    def post(self, body: bytes, path: str = "/inject", content_type: str = "application/json") -> tuple[int, bytes]:
        """POST on a kept-alive connection (reconnecting when the server closed it); 10 s is a hang."""
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=10)
            try:
                self.conn.request("POST", path, body=body, headers={"content-type": content_type})
                r = self.conn.getresponse()
                data = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.close()
                return r.status, data
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    ca_dir: Path = tmp_path_factory.mktemp("ca")
    loop = LoopThread()

    async def start() -> tuple[web.AppRunner, int, CertificateAuthority]:
        ca = CertificateAuthority(ca_dir, "cluster.local")
        cert = ServingCertificate(ca, ["127.0.0.1"], ttl=dt.timedelta(hours=1))
        runner = web.AppRunner(make_app(InjectionConfig(xds_ca=MESH_ROOT)), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=cert.context).start()
        return runner, runner.addresses[0][1], ca

    runner, port, ca = loop.run(start())
    client = Webhook(port, ssl.create_default_context(cadata=ca.root_pem.decode()))
    yield client
    client.close()
    loop.run(runner.cleanup())
    loop.close()


# -- strategies ------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)

ISTIO_ANNOTATIONS = [
    "sidecar.istio.io/inject",
    "sidecar.istio.io/status",
    "sidecar.istio.io/proxyImage",
    "sidecar.istio.io/proxyCPU",
    "sidecar.istio.io/proxyCPULimit",
    "sidecar.istio.io/proxyMemory",
    "sidecar.istio.io/proxyMemoryLimit",
    "sidecar.istio.io/logLevel",
    "sidecar.istio.io/componentLogLevel",
    "sidecar.istio.io/nativeSidecar",
    "sidecar.istio.io/rewriteAppHTTPProbers",
    "proxy.istio.io/config",
    "traffic.sidecar.istio.io/includeInboundPorts",
    "traffic.sidecar.istio.io/excludeInboundPorts",
    "traffic.sidecar.istio.io/includeOutboundIPRanges",
    "traffic.sidecar.istio.io/excludeOutboundIPRanges",
    "traffic.sidecar.istio.io/excludeOutboundPorts",
    "traffic.sidecar.istio.io/excludeInterfaces",
    "istio.io/rev",
    "prometheus.io/scrape",
]
PLAUSIBLE_VALUES = [
    "true",
    "false",
    "yes",
    "no",
    "on",
    "off",
    "enabled",
    "*",
    "",
    " ",
    "8080",
    "8080,9090",
    "0",
    "65536",
    "10.0.0.0/8",
    "10.0.0.0/8,fd00::/8",
    "::1",
    "100m",
    "0.5",
    "128Mi",
    "1G",
    "-1",
    "debug",
    "info",
    "warning",
    "off",
    "misc:debug,upstream:info",
    "eth0,net1",
    "holdApplicationUntilProxyStarts: true",
    "terminationDrainDuration: 7s",
    "terminationDrainDuration: 2h",
    "{}",
    "[1, 2]",
    "- a",
    "{holdApplicationUntilProxyStarts: maybe}",
    "default",
    "canary",
    "nginx:1.27",
    "terminationDrainDuration: 1e400s",
    "terminationDrainDuration: .5s",
]
texts = st.text(max_size=20) | st.sampled_from(PLAUSIBLE_VALUES)
huge = st.integers(min_value=10_000, max_value=300_000).map(lambda n: "x" * n)
annotation_maps = st.dictionaries(st.sampled_from(ISTIO_ANNOTATIONS) | st.text(max_size=15), texts | huge, max_size=6)
label_maps = st.dictionaries(
    st.sampled_from(["app", "version", "sidecar.istio.io/inject", "istio.io/rev", "security.istio.io/tlsMode"])
    | st.text(max_size=15),
    texts,
    max_size=5,
)
port_refs = (
    st.integers(min_value=-5, max_value=70_000)
    | st.sampled_from(["http", "8080", "grpc", "", "x" * 20, "123456", "0", "²", "1" * 5000])
    | st.integers().map(str)
    | texts
)
probe_actions = st.one_of(
    st.fixed_dictionaries(
        {
            "httpGet": st.fixed_dictionaries(
                {"port": port_refs},
                optional={"path": texts, "host": texts, "scheme": st.sampled_from(["HTTP", "HTTPS", "https", "ftp"])},
            )
        }
    ),
    st.fixed_dictionaries({"tcpSocket": st.fixed_dictionaries({"port": port_refs}, optional={"host": texts})}),
    st.fixed_dictionaries({"grpc": st.fixed_dictionaries({"port": port_refs}, optional={"service": texts})}),
    st.just({"exec": {"command": ["true"]}}),
)
probes = st.builds(
    lambda action, extra: {**action, **extra},
    probe_actions,
    st.fixed_dictionaries(
        {},
        optional={
            "periodSeconds": st.integers(0, 100) | st.integers(),
            "timeoutSeconds": st.integers(0, 100) | st.integers(),
            "failureThreshold": st.integers(0, 10),
        },
    ),
)
containers = st.fixed_dictionaries(
    {"name": texts, "image": texts},
    optional={
        "ports": st.lists(
            st.fixed_dictionaries(
                {"containerPort": st.integers(1, 65535)},
                optional={
                    "name": st.sampled_from(["http", "grpc", "metrics"]) | texts,
                    "protocol": st.sampled_from(["TCP", "UDP"]),
                },
            ),
            max_size=3,
        ),
        "livenessProbe": probes,
        "readinessProbe": probes,
        "startupProbe": probes,
        "env": st.lists(st.fixed_dictionaries({"name": texts, "value": texts}), max_size=2),
    },
)
metadata: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {},
    optional={
        "name": texts,
        "generateName": texts,
        "namespace": texts,
        "labels": label_maps,
        "annotations": annotation_maps,
        "uid": texts,
    },
)
specs = st.fixed_dictionaries(
    {"containers": st.lists(containers, max_size=3)},
    optional={
        "initContainers": st.lists(containers, max_size=2),
        "hostNetwork": st.booleans(),
        "serviceAccountName": st.sampled_from(["web", "default", "a.b", "", "Web", "a_b"]),
        "serviceAccount": st.sampled_from(["web", ""]) | texts,
        "terminationGracePeriodSeconds": st.integers(0, 10_000),
        "volumes": st.lists(st.fixed_dictionaries({"name": texts, "emptyDir": st.just({})}), max_size=2),
    },
)
pods = st.fixed_dictionaries({"apiVersion": st.just("v1"), "kind": st.just("Pod"), "metadata": metadata, "spec": specs})


def make_review(pod: Any, uid: Any = "u-1", namespace: Any = "shop", operation: Any = "CREATE") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": operation,
            "object": pod,
        },
    }


reviews = st.builds(
    make_review,
    pods,
    uid=st.text(min_size=1, max_size=40),
    namespace=st.sampled_from(["shop", "default", "kube-system", "", "Shop", "a" * 64]) | st.none(),
    operation=st.sampled_from(["CREATE", "UPDATE", "DELETE", "CONNECT", ""]) | st.none(),
)


def _paths(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*path, i))


@st.composite
def mutated_reviews(draw: st.DrawFn) -> dict[str, Any]:
    """A plausible review with one to three spots given a wrong type, a random value, or removed."""
    doc: dict[str, Any] = json.loads(json.dumps(draw(reviews)))  # st.just() values are shared: mutate a copy
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return doc


def nested(depth: int, leaf: Any = "x") -> str:
    return "[" * depth + json.dumps(leaf) + "]" * depth


# -- the property -----------------------------------------------------------------------------------


def check_answer(body: bytes, status: int, answer: bytes) -> dict[str, Any] | None:
    """Assert the webhook's answer to `body` is acceptable; return the AdmissionReview response if any."""
    assert status < 500, f"HTTP {status}: {answer[:500]!r}"
    if status != 200:
        assert status in (400, 413), f"HTTP {status}: {answer[:500]!r}"
        assert answer.strip(), "a 400 must say what was wrong"
        event(f"HTTP {status}")
        return None
    doc = json.loads(answer)
    assert doc["apiVersion"] == "admission.k8s.io/v1" and doc["kind"] == "AdmissionReview", doc
    response: dict[str, Any] = doc["response"]
    sent = json.loads(body)
    assert response["uid"] == sent["request"]["uid"]
    assert isinstance(response["allowed"], bool)
    if not response["allowed"]:
        message = response["status"]["message"]
        assert response["status"]["code"] < 500, f"internal error for this pod: {message}"
        assert message
    event("patched" if "patch" in response else "allowed" if response["allowed"] else "denied")
    if "patch" in response:
        assert response["allowed"] is True and response["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(response["patch"], validate=True))
        patched = jsonpatch.apply_patch(sent["request"]["object"], ops, in_place=True)
        json.dumps(patched, allow_nan=False)  # the API server must be able to read the result
    return response


def post(webhook: Webhook, doc: Any) -> dict[str, Any] | None:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    status, answer = webhook.post(body)
    return check_answer(body, status, answer)


@fuzz(250)
@given(reviews)
def test_plausible_pods_get_a_well_formed_answer_over_https(webhook: Webhook, doc: dict[str, Any]) -> None:
    post(webhook, doc)


@fuzz(300)
@given(mutated_reviews())
def test_malformed_reviews_get_a_400_or_an_answer_over_https(webhook: Webhook, doc: dict[str, Any]) -> None:
    post(webhook, doc)


@fuzz(200)
@given(json_values)
@example({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "a", "object": {}}})
def test_random_json_bodies(webhook: Webhook, doc: Any) -> None:
    post(webhook, doc)


@fuzz(100)
@given(st.binary(max_size=300))
@example(b"")
@example(b"\xff\xfe{")
@example(b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": NaN}')
def test_random_bytes(webhook: Webhook, body: bytes) -> None:
    status, answer = webhook.post(body)
    assert status == 400 and answer.strip(), (status, answer[:300])


@fuzz(30)
@given(st.sampled_from([200, 1_000, 5_000, 100_000]), st.sampled_from(["request", "object", "labels", "annotation"]))
def test_deep_nesting(webhook: Webhook, depth: int, where: str) -> None:
    deep = nested(depth)
    pod = {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
    text = json.dumps(make_review(pod)).replace('"app": "x"', f'"app": {deep}' if where == "labels" else '"app": "x"')
    if where == "request":
        text = text.replace('"operation": "CREATE"', f'"operation": "CREATE", "deep": {deep}')
    elif where == "object":
        text = text.replace('"spec":', f'"deep": {deep}, "spec":')
    elif where == "annotation":
        text = text.replace('"labels":', f'"annotations": {{"sidecar.istio.io/proxyCPU": {deep}}}, "labels":')
    body = text.encode()
    status, answer = webhook.post(body)
    check_answer(body, status, answer)


@fuzz(20)
@given(st.sampled_from([MAX_BODY - 1000, MAX_BODY + 1, 3 * MAX_BODY]))
def test_huge_bodies(webhook: Webhook, size: int) -> None:
    pod = {"metadata": {"annotations": {"x": "y" * size}}, "spec": {"containers": []}}
    body = json.dumps(make_review(pod)).encode()
    status, answer = webhook.post(body)
    check_answer(body, status, answer)


@pytest.mark.parametrize(
    "constant",
    ["NaN", "Infinity", "-Infinity", "1e400"],
)
def test_non_json_numbers_are_not_echoed_into_the_patch(webhook: Webhook, constant: str) -> None:
    text = json.dumps(
        make_review({"spec": {"containers": [{"name": "c", "image": "i"}], "terminationGracePeriodSeconds": 1}})
    )
    body = text.replace('"terminationGracePeriodSeconds": 1', f'"terminationGracePeriodSeconds": {constant}').encode()
    status, answer = webhook.post(body)
    assert status == 400 or check_answer(body, status, answer) is not None


def test_review_parse_rejects_only_with_review_error() -> None:
    """The pure parser, for bodies the HTTP layer might never deliver intact."""
    for body in (b"[" * 100_000, b"{" * 100_000, nested(50_000).encode(), b'"\\ud800"', b"\x00"):
        with pytest.raises(review.ReviewError):
            review.parse(body)


# -- bugs fuzzing found in annotations and rendering, kept as regressions ----------------------------------


def _alias_bomb(levels: int) -> str:
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]")
    return "\n".join(lines) + f"\nterminationDrainDuration: *l{levels - 1}\n"


def test_yaml_alias_bomb_in_proxy_config_is_denied_briefly() -> None:
    # 4 levels is 10^4 strings; each level more is 10 times the time and memory, on the event loop.
    pod = {"metadata": {"annotations": {"proxy.istio.io/config": _alias_bomb(4)}}, "spec": {"containers": []}}
    outcome = inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT))
    assert outcome.error is not None and len(str(outcome.error)) < 2000


def test_deeply_nested_proxy_config_is_denied() -> None:
    deep = "[" * 500 + "]" * 500  # 1000 deep also holds the event loop for ~2 s before failing
    pod = {"metadata": {"annotations": {"proxy.istio.io/config": deep}}, "spec": {"containers": []}}
    assert inject(pod, "shop", InjectionConfig(xds_ca=MESH_ROOT)).error is not None


@pytest.mark.parametrize(
    ("namespace", "spec"),
    [
        ("shop", {"serviceAccountName": "Bad_SA"}),
        ("Bad_NS", {}),
        ("shop", {"containers": [{"name": "a", "readinessProbe": {"tcpSocket": {"port": "²"}}}]}),
    ],
)
def test_invalid_pod_fields_are_an_error_not_an_exception(namespace: str, spec: dict[str, Any]) -> None:
    pod = {"spec": {"containers": [{"name": "a", "image": "b"}], **spec}}
    try:
        outcome = inject(pod, namespace, InjectionConfig(xds_ca=MESH_ROOT))
    except (ValueError, TypeError) as e:
        pytest.fail(f"inject raised {e!r} instead of returning an outcome with an error")
    assert outcome.error is not None


def _pod(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}], **spec}}


def _probe(probe: dict[str, Any]) -> dict[str, Any]:
    return _pod(containers=[{"name": "c", "image": "i", "readinessProbe": probe}])


@pytest.mark.parametrize(
    ("body", "says"),
    [
        # Before review.parse checked them, most of these were an "internal error in the injector" denial
        # (the RecursionError an aiohttp 500); port "123456", labels {app: 1} and a grace period of "30"
        # were injected into a pod that Envoy or the API server then refuses.
        (make_review(_pod(serviceAccountName=":")), "request.object.spec.serviceAccountName"),
        (make_review(_pod(), namespace="Bad_NS"), "request.namespace"),
        (make_review(_probe({"grpc": {"port": -1}})), "readinessProbe.grpc.port"),
        (make_review(_probe({"tcpSocket": {"port": "²"}})), "readinessProbe.tcpSocket.port"),
        (make_review(_probe({"httpGet": {"port": "123456"}})), "readinessProbe.httpGet.port"),
        (make_review(_probe({"tcpSocket": {"port": 80}, "periodSeconds": 2**62})), "readinessProbe.periodSeconds"),
        (make_review(_probe({"tcpSocket": {"port": 80}, "timeoutSeconds": 2**40})), "readinessProbe.timeoutSeconds"),
        (make_review(_probe({"httpGet": None})), "readinessProbe.httpGet"),
        (make_review({"metadata": None, "spec": {"containers": []}}), "request.object.metadata"),
        (make_review({"metadata": {"labels": None}, "spec": {"containers": []}}), "request.object.metadata.labels"),
        (make_review({"metadata": {"labels": {"app": 1}}, "spec": {"containers": []}}), "metadata.labels"),
        (make_review(_pod(terminationGracePeriodSeconds="30")), "spec.terminationGracePeriodSeconds"),
        (json.dumps(make_review(_pod(terminationGracePeriodSeconds=1))).replace(": 1}", ": NaN}"), "NaN"),
        (json.dumps(make_review(_pod(terminationGracePeriodSeconds=1))).replace(": 1}", ": Infinity}"), "Infinity"),
        ('{"request": ' + nested(100_000) + "}", "nested too deeply"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else "",
)
def test_found_by_fuzzing_now_a_400_naming_the_field(webhook: Webhook, body: Any, says: str) -> None:
    status, answer = webhook.post(body.encode() if isinstance(body, str) else json.dumps(body).encode())
    assert status == 400 and says in answer.decode(), (status, answer[:300])
