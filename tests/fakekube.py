"""A local Kubernetes API server for tests, faithful enough for the official `kubernetes` client.

`FakeKube` serves plain HTTP on 127.0.0.1 (random port) from its own thread and event loop, so the
synchronous client (`kubernetes.client`, `kubernetes.watch.Watch`) can call it from any thread and
an async test's loop is never involved in serving::

    with FakeKube() as kube:                       # or: async with FakeKube() as kube
        kube.create(namespace("demo"))
        kube.create(pod("web-1", "demo", ip="10.0.0.5", labels={"app": "web"}))
        api = kube.new_client()                     # or load_kube_config(config_file=kube.write_kubeconfig(path))
        pods = client.CoreV1Api(api).list_namespaced_pod("demo", label_selector="app=web")

What it serves (JSON only, the shapes the real API server returns):

- core/v1 namespaces, pods, services; discovery.k8s.io/v1 endpointslices: list (cluster-wide and
  namespaced), single GET, watch. Lists carry `kind: XxxList`, `metadata.resourceVersion`,
  `metadata.continue` and `remainingItemCount` while paging; their items carry no kind/apiVersion
  (as the real server's); single GETs and watch event objects do.
- core/v1 secrets and admissionregistration.k8s.io/v1 mutatingwebhookconfigurations: the same list,
  GET and watch, and (as for every kind above) writes through the API:
  - POST to a collection creates: 201 with the stored object; 409 AlreadyExists (Status with
    details name/group/kind) when it exists; 404 NotFound `namespaces "x" not found` for a missing
    namespace (as NamespaceLifecycle admission answers); 400 for a body of another apiVersion,
    kind or namespace; 422 Invalid without a name; 400 for a Secret's data (or a caBundle) that is
    not base64.
  - PATCH of one object with `application/json-patch+json` (RFC 6902: add, remove, replace, move,
    copy, test; a failing operation is 422 Invalid), `application/merge-patch+json` (RFC 7386) or
    `application/strategic-merge-patch+json` (applied as a merge patch); 200 with the stored object,
    404 NotFound when it does not exist, 415 for another content type. A patched
    metadata.resourceVersion is a precondition (409 Conflict when stale).
  - A Secret defaults `type: Opaque` and folds `stringData` into `data`; a webhook configuration
    gets the webhook defaults (failurePolicy Fail, matchPolicy Equivalent, namespaceSelector and
    objectSelector {}, reinvocationPolicy Never, timeoutSeconds 10, service port 443, rule scope
    "*") and a metadata.generation that increases when its webhooks change.
- authentication.k8s.io/v1 tokenreviews (POST), answered from the tokens a test registers.
- /api, /apis, /version, just enough for a client that probes them.

Semantics kept from the real server:

- One global resourceVersion (a decimal string) that increases with every write, an etcd-like
  history of changes and `compact()`: a watch from a compacted resourceVersion gets one ERROR event
  (Status 410, reason Expired, "too old resource version") and the stream ends; a list continue
  token from before the compaction gets HTTP 410 (reason Expired).
- `limit` + `continue` paging over a consistent snapshot (the token encodes the snapshot's
  resourceVersion and the last key, as the real server's does); `resourceVersionMatch=Exact`.
- Watch: `resourceVersion` unset or "0" first sends ADDED for every existing object; N sends every
  change after N. `labelSelector` and `fieldSelector` apply, and an object that stops (starts)
  matching arrives as DELETED (ADDED). `allowWatchBookmarks` enables BOOKMARK events carrying only
  kind, apiVersion and metadata.resourceVersion; `sendInitialEvents=true` ends the initial events
  with a bookmark annotated `k8s.io/initial-events-end`. `timeoutSeconds` ends the stream cleanly.
- A bearer token is required on every request (401 Unauthorized otherwise).

Test controls (plain methods, non-blocking, safe from any thread and from inside an event loop):
`create`, `update`, `apply`, `delete`, `get`, `objects`, `compact`, `bookmark`, `drop_watches`,
`expire_watches`, `fail` (optionally only for one `method`, optionally after a `delay`), `hold`
(keep the next requests waiting in the server until released: stages races such as two replicas
both seeing 404 and both POSTing), `requests`/`count` (optionally of one `method`),
`add_token`/`revoke_token`, `wait_for_watches`. Builders: `namespace`, `pod`, `service`,
`endpoint_slice`, `secret`, `mutating_webhook_configuration`.

Not implemented (or simplified):

- PUT, DELETE and server-side apply through the HTTP API (405 / 415): tests write through the
  controls. POST and PATCH skip admission other than NamespaceLifecycle, dryRun, fieldManager.
- Controllers: no EndpointSlices made from Services and Pods, no namespace cascade or Terminating
  phase, no graceful pod deletion (set metadata.deletionTimestamp with `update` to imitate it).
- Admission, most validation, RBAC (any request with the token may do anything), managedFields,
  generation (except a webhook configuration's), selfLink; protobuf and Table content types; TLS (plain HTTP only).
- Lists always come from the store: `resourceVersion=0` ("any") is served as the latest, and a
  410 for an expired continue token carries no token for an inconsistent continuation.
- A watch from a resourceVersion newer than the current one starts there (the real server waits
  and may answer "Too large resource version"); `resourceVersionMatch` is ignored on watches.
- Field selectors accept any dotted path (the real server only a few fields per kind).
- Only the defaults listed in `FakeKube._default` are filled in.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import itertools
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

Obj = dict[str, Any]

API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
"""The audience a TokenReview checks when its spec names none (the API server's own)."""

INITIAL_EVENTS_END = "k8s.io/initial-events-end"


@dataclass(frozen=True)
class Resource:
    kind: str
    plural: str
    group: str
    version: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


NAMESPACES = Resource("Namespace", "namespaces", "", "v1", namespaced=False)
PODS = Resource("Pod", "pods", "", "v1", namespaced=True)
SERVICES = Resource("Service", "services", "", "v1", namespaced=True)
ENDPOINT_SLICES = Resource("EndpointSlice", "endpointslices", "discovery.k8s.io", "v1", namespaced=True)
SECRETS = Resource("Secret", "secrets", "", "v1", namespaced=True)
MUTATING_WEBHOOK_CONFIGURATIONS = Resource(
    "MutatingWebhookConfiguration", "mutatingwebhookconfigurations", "admissionregistration.k8s.io", "v1", False
)
RESOURCES = {r.kind: r for r in (NAMESPACES, PODS, SERVICES, ENDPOINT_SLICES, SECRETS, MUTATING_WEBHOOK_CONFIGURATIONS)}
_GENERATION_FIELDS = {"MutatingWebhookConfiguration": ("webhooks",)}
"""Kinds whose metadata.generation the real server keeps, and the fields whose change bumps it."""
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


# --- object builders (what a test usually needs; every field can be overridden) -----------------


def namespace(name: str, labels: Mapping[str, str] | None = None) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(name, None, labels)}


def pod(
    name: str,
    ns: str,
    *,
    ip: str | None = None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    service_account: str = "default",
    phase: str = "Running",
    node: str = "node-1",
) -> Obj:
    status: Obj = {"phase": phase}
    if ip is not None:
        status |= {"podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.168.0.10"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _meta(name, ns, labels, annotations),
        "spec": {
            "serviceAccountName": service_account,
            "nodeName": node,
            "containers": [{"name": "app", "image": "example.com/app:1.0"}],
        },
        "status": status,
    }


def service(
    name: str,
    ns: str,
    *,
    ports: Iterable[tuple[str, int]] = (("http", 80),),
    selector: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    cluster_ip: str | None = None,
) -> Obj:
    spec: Obj = {"ports": [{"name": n, "port": p} for n, p in ports]}
    if selector is not None:
        spec["selector"] = dict(selector)
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, ns, labels), "spec": spec}


def endpoint_slice(
    name: str,
    ns: str,
    service_name: str,
    *,
    addresses: Iterable[str] = (),
    ports: Iterable[tuple[str, int]] = (("http", 80),),
    ready: bool = True,
    target_pods: Iterable[str] | None = None,
) -> Obj:
    """An EndpointSlice for `service_name`, one endpoint per address (optionally naming its pod)."""
    addresses = list(addresses)
    pods = list(target_pods) if target_pods is not None else [None] * len(addresses)
    endpoints = []
    for address, pod_name in zip(addresses, pods, strict=True):
        endpoint: Obj = {"addresses": [address], "conditions": {"ready": ready, "serving": ready, "terminating": False}}
        if pod_name is not None:
            endpoint["targetRef"] = {"kind": "Pod", "namespace": ns, "name": pod_name}
        endpoints.append(endpoint)
    labels = {"kubernetes.io/service-name": service_name, "endpointslice.kubernetes.io/managed-by": "test"}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": _meta(name, ns, labels),
        "addressType": "IPv6" if addresses and ":" in addresses[0] else "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
    }


def secret(
    name: str,
    ns: str,
    data: Mapping[str, bytes | str] | None = None,
    *,
    type: str = "Opaque",
    labels: Mapping[str, str] | None = None,
) -> Obj:
    """A Secret; `data` values are raw bytes (or text), base64-encoded here as the API carries them."""
    encoded = {k: base64.b64encode(v.encode() if isinstance(v, str) else v).decode() for k, v in (data or {}).items()}
    obj: Obj = {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(name, ns, labels), "type": type}
    if encoded:
        obj["data"] = encoded
    return obj


def mutating_webhook_configuration(
    name: str,
    *,
    webhooks: Iterable[str] = ("sidecar-injector.meshplane.io",),
    service: tuple[str, str] = ("meshplane-system", "meshplane"),
    path: str = "/inject",
    ca_bundle: bytes | None = None,
) -> Obj:
    """A MutatingWebhookConfiguration whose webhooks (one per name) call `service` (namespace, name) at
    `path` for pod creation; `caBundle` is left out unless given (raw PEM bytes, base64-encoded here)."""
    hooks = []
    for hook in webhooks:
        client_config: Obj = {"service": {"namespace": service[0], "name": service[1], "path": path}}
        if ca_bundle is not None:
            client_config["caBundle"] = base64.b64encode(ca_bundle).decode()
        hooks.append(
            {
                "name": hook,
                "clientConfig": client_config,
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "failurePolicy": "Ignore",
            }
        )
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": _meta(name, None),
        "webhooks": hooks,
    }


def _meta(
    name: str, ns: str | None, labels: Mapping[str, str] | None = None, annotations: Mapping[str, str] | None = None
) -> Obj:
    meta: Obj = {"name": name}
    if ns is not None:
        meta["namespace"] = ns
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


# --- errors, selectors ----------------------------------------------------------------------------


class ApiError(Exception):
    """An API failure, answered as a Status object (or raised to the test by a control method)."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def _expired(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_./-]+)\s*"
    r"(?:(?P<op>==|!=|=)\s*(?P<value>[A-Za-z0-9_.-]*)|\s(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


def label_matcher(selector: str) -> Callable[[Mapping[str, str]], bool]:
    """Parse a label selector (`a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`)."""
    requirements: list[tuple[str, str, frozenset[str]]] = []  # key, operator, values
    for part in _split_selector(selector):
        m = _REQUIREMENT.match(part)
        if not m or (m["neg"] and (m["op"] or m["setop"])):
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
        if m["op"]:
            requirements.append((m["key"], "notin" if m["op"] == "!=" else "in", frozenset([m["value"]])))
        elif m["setop"]:
            values = frozenset(v.strip() for v in m["values"].split(",") if v.strip())
            requirements.append((m["key"], m["setop"], values))
        else:
            requirements.append((m["key"], "!" if m["neg"] else "exists", frozenset()))

    def matches(labels: Mapping[str, str]) -> bool:
        for key, operator, values in requirements:
            ok = {
                "in": key in labels and labels[key] in values,
                "notin": labels.get(key) not in values,  # as the real server: a missing key matches
                "exists": key in labels,
                "!": key not in labels,
            }[operator]
            if not ok:
                return False
        return True

    return matches


def field_matcher(selector: str) -> Callable[[Obj], bool]:
    """Parse a field selector (`metadata.name=x`, `spec.nodeName!=y`, ...) over any dotted path.

    The real server accepts only a few fields per kind (metadata.name and metadata.namespace
    everywhere); this one accepts every path and compares its value as a string.
    """
    requirements: list[tuple[str, bool, str]] = []  # path, equal, value
    for part in _split_selector(selector):
        m = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|!=|=)\s*(\S*)\s*$", part)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector: {part!r}")
        requirements.append((m[1], m[2] != "!=", m[3]))

    def matches(obj: Obj) -> bool:
        return all((_field(obj, path) == value) == equal for path, equal, value in requirements)

    return matches


def _field(obj: Obj, path: str) -> str:
    value: Any = obj
    for step in path.split("."):
        value = value.get(step) if isinstance(value, dict) else None
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class _Filter:
    namespace: str | None = None
    labels: Callable[[Mapping[str, str]], bool] | None = None
    fields: Callable[[Obj], bool] | None = None

    def __call__(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if self.labels is not None and not self.labels(meta.get("labels") or {}):
            return False
        return self.fields is None or self.fields(obj)


# --- the store: objects, history, watchers ------------------------------------------------------

Key = tuple[str, str, str]  # kind, namespace ("" when cluster-scoped), name


def _key(obj: Obj) -> Key:
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace", ""), meta["name"]


@dataclass(frozen=True)
class _Change:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj
    prev: Obj | None


@dataclass(frozen=True)
class RequestRecord:
    """One request the server saw (recorded before any injected failure)."""

    method: str
    path: str
    query: Mapping[str, str]

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


@dataclass
class _Fault:
    path: str
    status: int
    times: int
    watch: bool | None
    retry_after: int | None
    method: str | None = None
    delay: float = 0.0


class Hold:
    """Requests that `FakeKube.hold` keeps waiting inside the server until `release()`.

    The first `times` requests that match are held (they are in the request log as they arrive);
    `wait(n)` blocks the test until n of them are waiting. A held request goes on by itself after
    `timeout` seconds, so a test that forgets to release cannot hang the client forever.
    """

    def __init__(self, path: str, method: str | None, times: int, timeout: float) -> None:
        self.path, self.method, self.times, self.timeout = path, method.upper() if method else None, times, timeout
        self._released = threading.Event()
        self._arrived = 0
        self._lock = threading.Lock()

    @property
    def arrived(self) -> int:
        """How many requests this hold has caught so far (waiting or since released)."""
        with self._lock:
            return self._arrived

    def _take(self, method: str, path: str) -> bool:
        with self._lock:
            if self._arrived >= self.times or path != self.path or self.method not in (None, method):
                return False
            self._arrived += 1
            return True

    def wait(self, count: int | None = None, timeout: float = 5.0) -> None:
        """Block until `count` (default: `times`) requests are held; TimeoutError otherwise."""
        wanted = self.times if count is None else count
        deadline = time.monotonic() + timeout
        while self.arrived < wanted:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.arrived} requests for {self.path} held, wanted {wanted}")
            time.sleep(0.005)

    def release(self) -> None:
        """Let every held request go on (in the order they arrived, as far as the server goes)."""
        self._released.set()

    @property
    def released(self) -> bool:
        return self._released.is_set()

    async def _block(self) -> None:
        await asyncio.to_thread(self._released.wait, self.timeout)


_CLOSE = "close"  # end the stream cleanly (what a server-side timeout looks like)
_DROP = "drop"  # abort the TCP connection mid-stream


@dataclass(eq=False)
class _Watcher:
    resource: Resource
    filter: _Filter
    bookmarks: bool
    queue: asyncio.Queue[Obj | str] = field(default_factory=asyncio.Queue)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKube:
    """A Kubernetes API server on 127.0.0.1 that runs in its own thread.

    `start()`/`stop()` (or `with`/`async with`) bound its life. The other public methods, except
    `wait_for_watches`, return at once and may be called from any thread, including from a
    coroutine in another event loop. Objects passed in and returned are copies.
    """

    def __init__(
        self,
        *,
        token: str = "fakekube-admin-token",
        history: int = 1000,
        bookmark_interval: float | None = None,
        default_watch_timeout: float = 1800.0,
        start_rv: int = 1000,
    ) -> None:
        """`token`: the bearer token every request must carry (written to the kubeconfig).
        `history`: changes kept for watches before the oldest are compacted away.
        `bookmark_interval`: if set, every watch that allows bookmarks gets one this often.
        `default_watch_timeout`: how long a watch without timeoutSeconds stays open.
        """
        self.token = token
        self._history_limit = history
        self._bookmark_interval = bookmark_interval
        self._default_watch_timeout = default_watch_timeout
        self._lock = threading.Lock()
        self._rv = start_rv
        self._objects: dict[Key, Obj] = {}
        self._compacted = start_rv  # state at this rv is _base; _changes hold everything after
        self._base: dict[Key, Obj] = {}
        self._changes: list[_Change] = []
        self._watchers: set[_Watcher] = set()
        self._watch_seen = 0
        self._closing = False
        self._requests: list[RequestRecord] = []
        self._faults: list[_Fault] = []
        self._holds: list[Hold] = []
        self._tokens: dict[str, Obj] = {}
        self._ips = itertools.count(10)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeKube:
        """Start serving; returns once the port is bound (within 10 s, or raises)."""
        if self._thread is not None:
            raise RuntimeError("FakeKube already started")
        self._closing = False
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="fakekube", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise RuntimeError("FakeKube did not start") from (failure[0] if failure else None)
        return self

    async def _serve(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # handler_cancellation: a watch whose client went away ends at once, not at its next write.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        """Refuse new requests (503), drop every watch connection, stop the server and its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with self._lock:
            self._closing = True
            holds, self._holds = self._holds, []
        for hold in holds:
            hold.release()
        self._broadcast(lambda w: _DROP)  # a clean end would only make clients watch again

        async def shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            self._loop = self._thread = None

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FakeKube:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

    # --- client configuration -------------------------------------------------------------------

    def kubeconfig(self, namespace: str = "default") -> Obj:
        """A kubeconfig (as a dict) for this server: one cluster, one user with the bearer token."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fakekube", "cluster": {"server": self.url}}],
            "users": [{"name": "fakekube", "user": {"token": self.token}}],
            "contexts": [
                {"name": "fakekube", "context": {"cluster": "fakekube", "user": "fakekube", "namespace": namespace}}
            ],
            "current-context": "fakekube",
            "preferences": {},
        }

    def write_kubeconfig(self, path: Path | str, namespace: str = "default") -> Path:
        """Write the kubeconfig (JSON, which is YAML) for `kubernetes.config.load_kube_config`."""
        path = Path(path)
        path.write_text(json.dumps(self.kubeconfig(namespace), indent=2))
        return path

    def new_client(self) -> Any:
        """A `kubernetes.client.ApiClient` for this server (the caller closes it)."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        configuration.api_key = {"authorization": f"Bearer {self.token}"}
        return client.ApiClient(configuration)

    # --- objects --------------------------------------------------------------------------------

    def create(self, obj: Obj, *, defaults: bool = True) -> Obj:
        """Store a new object (a kind of `RESOURCES`); returns it as stored.

        Fills metadata as the server would (uid, creationTimestamp, resourceVersion, a name from
        generateName) and, unless `defaults=False`, the API defaults tests usually rely on
        (e.g. a Service's clusterIP, a port's protocol). Raises ApiError 409 if it exists.
        """
        obj = copy.deepcopy(obj)
        resource = self._resource(obj)
        obj["apiVersion"] = resource.api_version
        meta = obj.setdefault("metadata", {})
        if resource.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        if "name" not in meta and "generateName" in meta:
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        with self._lock:
            key = _key(obj)
            if key in self._objects:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{_qualified(resource)} "{key[2]}" already exists',
                    _details(resource, key[2]),
                )
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            if resource.kind in _GENERATION_FIELDS:
                meta["generation"] = 1
            if defaults:
                self._default(obj)
            return self._commit("ADDED", obj, None)

    def update(self, obj: Obj, *, defaults: bool = True) -> Obj:
        """Replace a stored object; returns it as stored.

        uid and creationTimestamp are kept. A metadata.resourceVersion in `obj` must match the
        stored one (ApiError 409 Conflict otherwise), as in a real update; leave it out to
        overwrite. An update that changes nothing writes nothing (no new resourceVersion, no event).
        """
        obj = copy.deepcopy(obj)
        resource = self._resource(obj)
        obj["apiVersion"] = resource.api_version
        meta = obj.setdefault("metadata", {})
        if resource.namespaced:
            meta.setdefault("namespace", "default")
        with self._lock:
            key = _key(obj)
            current = self._objects.get(key)
            if current is None:
                raise _object_not_found(resource, key[2])
            stored_rv = current["metadata"]["resourceVersion"]
            if meta.get("resourceVersion") not in (None, stored_rv):
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {_qualified(resource)} "{key[2]}": the object has been '
                    "modified; please apply your changes to the latest version and try again",
                )
            meta["uid"] = current["metadata"]["uid"]
            meta["creationTimestamp"] = current["metadata"]["creationTimestamp"]
            meta["resourceVersion"] = stored_rv
            if defaults:
                self._default(obj)
            if resource.kind in _GENERATION_FIELDS:
                generation = current["metadata"].get("generation", 1)
                changed = any(obj.get(f) != current.get(f) for f in _GENERATION_FIELDS[resource.kind])
                meta["generation"] = generation + 1 if changed else generation
            if obj == current:
                return copy.deepcopy(current)
            return self._commit("MODIFIED", obj, current)

    def apply(self, obj: Obj, *, defaults: bool = True) -> Obj:
        """Create the object, or overwrite it if it exists."""
        try:
            return self.create(obj, defaults=defaults)
        except ApiError as exc:
            if exc.code != 409:
                raise
            obj = copy.deepcopy(obj)
            obj.get("metadata", {}).pop("resourceVersion", None)
            return self.update(obj, defaults=defaults)

    def delete(self, kind: str, name: str, namespace: str | None = None) -> Obj:
        """Delete an object at once (no finalizers, no grace period); returns its last state."""
        resource = RESOURCES[kind]
        key = (kind, (namespace or "default") if resource.namespaced else "", name)
        with self._lock:
            current = self._objects.get(key)
            if current is None:
                raise _object_not_found(resource, name)
            return self._commit("DELETED", copy.deepcopy(current), current)

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        resource = RESOURCES[kind]
        with self._lock:
            obj = self._objects.get((kind, (namespace or "default") if resource.namespaced else "", name))
            return copy.deepcopy(obj)

    def objects(self, kind: str) -> list[Obj]:
        with self._lock:
            return [copy.deepcopy(o) for k, o in sorted(self._objects.items()) if k[0] == kind]

    @property
    def resource_version(self) -> str:
        """The current (latest) resourceVersion."""
        with self._lock:
            return str(self._rv)

    def _resource(self, obj: Obj) -> Resource:
        try:
            return RESOURCES[obj["kind"]]
        except KeyError:
            raise ValueError(f"FakeKube stores only {sorted(RESOURCES)}, not {obj.get('kind')!r}") from None

    def _default(self, obj: Obj) -> None:
        """A few of the API server's defaults, enough for the client's models and typical readers."""
        meta, kind = obj["metadata"], obj["kind"]
        if kind == "Namespace":
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj.setdefault("status", {}).setdefault("phase", "Active")
        elif kind == "Service":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            spec.setdefault("sessionAffinity", "None")
            if "clusterIP" not in spec:
                n = next(self._ips)
                spec["clusterIP"] = f"10.96.{n // 250}.{n % 250 + 1}"
            if spec["clusterIP"] != "None":
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
                spec.setdefault("ipFamilies", ["IPv6" if ":" in spec["clusterIP"] else "IPv4"])
                spec.setdefault("ipFamilyPolicy", "SingleStack")
            spec.setdefault("internalTrafficPolicy", "Cluster")
            for port in spec.get("ports", []):
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port["port"])
            obj.setdefault("status", {"loadBalancer": {}})
        elif kind == "Pod":
            spec = obj.setdefault("spec", {})
            spec.setdefault("serviceAccountName", spec.get("serviceAccount", "default"))
            spec.setdefault("serviceAccount", spec["serviceAccountName"])
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("dnsPolicy", "ClusterFirst")
            spec.setdefault("schedulerName", "default-scheduler")
            spec.setdefault("terminationGracePeriodSeconds", 30)
            for container in spec.setdefault("containers", []):
                container.setdefault("terminationMessagePath", "/dev/termination-log")
                container.setdefault("terminationMessagePolicy", "File")
                container.setdefault("imagePullPolicy", "IfNotPresent")
            obj.setdefault("status", {}).setdefault("phase", "Pending")
        elif kind == "Secret":
            obj.setdefault("type", "Opaque")
            string_data = obj.pop("stringData", None) or {}  # write-only: merged into data, never returned
            if string_data:
                data = obj.setdefault("data", {})
                for k, v in string_data.items():
                    data[k] = base64.b64encode(str(v).encode()).decode()
        elif kind == "MutatingWebhookConfiguration":
            for hook in obj.get("webhooks") or []:
                hook.setdefault("failurePolicy", "Fail")
                hook.setdefault("matchPolicy", "Equivalent")
                hook.setdefault("namespaceSelector", {})
                hook.setdefault("objectSelector", {})
                hook.setdefault("reinvocationPolicy", "Never")
                hook.setdefault("timeoutSeconds", 10)
                service_ref = (hook.get("clientConfig") or {}).get("service")
                if service_ref is not None:
                    service_ref.setdefault("port", 443)
                for rule in hook.get("rules") or []:
                    rule.setdefault("scope", "*")
        elif kind == "EndpointSlice":
            # These lists have no omitempty and the server stores protobuf, which cannot tell [] from
            # nil: an empty list comes back as null (kubernetes-client/python#2214, #2423).
            for name in ("endpoints", "ports"):
                if not obj.get(name):
                    obj[name] = None

    def _commit(self, type_: str, obj: Obj, prev: Obj | None) -> Obj:
        """Under the lock: give `obj` the next resourceVersion, record the change, tell watchers."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        key = _key(obj)
        if type_ == "DELETED":
            del self._objects[key]
        else:
            self._objects[key] = obj
        change = _Change(self._rv, type_, obj, prev)
        self._changes.append(change)
        if len(self._changes) > self._history_limit:
            self._compact_to(self._changes[len(self._changes) - self._history_limit - 1].rv)
        resource = RESOURCES[obj["kind"]]
        for watcher in self._watchers:
            if watcher.resource is resource:
                event = _event_for(change, watcher.filter)
                if event is not None:
                    self._send(watcher, event)
        return copy.deepcopy(obj)

    # --- history --------------------------------------------------------------------------------

    def compact(self, rv: int | str | None = None) -> int:
        """Forget history up to `rv` (default: everything), as etcd compaction does.

        Afterwards a watch from an older resourceVersion gets ERROR 410 Expired and a continue
        token from before `rv` gets HTTP 410. Returns the compacted resourceVersion.
        """
        with self._lock:
            target = self._rv if rv is None else min(int(rv), self._rv)
            self._compact_to(target)
            return self._compacted

    def _compact_to(self, rv: int) -> None:
        if rv <= self._compacted:
            return
        keep = [c for c in self._changes if c.rv > rv]
        self._base = self._state_at(rv)
        self._changes = keep
        self._compacted = rv

    def _state_at(self, rv: int) -> dict[Key, Obj]:
        if rv < self._compacted:
            raise _expired(f"too old resource version: {rv} ({self._compacted})")
        if rv >= self._rv:
            return dict(self._objects)
        state = dict(self._base)
        for change in self._changes:
            if change.rv > rv:
                break
            if change.type == "DELETED":
                state.pop(_key(change.obj), None)
            else:
                state[_key(change.obj)] = change.obj
        return state

    # --- tokens ---------------------------------------------------------------------------------

    def add_token(
        self,
        token: str,
        namespace: str,
        service_account: str,
        *,
        audiences: Iterable[str] = (API_AUDIENCE,),
        pod_name: str | None = None,
        pod_uid: str | None = None,
    ) -> None:
        """Make TokenReview accept `token` as `system:serviceaccount:<namespace>:<service_account>`
        for `audiences`; a pod-bound token also reports the pod in user.extra."""
        extra: dict[str, list[str]] = {"authentication.kubernetes.io/credential-id": [f"JTI={uuid.uuid4()}"]}
        if pod_name is not None:
            extra["authentication.kubernetes.io/pod-name"] = [pod_name]
            extra["authentication.kubernetes.io/pod-uid"] = [pod_uid or str(uuid.uuid4())]
        user = {
            "username": f"system:serviceaccount:{namespace}:{service_account}",
            "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sa/{namespace}/{service_account}")),
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
            "extra": extra,
        }
        with self._lock:
            self._tokens[token] = {"user": user, "audiences": list(audiences)}

    def revoke_token(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    def _review(self, spec: Obj) -> Obj:
        token = spec.get("token") or ""
        wanted = list(spec.get("audiences") or [API_AUDIENCE])
        with self._lock:
            known = copy.deepcopy(self._tokens.get(token))
        if known is None:
            return {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
        matched = [a for a in wanted if a in known["audiences"]]
        if not matched:
            return {
                "user": {},
                "error": f"[invalid bearer token, token audiences {json.dumps(known['audiences'])} "
                f"is invalid for the target audiences {json.dumps(wanted)}]",
            }
        status: Obj = {"authenticated": True, "user": known["user"]}
        if spec.get("audiences"):
            status["audiences"] = matched
        else:
            status["audiences"] = [API_AUDIENCE]
        return status

    # --- faults, watch controls, request log ----------------------------------------------------

    def fail(
        self,
        path: str,
        status: int = 500,
        *,
        times: int = 1,
        watch: bool | None = None,
        retry_after: int | None = 1,
        method: str | None = None,
        delay: float = 0.0,
    ) -> None:
        """Answer the next `times` requests for `path` (exact URL path, no query) with `status`.

        `watch=True` matches only watch requests, False only the others, None both; `method`
        (e.g. "POST") only requests of that method. A 429 carries `Retry-After: <retry_after>`
        unless that is None; note that urllib3 under the client then retries by itself (up to 3
        times), so the caller sees the 429 only when retries run out. `delay` seconds pass before
        the answer (`status=0`: no failure, only the delay, then the normal answer). Requests
        failed or delayed this way are still counted.
        """
        with self._lock:
            self._faults.append(
                _Fault(path, status, times, watch, retry_after, method.upper() if method else None, delay)
            )

    def hold(self, path: str, *, method: str | None = None, times: int = 1, timeout: float = 10.0) -> Hold:
        """Keep the next `times` requests for `path` (of `method`, if given) waiting inside the server
        until the returned `Hold` is released: e.g. hold two replicas' POSTs until both have sent
        theirs, then release them together to stage a create race (one 201, one 409)."""
        hold = Hold(path, method, times, timeout)
        with self._lock:
            self._holds.append(hold)
        return hold

    def requests(
        self, path: str | None = None, *, watch: bool | None = None, method: str | None = None
    ) -> list[RequestRecord]:
        """The requests seen so far, oldest first, optionally only those for `path` / of a kind / of
        a method ("GET", "POST", "PATCH", ...)."""
        with self._lock:
            seen = list(self._requests)
        return [
            r
            for r in seen
            if (path is None or r.path == path)
            and (watch is None or r.watch == watch)
            and (method is None or r.method == method.upper())
        ]

    def count(self, path: str, *, watch: bool | None = None, method: str | None = None) -> int:
        return len(self.requests(path, watch=watch, method=method))

    @property
    def open_watches(self) -> int:
        with self._lock:
            return len(self._watchers)

    def wait_for_watches(self, count: int = 1, timeout: float = 5.0, *, total: bool = False) -> None:
        """Block until exactly `count` watches are open (with `total`: until at least `count` were
        ever opened); TimeoutError after `timeout` seconds. A watch counts as open once its backlog
        is taken, so a change made after this returns reaches it. From a coroutine:
        `await asyncio.to_thread(kube.wait_for_watches, ...)`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                seen = self._watch_seen if total else len(self._watchers)
            if seen == count or (total and seen >= count):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{seen} watches {'opened' if total else 'open'}, wanted {count}")
            time.sleep(0.01)

    def bookmark(self) -> str:
        """Send a BOOKMARK with the current resourceVersion to every watch that allows bookmarks."""
        with self._lock:
            rv = str(self._rv)
            for watcher in self._watchers:
                if watcher.bookmarks:
                    self._send(watcher, _bookmark(watcher.resource, rv))
            return rv

    def drop_watches(self, *, graceful: bool = False) -> int:
        """End every open watch: abort its TCP connection mid-stream, or with `graceful` end the
        chunked response properly (as a server-side timeout does). Returns how many."""
        return self._broadcast(lambda w: _CLOSE if graceful else _DROP)

    def expire_watches(self) -> int:
        """Send every open watch ERROR 410 Expired and end it, as a server whose watch cache
        lost the watcher's position does. Returns how many."""

        def expire(w: _Watcher) -> Obj:
            return {"type": "ERROR", "object": _expired(f"too old resource version: {self._rv}").status()}

        return self._broadcast(expire)

    def _broadcast(self, item: Callable[[_Watcher], Obj | str]) -> int:
        with self._lock:
            watchers = list(self._watchers)
            for watcher in watchers:
                message = item(watcher)
                self._send(watcher, message)
                if isinstance(message, dict):
                    self._send(watcher, _CLOSE)
                self._watchers.discard(watcher)
            return len(watchers)

    def _send(self, watcher: _Watcher, item: Obj | str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(watcher.queue.put_nowait, item)

    # --- HTTP -----------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        record = RequestRecord(request.method, request.path, dict(request.query))
        with self._lock:
            self._requests.append(record)
            closing = self._closing
            hold = next((h for h in self._holds if h._take(record.method, record.path)), None)
            fault = next(
                (
                    f
                    for f in self._faults
                    if f.path == record.path
                    and f.times > 0
                    and f.watch in (None, record.watch)
                    and f.method in (None, record.method)
                ),
                None,
            )
            if fault is not None:
                fault.times -= 1
                if fault.times == 0:
                    self._faults.remove(fault)
        try:
            if closing:
                raise ApiError(503, "ServiceUnavailable", "the fake API server is shutting down")
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if hold is not None:
                await hold._block()
            if fault is not None:
                if fault.delay > 0:
                    await asyncio.sleep(fault.delay)
                if fault.status:
                    raise _fault_error(fault)
            response: web.StreamResponse = await handler(request)
            return response
        except ApiError as exc:
            headers = {}
            if exc.code == 429 and exc.details and "retryAfterSeconds" in exc.details:
                headers["Retry-After"] = str(exc.details["retryAfterSeconds"])
            return web.json_response(exc.status(), status=exc.code, headers=headers)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        segments = [s for s in request.path.split("/") if s]
        if request.path == "/version":
            return web.json_response({"major": "1", "minor": "37", "gitVersion": "v1.37.0-fakekube"})
        if segments == ["api"]:
            return web.json_response({"kind": "APIVersions", "versions": ["v1"]})
        if segments == ["apis"]:
            return web.json_response(_api_groups())
        if segments[:1] == ["api"] and len(segments) >= 2:
            group, version, rest = "", segments[1], segments[2:]
        elif segments[:1] == ["apis"] and len(segments) >= 3:
            group, version, rest = segments[1], segments[2], segments[3:]
        else:
            raise _not_found()
        if (group, version, rest) == ("authentication.k8s.io", "v1", ["tokenreviews"]):
            if request.method != "POST":
                raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method: {request.method}")
            return await self._token_review(request)
        ns: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if not rest:
            return web.json_response(_resource_list(group, version))
        resource = next(
            (r for r in RESOURCES.values() if (r.group, r.version, r.plural) == (group, version, rest[0])), None
        )
        if resource is None or len(rest) > 2 or (ns is not None and not resource.namespaced):
            raise _not_found()
        if len(rest) == 2:
            if request.method == "PATCH":
                return await self._patch(request, resource, ns, rest[1])
            if request.method != "GET":
                raise ApiError(405, "MethodNotAllowed", f"the fake server does not allow {request.method} here")
            return self._get_one(resource, ns, rest[1])
        if request.method == "POST":
            return await self._post(request, resource, ns)
        if request.method != "GET":
            raise ApiError(405, "MethodNotAllowed", f"the fake server does not allow {request.method} here")
        query = request.query
        selection = _Filter(
            namespace=ns,
            labels=label_matcher(query["labelSelector"]) if query.get("labelSelector") else None,
            fields=field_matcher(query["fieldSelector"]) if query.get("fieldSelector") else None,
        )
        if query.get("watch") in ("true", "1"):
            return await self._watch(request, resource, selection)
        return web.json_response(self._list(resource, selection, query))

    def _get_one(self, resource: Resource, ns: str | None, name: str) -> web.Response:
        if resource.namespaced and ns is None:
            raise _not_found()
        with self._lock:
            obj = self._objects.get((resource.kind, ns or "", name))
            body = copy.deepcopy(obj)
        if body is None:
            raise _object_not_found(resource, name)
        return web.json_response(body)

    def _list(self, resource: Resource, selection: _Filter, query: Mapping[str, str]) -> Obj:
        limit = _int_param(query, "limit")
        token = query.get("continue")
        rv_param = query.get("resourceVersion", "")
        with self._lock:
            start = ""
            if token:
                snapshot_rv, start = _decode_continue(token)
                if snapshot_rv < self._compacted:
                    raise _expired(
                        "The provided continue parameter is too old to display a consistent list result. You "
                        "can start a new list without the continue parameter."
                    )
            elif query.get("resourceVersionMatch") == "Exact" and rv_param:
                snapshot_rv = _int_param(query, "resourceVersion")
            else:
                if _int_param(query, "resourceVersion") > self._rv:
                    raise ApiError(
                        504,
                        "Timeout",
                        f"Too large resource version: {rv_param}, current: {self._rv}",
                        {
                            "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                            "retryAfterSeconds": 1,
                        },
                    )
                snapshot_rv = self._rv
            state = self._state_at(snapshot_rv)
            matching = [
                (f"{k[1]}/{k[2]}" if resource.namespaced else k[2], o)
                for k, o in sorted(state.items())
                if k[0] == resource.kind and selection(o)
            ]
            matching = [(position, o) for position, o in matching if position > start]
            page = matching[:limit] if limit > 0 else matching
            items = []
            for _, obj in page:
                item = copy.deepcopy(obj)
                item.pop("kind", None)  # the real server leaves TypeMeta off list items
                item.pop("apiVersion", None)
                items.append(item)
            meta: Obj = {"resourceVersion": str(snapshot_rv)}
            if len(page) < len(matching):
                meta["continue"] = _encode_continue(snapshot_rv, page[-1][0])
                if selection.labels is None and selection.fields is None:
                    meta["remainingItemCount"] = len(matching) - len(page)
        return {"kind": f"{resource.kind}List", "apiVersion": resource.api_version, "metadata": meta, "items": items}

    async def _watch(self, request: web.Request, resource: Resource, selection: _Filter) -> web.StreamResponse:
        query = request.query
        rv_param = query.get("resourceVersion", "")
        since = _int_param(query, "resourceVersion")
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        timeout = _int_param(query, "timeoutSeconds") or self._default_watch_timeout
        watcher: _Watcher | None = _Watcher(resource, selection, bookmarks)
        initial: list[Obj] = []
        with self._lock:  # take the backlog and register atomically: no change is missed or repeated
            if rv_param in ("", "0"):
                for key, obj in sorted(self._objects.items()):
                    if key[0] == resource.kind and selection(obj):
                        initial.append({"type": "ADDED", "object": copy.deepcopy(obj)})
                if bookmarks and query.get("sendInitialEvents") in ("true", "1"):
                    mark = _bookmark(resource, str(self._rv))
                    mark["object"]["metadata"]["annotations"] = {INITIAL_EVENTS_END: "true"}
                    initial.append(mark)
            elif since < self._compacted:
                initial.append(
                    {
                        "type": "ERROR",
                        "object": _expired(f"too old resource version: {rv_param} ({self._compacted})").status(),
                    }
                )
                watcher = None  # the real server, too, answers 200 and ends the stream after the ERROR
            else:
                for change in self._changes:
                    if change.rv > since and RESOURCES[change.obj["kind"]] is resource:
                        event = _event_for(change, selection)
                        if event is not None:
                            initial.append(event)
            if watcher is not None:
                self._watchers.add(watcher)
                self._watch_seen += 1
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Cache-Control": "no-cache"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for event in initial:
                await response.write(_line(event))
            if watcher is None:
                await response.write_eof()
                return response
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                wait = min(remaining, self._bookmark_interval) if self._bookmark_interval and bookmarks else remaining
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), wait)
                except TimeoutError:
                    if remaining > wait:  # a periodic bookmark, queued behind every change it covers
                        with self._lock:
                            self._send(watcher, _bookmark(resource, str(self._rv)))
                    continue
                if item == _DROP:
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                if item == _CLOSE:
                    break
                assert isinstance(item, dict)
                await response.write(_line(item))
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        finally:
            if watcher is not None:
                with self._lock:
                    self._watchers.discard(watcher)
        return response

    async def _post(self, request: web.Request, resource: Resource, ns: str | None) -> web.Response:
        """Create, as the real server: 201 and the stored object; 409 AlreadyExists; 404 for a
        namespace that does not exist; 400 for a body of another kind or namespace."""
        if resource.namespaced and ns is None:
            raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on {resource.plural}")
        obj = await _json_body(request)
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", f"the body of the request must be a {resource.kind} object")
        if obj.get("apiVersion", resource.api_version) != resource.api_version:
            raise ApiError(
                400,
                "BadRequest",
                f"the API version in the data ({obj['apiVersion']}) does not match the expected API version "
                f"({resource.api_version})",
            )
        if obj.get("kind", resource.kind) != resource.kind:
            raise ApiError(
                400,
                "BadRequest",
                f"the kind in the data ({obj['kind']}) does not match the expected kind ({resource.kind})",
            )
        obj["kind"] = resource.kind
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            meta = obj["metadata"] = {}
        if resource.namespaced:
            if meta.get("namespace", ns) != ns:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = ns
        if not meta.get("name") and not meta.get("generateName"):
            raise ApiError(
                422,
                "Invalid",
                f'{resource.kind} "" is invalid: metadata.name: Required value: name or generateName is required',
                {"kind": resource.kind, "causes": [{"reason": "FieldValueRequired", "field": "metadata.name"}]},
            )
        for server_set in ("uid", "resourceVersion", "creationTimestamp", "generation"):
            meta.pop(server_set, None)
        _check_fields(resource, obj)
        if resource.namespaced:
            with self._lock:
                missing = ("Namespace", "", ns) not in self._objects
            if missing:  # the NamespaceLifecycle admission plugin
                raise _object_not_found(NAMESPACES, str(ns))
        return web.json_response(self.create(obj), status=201)

    async def _patch(self, request: web.Request, resource: Resource, ns: str | None, name: str) -> web.Response:
        """JSON Patch (RFC 6902) and JSON merge patch (RFC 7386); a strategic merge patch is applied as
        a merge patch (close enough for maps; lists are replaced rather than merged by key)."""
        if resource.namespaced and ns is None:
            raise _not_found()
        content_type = request.content_type
        if content_type not in (JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH):
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: {JSON_PATCH}, "
                f"{MERGE_PATCH}, {STRATEGIC_MERGE_PATCH}, application/apply-patch+yaml",
            )
        patch = await _json_body(request)
        key = (resource.kind, ns or "", name)
        with self._lock:
            current = copy.deepcopy(self._objects.get(key))
        if current is None:
            raise _object_not_found(resource, name)
        if content_type == JSON_PATCH:
            if not isinstance(patch, list) or not all(isinstance(op, dict) for op in patch):
                raise ApiError(400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
            try:
                patched = _json_patch(current, patch)
            except _PatchError as exc:
                raise ApiError(422, "Invalid", str(exc)) from None
        else:
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "the patch must be a JSON object")
            patched = _merge_patch(current, patch)
        if not isinstance(patched, dict):
            raise ApiError(422, "Invalid", "the patched object is not an object")
        meta = patched.get("metadata")
        if not isinstance(meta, dict):
            raise ApiError(422, "Invalid", "the patched object has no metadata")
        if (meta.get("name"), meta.get("namespace", "")) != (name, ns or "") or patched.get("kind") != resource.kind:
            raise ApiError(400, "BadRequest", "the name, namespace or kind of the object cannot be patched")
        _check_fields(resource, patched)
        # A resourceVersion the patch sets is a precondition (409 Conflict if it is not the stored one).
        return web.json_response(self.update(patched))

    async def _token_review(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            spec = body["spec"]
            assert isinstance(spec, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ApiError(400, "BadRequest", "the TokenReview body must be JSON with a spec") from None
        if not spec.get("token"):
            raise ApiError(400, "BadRequest", "token is required for TokenReview in authentication")
        if body.get("kind", "TokenReview") != "TokenReview":
            raise ApiError(400, "BadRequest", f"expected kind TokenReview, got {body.get('kind')!r}")
        review = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": self._review(spec),
        }
        return web.json_response(review, status=201)


# --- helpers ------------------------------------------------------------------------------------


def _event_for(change: _Change, selection: _Filter) -> Obj | None:
    """The watch event a change makes for one watcher, given what it selects (or None)."""
    now, before = selection(change.obj), selection(change.prev)
    if change.type == "DELETED":
        type_ = "DELETED" if before else None
    elif now and before:
        type_ = "MODIFIED"
    elif now:
        type_ = "ADDED"
    elif before:
        type_ = "DELETED"
    else:
        type_ = None
    return None if type_ is None else {"type": type_, "object": copy.deepcopy(change.obj)}


async def _json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except ValueError as exc:
        raise ApiError(400, "BadRequest", f"the body of the request is not JSON: {exc}") from None


_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def _check_fields(resource: Resource, obj: Obj) -> None:
    """What decoding and validation would refuse, for the kinds whose fields are bytes."""
    if resource is SECRETS:
        for k, v in (obj.get("data") or {}).items():
            if not _SECRET_KEY.match(k):
                raise ApiError(
                    422,
                    "Invalid",
                    f'Secret "{obj["metadata"].get("name", "")}" is invalid: data[{k}]: Invalid value: "{k}": a valid '
                    "config key must consist of alphanumeric characters, '-', '_' or '.'",
                )
            _check_base64(v, f"data[{k}]")
    elif resource is MUTATING_WEBHOOK_CONFIGURATIONS:
        for i, hook in enumerate(obj.get("webhooks") or []):
            bundle = (hook.get("clientConfig") or {}).get("caBundle")
            if bundle is not None:
                _check_base64(bundle, f"webhooks[{i}].clientConfig.caBundle")


def _check_base64(value: Any, where: str) -> None:
    # []byte fields are base64 in JSON: anything else fails to decode (400), as on the real server.
    try:
        if not isinstance(value, str):
            raise ValueError("not a string")
        base64.b64decode(value, validate=True)
    except ValueError:
        raise ApiError(400, "BadRequest", f"{where}: illegal base64 data") from None


class _PatchError(Exception):
    pass


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _PatchError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, path: str, op: str) -> tuple[Any, str]:
    steps = _pointer(path)
    if not steps:
        raise _PatchError(f"{op} operation does not apply: the root cannot be the target")
    target = doc
    for step in steps[:-1]:
        if isinstance(target, dict) and step in target:
            target = target[step]
        elif isinstance(target, list) and step.isdigit() and int(step) < len(target):
            target = target[int(step)]
        else:
            raise _PatchError(f"{op} operation does not apply: doc is missing path: {path!r}")
    if not isinstance(target, dict | list):
        raise _PatchError(f"{op} operation does not apply: doc is missing path: {path!r}")
    return target, steps[-1]


def _index(container: list[Any], step: str, path: str, op: str, *, end: bool = False) -> int:
    if end and step == "-":
        return len(container)
    if not step.isdigit() or int(step) > len(container) or (not end and int(step) == len(container)):
        raise _PatchError(f"{op} operation does not apply: index out of range in {path!r}")
    return int(step)


def _get_path(doc: Any, path: str, op: str) -> Any:
    if path == "":
        return doc
    parent, step = _parent(doc, path, op)
    if isinstance(parent, dict):
        if step not in parent:
            raise _PatchError(f"{op} operation does not apply: doc is missing key: {path!r}")
        return parent[step]
    return parent[_index(parent, step, path, op)]


def _add(doc: Any, path: str, value: Any, op: str = "add") -> Any:
    if path == "":
        return value
    parent, step = _parent(doc, path, op)
    if isinstance(parent, dict):
        parent[step] = value
    else:
        parent.insert(_index(parent, step, path, op, end=True), value)
    return doc


def _remove(doc: Any, path: str, op: str = "remove") -> Any:
    parent, step = _parent(doc, path, op)
    if isinstance(parent, dict):
        if step not in parent:
            raise _PatchError(f"{op} operation does not apply: doc is missing key: {path!r}")
        return parent.pop(step)
    return parent.pop(_index(parent, step, path, op))


def _json_patch(doc: Obj, operations: list[Obj]) -> Any:
    """Apply an RFC 6902 patch (add, remove, replace, move, copy, test) to a copy of `doc`."""
    result: Any = copy.deepcopy(doc)
    for operation in operations:
        op, path = operation.get("op"), operation.get("path")
        if not isinstance(path, str):
            raise _PatchError(f"operation {op!r} has no path")
        if op in ("add", "replace", "test") and "value" not in operation:
            raise _PatchError(f"{op} operation has no value")
        value = copy.deepcopy(operation.get("value"))
        if op == "add":
            result = _add(result, path, value)
        elif op == "remove":
            _remove(result, path)
        elif op == "replace":
            if path == "":
                result = value
            else:
                _get_path(result, path, "replace")  # must exist
                parent, step = _parent(result, path, "replace")
                parent[step if isinstance(parent, dict) else int(step)] = value
        elif op in ("move", "copy"):
            source = operation.get("from")
            if not isinstance(source, str):
                raise _PatchError(f"{op} operation has no from")
            moved = copy.deepcopy(_get_path(result, source, op))
            if op == "move":
                _remove(result, source, op)
            result = _add(result, path, moved, op)
        elif op == "test":
            if _get_path(result, path, "test") != value:
                raise _PatchError(f"testing value {path} failed: test failed")
        else:
            raise _PatchError(f"Unexpected kind: {op}")
    return result


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = _merge_patch(result.get(k), v)
    return result


def _int_param(query: Mapping[str, str], name: str) -> int:
    """An integer query parameter; 0 when absent or empty, 400 BadRequest when not a number."""
    text = query.get(name) or "0"
    if not text.isdigit():
        raise ApiError(400, "BadRequest", f"invalid value for {name}: {text!r}")
    return int(text)


def _bookmark(resource: Resource, rv: str) -> Obj:
    return {
        "type": "BOOKMARK",
        "object": {"kind": resource.kind, "apiVersion": resource.api_version, "metadata": {"resourceVersion": rv}},
    }


def _line(event: Obj) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


def _encode_continue(rv: int, start: str) -> str:
    # The real server's token: base64url of {"v": "meta.k8s.io/v1", "rv": N, "start": "<key>\x00"}.
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start + "\x00"}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if data.get("v") != "meta.k8s.io/v1":
            raise ValueError("version")
        return int(data["rv"]), str(data["start"]).rstrip("\x00")
    except (ValueError, KeyError, TypeError):
        raise ApiError(400, "BadRequest", f"continue key is not valid: {token!r}") from None


def _fault_error(fault: _Fault) -> ApiError:
    if fault.status == 429:
        return ApiError(
            429,
            "TooManyRequests",
            "the server has received too many requests and has asked us to try again later",
            None if fault.retry_after is None else {"retryAfterSeconds": fault.retry_after},
        )
    if fault.status == 410:
        return _expired("injected: the resource version is too old")
    reasons = {
        500: "InternalError",
        503: "ServiceUnavailable",
        504: "Timeout",
        403: "Forbidden",
        401: "Unauthorized",
        409: "Conflict",
        404: "NotFound",
    }
    return ApiError(fault.status, reasons.get(fault.status, "InternalError"), f"injected failure {fault.status}")


def _not_found() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource")


def _qualified(resource: Resource) -> str:
    """How the server names a resource in messages: `secrets`, `<plural>.<group>` for other groups."""
    return f"{resource.plural}.{resource.group}" if resource.group else resource.plural


def _details(resource: Resource, name: str) -> Obj:
    details: Obj = {"name": name}
    if resource.group:
        details["group"] = resource.group
    details["kind"] = resource.plural
    return details


def _object_not_found(resource: Resource, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{_qualified(resource)} "{name}" not found', _details(resource, name))


def _api_groups() -> Obj:
    groups = []
    for group in sorted({r.group for r in RESOURCES.values() if r.group} | {"authentication.k8s.io"}):
        version = {"groupVersion": f"{group}/v1", "version": "v1"}
        groups.append({"name": group, "versions": [version], "preferredVersion": version})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def _resource_list(group: str, version: str) -> Obj:
    group_version = f"{group}/{version}" if group else version
    resources = [
        {
            "name": r.plural,
            "singularName": r.kind.lower(),
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": ["create", "get", "list", "patch", "watch"],
        }
        for r in RESOURCES.values()
        if (r.group, r.version) == (group, version)
    ]
    if (group, version) == ("authentication.k8s.io", "v1"):
        resources.append(
            {
                "name": "tokenreviews",
                "singularName": "tokenreview",
                "namespaced": False,
                "kind": "TokenReview",
                "verbs": ["create"],
            }
        )
    if not resources:
        raise _not_found()
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}
