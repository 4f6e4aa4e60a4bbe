"""The Kubernetes registry source: list and watch Services, EndpointSlices, Pods and Namespaces.

The official client is synchronous, so each kind is listed and watched in a thread of its own,
and the thread hands every change to the event loop (`call_soon_threadsafe`); the loop never
waits on the API server. Each watch resumes from the last resourceVersion it saw (bookmarks
included), relists on `410 Gone`, and reconnects after an error or a dropped connection with a
jittered exponential backoff. `synced` is set once every kind has finished its first list: until
then nothing built from a partial view may be served.

Mapping objects to the model is `kubemodel.view`, a pure function; this module only keeps the
objects (slimmed to the fields that mapping reads) and says when they changed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import scope
from .errors import ConfigError
from .tokens import Identity, TokenError, identity_of_subject

log = logging.getLogger("meshplane.kubernetes")

PAGE = 500
"""Objects per list page."""
WATCH_SECONDS = 300
"""A watch is re-opened (from its resourceVersion) at least this often, as client-go does."""
BACKOFF = (0.5, 30.0)
"""First and longest wait before reconnecting after an error (doubling, with jitter)."""

Obj = dict[str, Any]
Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    group_path: str
    """URL prefix: /api/v1 or /apis/<group>/<version>."""
    plural: str
    namespaced: bool = True


SERVICES = Kind("Service", "/api/v1", "services")
ENDPOINT_SLICES = Kind("EndpointSlice", "/apis/discovery.k8s.io/v1", "endpointslices")
PODS = Kind("Pod", "/api/v1", "pods")
NAMESPACES = Kind("Namespace", "/api/v1", "namespaces", namespaced=False)
KINDS = (NAMESPACES, SERVICES, ENDPOINT_SLICES, PODS)


def api_client(kubeconfig: Path | None) -> Any:
    """In a pod: the in-cluster config. Else `kubeconfig`, or $KUBECONFIG / ~/.kube/config, as kubectl."""
    from kubernetes import client, config

    try:
        if kubeconfig is None:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
                return client.ApiClient()
            except config.ConfigException:
                pass
        return config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig) if kubeconfig else None
        )
    except (config.ConfigException, OSError, ValueError) as e:
        raise ConfigError(
            f"no Kubernetes client configuration: {e} (run in a pod, or pass --kubeconfig, or set KUBECONFIG)"
        ) from None


def slim(kind: Kind, obj: Obj) -> Obj:
    """Keep what the mapping reads: a cluster's pods are most of its objects and of our memory."""
    meta = obj.get("metadata") or {}
    out: Obj = {
        "metadata": {k: meta[k] for k in ("name", "namespace", "labels", "annotations", "resourceVersion") if k in meta}
    }
    if kind is PODS:
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        out["spec"] = {k: spec[k] for k in ("serviceAccountName", "serviceAccount") if k in spec}
        out["status"] = {k: status[k] for k in ("podIP",) if k in status}
        annotations = meta.get("annotations") or {}
        # Only the annotations the mapping reads: pods carry large ones (last-applied configurations).
        out["metadata"]["annotations"] = {
            k: v
            for k, v in annotations.items()
            if k.startswith(("sidecar.istio.io/status", "security.meshplane.io/", scope.ANNOTATION))
        }
    elif kind is SERVICES:
        out["spec"] = obj.get("spec") or {}
    elif kind is ENDPOINT_SLICES:
        out["endpoints"], out["ports"] = obj.get("endpoints"), obj.get("ports")
    return out


class KubernetesSource:
    """Keeps the cluster's objects of `KINDS` and calls `on_change()` (on the loop) after changes.

    `namespaces`: watch only these (an empty tuple: every namespace). Thread-safe where it says so;
    the stores are only touched on the loop.
    """

    def __init__(
        self,
        api: Any,
        on_change: Callable[[], None],
        *,
        namespaces: Sequence[str] = (),
        backoff: tuple[float, float] = BACKOFF,
    ) -> None:
        self._api = api
        self._on_change = on_change
        self.namespaces = tuple(namespaces)
        self._backoff = backoff
        self.stores: dict[str, dict[Key, Obj]] = {k.name: {} for k in KINDS}
        self._listed: set[tuple[str, str]] = set()
        self._targets = [
            (k, ns) for k in KINDS for ns in (self.namespaces if k.namespaced and self.namespaces else ("",))
        ]
        self.synced = asyncio.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watches: dict[str, Any] = {}
        """Thread name -> its open watch response, so `stop` can cut it."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self.relists = 0
        self.reconnects = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for kind, ns in self._targets:
            thread = threading.Thread(
                target=self._run, args=(kind, ns), name=f"watch-{kind.plural}-{ns or 'all'}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        log.info(
            "watching %s in %s", ", ".join(k.plural for k in KINDS), ", ".join(self.namespaces) or "every namespace"
        )

    def stop(self) -> None:
        self._stop.set()
        for response in list(self._watches.values()):
            with contextlib.suppress(Exception):
                response.response.shutdown()  # unblocks the thread reading it

    async def wait_stopped(self) -> None:
        """Stop, and give the threads a moment to notice (a watch blocked on the network is a daemon
        thread that ends with the process; it hands nothing to the loop once stopped)."""
        self.stop()

        def join() -> None:
            for t in self._threads:
                t.join(2.0)

        await asyncio.to_thread(join)

    # -- on the loop ----------------------------------------------------------------------

    def _replace(self, kind: Kind, ns: str, items: list[Obj]) -> None:
        store = self.stores[kind.name]
        for key in [k for k in store if not ns or k[0] == ns]:
            del store[key]
        for obj in items:
            store[_key(obj)] = obj
        self._listed.add((kind.name, ns))
        if not self.synced.is_set() and len(self._listed) == len(self._targets):
            log.info("first list of every watched kind done: %s", self.counts())
            self.synced.set()
        self._on_change()

    def _apply(self, kind: Kind, event: str, obj: Obj) -> None:
        store = self.stores[kind.name]
        if event == "DELETED":
            store.pop(_key(obj), None)
        else:
            store[_key(obj)] = obj
        self._on_change()

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.stores.items()}

    # -- in the threads ---------------------------------------------------------------------

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        if not self._stop.is_set():
            self._loop.call_soon_threadsafe(fn, *args)

    def _run(self, kind: Kind, ns: str) -> None:
        version: str | None = None
        failures = 0
        while not self._stop.is_set():
            try:
                if version is None:
                    items, version = self._list(kind, ns)
                    self._call(self._replace, kind, ns, items)
                version = self._watch(kind, ns, version)
                failures = 0
            except _Gone:
                log.info("%s: resourceVersion %s expired (410 Gone); listing again", kind.plural, version)
                version = None
                self.relists += 1
            except Exception as e:  # the API server, the network, a proxy in between: all retried
                if self._stop.is_set():
                    return
                failures += 1
                self.reconnects += 1
                first, longest = self._backoff
                delay = min(longest, first * 2 ** min(failures - 1, 10)) * random.uniform(0.5, 1.0)
                log.warning(
                    "%s: %s; retrying in %.1fs from resourceVersion %s", kind.plural, _describe(e), delay, version
                )
                self._stop.wait(delay)

    def _path(self, kind: Kind, ns: str) -> str:
        return f"{kind.group_path}/namespaces/{ns}/{kind.plural}" if ns else f"{kind.group_path}/{kind.plural}"

    def _request(self, path: str, query: list[tuple[str, Any]], *, timeout: float = 60) -> Any:
        try:
            return _http(self._api, "GET", path, query=query, timeout=timeout)
        except HttpError as e:
            if e.status == 410:
                raise _Gone() from None
            raise

    def _list(self, kind: Kind, ns: str) -> tuple[list[Obj], str]:
        items: list[Obj] = []
        token = ""
        while True:
            query: list[tuple[str, Any]] = [("limit", PAGE)]
            if token:
                query.append(("continue", token))
            response = self._request(self._path(kind, ns), query)
            doc = json.loads(response.read())
            items.extend(slim(kind, o) for o in doc.get("items") or [])
            meta = doc.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def _watch(self, kind: Kind, ns: str, version: str) -> str:
        """Follow changes after `version` until the server ends the watch; returns the last version seen."""
        query = [
            ("watch", "true"),
            ("resourceVersion", version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", WATCH_SECONDS),
        ]
        response = self._request(self._path(kind, ns), query, timeout=WATCH_SECONDS + 30)
        self._watches[threading.current_thread().name] = response
        try:
            for line in _lines(response, self._stop):
                event = json.loads(line)
                kind_of_event, obj = event.get("type"), event.get("object") or {}
                if kind_of_event == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise RuntimeError(f"watch error: {obj.get('message') or obj}")
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind_of_event in ("ADDED", "MODIFIED", "DELETED"):
                    self._call(self._apply, kind, kind_of_event, slim(kind, obj))
        finally:
            self._watches.pop(threading.current_thread().name, None)
            response.response.release_conn()
        return version


class _Gone(Exception):
    """410 Gone: the resourceVersion is older than the server's history; list again."""


def _lines(response: Any, stop: threading.Event) -> Any:
    """Newline-delimited JSON from a streaming response, across chunk boundaries."""
    pending = b""
    for chunk in response.response.stream(amt=65536, decode_content=True):
        if stop.is_set():
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from (line for line in lines if line.strip())
    if pending.strip():
        yield pending


def _key(obj: Obj) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _describe(e: Exception) -> str:
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None)
    return f"HTTP {status} {reason}" if status else f"{type(e).__name__}: {e}"


POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
REVIEW_CACHE = 60.0
"""Seconds a TokenReview answer is reused for the same token (Envoy reconnects with it often)."""


class TokenReviewer:
    """Checks a projected service-account token with the TokenReview API (`create tokenreviews`)."""

    def __init__(self, api: Any, audience: str) -> None:
        self._api = api
        self.audience = audience
        self._cache: dict[str, tuple[float, Identity]] = {}

    async def verify(self, token: str) -> Identity:
        loop = asyncio.get_running_loop()
        now = loop.time()
        digest = hashlib.sha256(token.encode()).hexdigest()
        hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < REVIEW_CACHE:
            return hit[1]
        identity = await asyncio.to_thread(self._review, token)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now, identity)
        return identity

    def _review(self, token: str) -> Identity:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        }
        try:
            response = _call(self._api, "/apis/authentication.k8s.io/v1/tokenreviews", "POST", body)
            status = json.loads(response.read()).get("status") or {}
        except Exception as e:  # the API server's trouble is not the proxy's fault, but it is refused all the same
            raise TokenError(f"the TokenReview API could not be asked ({_describe(e)})") from None
        if not status.get("authenticated"):
            raise TokenError(f"Kubernetes does not accept the token: {status.get('error') or 'not authenticated'}")
        if self.audience not in (status.get("audiences") or []):
            raise TokenError(f"the token is not for audience {self.audience!r}")
        user = status.get("user") or {}
        identity = identity_of_subject(str(user.get("username") or ""))
        pods = (user.get("extra") or {}).get(POD_NAME_EXTRA) or []
        return Identity(identity.namespace, identity.service_account, pod=str(pods[0]) if pods else "")


def load_ca_secret(api: Any, namespace: str, name: str, directory: Path, create: Callable[[Path], None]) -> CaFiles:
    """Make `directory` hold the CA kept in Secret `namespace/name`, shared by every replica; returns
    what the two now hold (for `sync_ca_secret`).

    No Secret: the first replica creates a root (`create(directory)`) and the Secret; one that loses
    the race (409 Conflict) reads the winner's. A directory that already holds a root (a restarted
    container keeps its emptyDir) is kept when it is the Secret's or a rotation of it, and a rotation
    is written back to the Secret; any other root is refused. Blocks: call it in a thread."""
    secret = read_ca_secret(api, namespace, name)
    if secret is None:
        create(directory)
        files = _local_files(directory)
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "type": "Opaque",
            "data": {f: base64.b64encode(v).decode() for f, v in files.items()},
        }
        try:
            _call(api, f"/api/v1/namespaces/{namespace}/secrets", "POST", body)
            log.info("created the CA Secret %s/%s with a new root", namespace, name)
            return files
        except HttpError as e:
            if e.status != 409:
                raise ConfigError(f"cannot create the CA Secret {namespace}/{name}: {e}") from None
            log.info("another replica created the CA Secret %s/%s first; using its root", namespace, name)
        secret = read_ca_secret(api, namespace, name)
        if secret is None:
            raise ConfigError(f"the CA Secret {namespace}/{name} vanished while it was being created")
        _write_files(directory, secret)
        return secret
    local = _local_files(directory) if (directory / _ROOT_FILES[0]).exists() else {}
    if local and local != secret:
        if local.get(_PREVIOUS_FILES[0]) == secret.get(_ROOT_FILES[0]):
            _put_ca_secret(api, namespace, name, local)  # rotated here before a restart
            log.info("the CA root rotated in %s is now in the Secret %s/%s", directory, namespace, name)
            return local
        if not (secret.get(_PREVIOUS_FILES[0]) == local.get(_ROOT_FILES[0])):
            raise ConfigError(
                f"{directory} holds another CA root than the Secret {namespace}/{name}: remove the directory to "
                "use the Secret's (every replica must share one root)"
            )
    _write_files(directory, secret)
    return secret


def sync_ca_secret(api: Any, namespace: str, name: str, directory: Path, last: CaFiles) -> CaFiles:
    """One round of keeping a replica's CA directory and the Secret equal: a rotation done in this
    replica (`meshctl ca-rotate`) goes to the Secret; one done elsewhere comes into the directory, where
    the server picks it up. `last` is what both held after the previous round. Blocks."""
    secret = read_ca_secret(api, namespace, name)
    local = _local_files(directory)
    if secret is None:
        raise ConfigError(f"the CA Secret {namespace}/{name} is gone")
    if local != last and secret == last:
        _put_ca_secret(api, namespace, name, local)
        log.info("wrote this replica's CA rotation to the Secret %s/%s", namespace, name)
        return local
    if secret != last:
        _write_files(directory, secret)
        log.info("took the CA rotation in the Secret %s/%s into %s", namespace, name, directory)
        return secret
    return last


CaFiles = dict[str, bytes]
_ROOT_FILES = ("root-cert.pem", "root-key.pem")
_PREVIOUS_FILES = ("previous-root-cert.pem", "previous-root-key.pem")


def read_ca_secret(api: Any, namespace: str, name: str) -> CaFiles | None:
    try:
        doc = json.loads(_call(api, f"/api/v1/namespaces/{namespace}/secrets/{name}", "GET").read())
    except HttpError as e:
        if e.status == 404:
            return None
        raise ConfigError(f"cannot read the CA Secret {namespace}/{name}: {e}") from None
    data = doc.get("data") or {}
    files = {f: base64.b64decode(data[f]) for f in (*_ROOT_FILES, *_PREVIOUS_FILES) if data.get(f)}
    if not all(f in files for f in _ROOT_FILES):
        raise ConfigError(f"the CA Secret {namespace}/{name} has no {' and '.join(_ROOT_FILES)}")
    return files


def _put_ca_secret(api: Any, namespace: str, name: str, files: CaFiles) -> None:
    data: dict[str, str | None] = {f: base64.b64encode(v).decode() for f, v in files.items()}
    data.update({f: None for f in _PREVIOUS_FILES if f not in files})  # a merge patch removes with null
    _call(
        api,
        f"/api/v1/namespaces/{namespace}/secrets/{name}",
        "PATCH",
        {"data": data},
        content_type="application/merge-patch+json",
    )


def _local_files(directory: Path) -> CaFiles:
    return {f: (directory / f).read_bytes() for f in (*_ROOT_FILES, *_PREVIOUS_FILES) if (directory / f).exists()}


def _write_files(directory: Path, files: CaFiles) -> None:
    """Atomically, each file; rotation files the Secret does not have are removed."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for f, value in files.items():
        tmp = directory / f"{f}.sync"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(value)
        os.replace(tmp, directory / f)
    for f in _PREVIOUS_FILES:
        if f not in files:
            (directory / f).unlink(missing_ok=True)


def patch_webhook_ca_bundle(api: Any, name: str, bundle: bytes) -> bool:
    """Set every webhook's caBundle in MutatingWebhookConfiguration `name`; False if it does not exist
    (yet). Blocks: call it in a thread."""
    path = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}"
    try:
        doc = json.loads(_call(api, path, "GET").read())
    except Exception as e:
        if getattr(e, "status", None) == 404:
            return False
        raise
    encoded = base64.b64encode(bundle).decode()
    webhooks = doc.get("webhooks") or []
    if all((w.get("clientConfig") or {}).get("caBundle") == encoded for w in webhooks):
        return True
    # The list is patched by index: the first operation makes a change made since the GET a 422 (retried).
    version = (doc.get("metadata") or {}).get("resourceVersion")
    patch = [{"op": "test", "path": "/metadata/resourceVersion", "value": version}] if version else []
    patch += [
        {
            "op": "replace" if "caBundle" in (w.get("clientConfig") or {}) else "add",
            "path": f"/webhooks/{i}/clientConfig/caBundle",
            "value": encoded,
        }
        for i, w in enumerate(webhooks)
    ]
    _call(api, path, "PATCH", patch, content_type="application/json-patch+json")
    log.info("patched the caBundle of %d webhooks in %s", len(webhooks), name)
    return True


class HttpError(Exception):
    """The API server answered with an error status; `status` is the HTTP code."""

    def __init__(self, status: int, reason: str, body: bytes) -> None:
        self.status, self.reason = status, reason
        super().__init__(f"HTTP {status} {reason}: {body[:300].decode(errors='replace')}")


def _http(
    api: Any,
    method: str,
    path: str,
    *,
    query: list[tuple[str, Any]] | None = None,
    body: Any = None,
    content_type: str = "application/json",
    timeout: float = 10,
) -> Any:
    """One request through the client's own configuration (server, credentials, TLS); the response
    is left unread, so a watch can be streamed. Raises `HttpError` for an error status."""
    method, url, headers, data, post = api.param_serialize(
        method,
        path,
        query_params=query or [],
        header_params={"Accept": "application/json", "Content-Type": content_type},
        body=body,
        auth_settings=["BearerToken"],
    )
    response = api.call_api(method, url, header_params=headers, body=data, post_params=post, _request_timeout=timeout)
    if response.status >= 400:
        raise HttpError(response.status, response.reason, response.read())
    return response


def _call(api: Any, path: str, method: str, body: Any = None, *, content_type: str = "application/json") -> Any:
    return _http(api, method, path, body=body, content_type=content_type)
