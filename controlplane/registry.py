"""Sources of workloads and services -> one `MeshModel`, and a watcher for the mesh file.

The registry merges the mesh file's model with the workloads that connected
proxies announce about themselves. Every change calls `on_change` with a new model, and whether
its burst of changes is over already (`settled`: nothing to wait for before pushing it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from . import meshfile
from .errors import MeshFileError
from .model import MeshModel, Service, Workload, labels

log = logging.getLogger("meshplane.registry")

REBUILD_DELAY = 0.02
"""Registration changes within this long are merged into one model rebuild (see `Registry._rebuild`)."""


class Registry:
    """Not thread-safe: call from the event loop.

    Registrations may be restored from before a restart (`restore`): they count as registered
    until their proxy reconnects or `expire_restored()` drops those that did not, so the first
    proxies to reconnect after a restart are not sent a mesh that lacks the others.
    """

    def __init__(
        self,
        static: MeshModel,
        on_change: Callable[[MeshModel, bool], None] = lambda m, settled: None,
        *,
        self_registration: bool = True,
    ) -> None:
        self._static = static
        self._cluster: tuple[tuple[Service, ...], tuple[Workload, ...]] = ((), ())
        self._proxies: dict[str, tuple[Workload, int]] = {}
        self._restored: dict[str, Workload] = {}
        self._on_change = on_change
        self.self_registration = self_registration
        self._model = static
        self._dirty = False

    def set_cluster(
        self, services: tuple[Service, ...], workloads: tuple[Workload, ...], *, settled: bool = False
    ) -> None:
        """What Kubernetes says: its services and pods. Merged with the mesh file by `_rebuild`;
        `settled`: the caller coalesced its burst (the informers went quiet)."""
        self._cluster = (services, workloads)
        self._apply(settled=settled)

    def restore(self, registrations: dict[str, Workload]) -> None:
        self._restored = {k: w for k, w in registrations.items() if k not in self._proxies}
        self._rebuild()

    def expire_restored(self) -> list[str]:
        """Drop restored registrations whose proxy has not come back; returns their ids."""
        gone, self._restored = sorted(self._restored), {}
        if gone:
            self._rebuild()
        return gone

    def registrations(self) -> dict[str, Workload]:
        """Every registration in force (connected proxies, and restored ones not yet back)."""
        return {**self._restored, **{k: w for k, (w, _) in self._proxies.items()}}

    @property
    def model(self) -> MeshModel:
        if self._dirty:
            self._apply()
        return self._model

    def set_static(self, static: MeshModel) -> None:
        """A new mesh file. Settled: its watcher applies an edit only once the file stopped changing,
        so the server's wait for quiet would only add to every edit's latency."""
        self._static = static
        self._apply(settled=True)

    def _merged(self) -> MeshModel:
        """The mesh file plus the cluster. The cluster wins a service or workload both name (it is the
        source of truth); the file adds what the cluster lacks (external services, VMs, a test mesh)."""
        services, workloads = self._cluster
        if not services and not workloads:
            return self._static
        have = {(s.namespace, s.name) for s in services}
        pods = {(w.namespace, w.name) for w in workloads}
        s = self._static
        return dataclasses.replace(
            s,
            services=services + tuple(x for x in s.services if (x.namespace, x.name) not in have),
            workloads=workloads + tuple(w for w in s.workloads if (w.namespace, w.name) not in pods),
        )

    def register(self, proxy_id: str, workload: Workload) -> None:
        """A proxy's stream opened; several streams of one proxy are counted."""
        previous, count = self._proxies.get(proxy_id, (self._restored.pop(proxy_id, None), 0))
        self._proxies[proxy_id] = (workload, count + 1)
        # The newest stream speaks for the proxy: a reconnect may bring new labels or an address.
        if self.self_registration and workload != previous:
            self._rebuild(soon=True)

    def drain(self, proxy_id: str) -> None:
        """The proxy's last stream closed: it stays an endpoint until `unregister`, but draining."""
        entry = self._proxies.get(proxy_id)
        if entry is None or entry[0].draining:
            return
        self._proxies[proxy_id] = (dataclasses.replace(entry[0], draining=True), entry[1])
        if self.self_registration:
            self._rebuild(soon=True)

    def unregister(self, proxy_id: str) -> None:
        entry = self._proxies.get(proxy_id)
        if entry is None:
            return
        workload, count = entry
        if count > 1:
            self._proxies[proxy_id] = (workload, count - 1)
            return
        del self._proxies[proxy_id]
        if self.self_registration:
            self._rebuild(soon=True)

    def _rebuild(self, *, soon: bool = False) -> None:
        """Rebuild the model; `soon` (a proxy came or went): within REBUILD_DELAY on an event loop, so
        that a storm of proxies connecting or going away costs one rebuild, not one each (2-4 ms each
        at 1,000 services: a second of event loop per 300 proxies). Other sources (the mesh file, the
        cluster) are coalesced already and rebuild at once; `model` is always current."""
        if not soon:
            self._apply()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._apply()
            return
        if not self._dirty:
            self._dirty = True
            loop.call_later(REBUILD_DELAY, self._apply_pending)

    def _apply_pending(self) -> None:
        if self._dirty:
            self._apply()

    def _apply(self, *, settled: bool = False) -> None:
        # Proxies coming and going are not `settled`, though merged for REBUILD_DELAY: in a connect
        # storm they keep coming, and the server's debounce (at most a push a second) is what keeps
        # state-of-the-world sidecars from being sent every endpoint many times a second.
        self._dirty = False
        dynamic = tuple(w for _, w in sorted(self.registrations().items())) if self.self_registration else ()
        model = self._merged().with_workloads(dynamic)
        for w in self._static.workloads:
            if (served := model.workload(w.namespace, w.name)) is not None and served != w:
                log.error(
                    "mesh file entry %s/%s says service account %s, but the proxy connected as it is %s: "
                    "serving the proxy's identity and ignoring the entry (fix the mesh file)",
                    w.namespace,
                    w.name,
                    w.service_account,
                    served.service_account,
                )
        if model != self._model:
            self._model = model
            self._on_change(model, settled)


class RegistrationStore:
    """Self-registrations kept in a JSON file across restarts (local mode: in Kubernetes mode the
    endpoints come from EndpointSlices). Written atomically; a damaged file is logged and ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Workload]:
        try:
            doc = json.loads(self.path.read_text())
            return {
                str(proxy_id): Workload(
                    name=w["name"],
                    namespace=w["namespace"],
                    service_account=w["service_account"],
                    address=w["address"],
                    labels=labels(w["labels"]),
                )
                for proxy_id, w in doc["registrations"].items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring saved registrations in %s: %s", self.path, e)
            return {}

    def save(self, registrations: dict[str, Workload]) -> None:
        doc = {
            "registrations": {
                proxy_id: {
                    "name": w.name,
                    "namespace": w.namespace,
                    "service_account": w.service_account,
                    "address": w.address,
                    "labels": dict(w.labels),
                }
                for proxy_id, w in sorted(registrations.items())
            }
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.path)


class MeshFileWatcher:
    """Polls a mesh file and applies good edits; a broken edit is logged and the last good model stays.

    Polling (not inotify) because it also sees the atomic renames editors and
    Kubernetes ConfigMap volumes use, costs one stat per interval, and needs no extra package.
    A change is applied only once the file has stopped changing for `settle` seconds: a file
    written in place (`cat >`, `kubectl cp`, editors that truncate then write) is read half
    written otherwise, and a valid first half would drop services mesh-wide. For the same reason a
    reload that finds the file empty is refused (write `services: []` to remove every service).
    """

    def __init__(
        self,
        path: str | Path,
        apply: Callable[[MeshModel], None],
        *,
        interval: float = 0.2,
        settle: float = 0.5,
        on_error: Callable[[MeshFileError], None] = lambda e: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._apply = apply
        self._on_error = on_error
        self.interval = interval
        self.settle = settle
        self._clock = clock
        self._stamp: _Stamp | None = None
        self._pending: tuple[_Stamp | None, float] | None = None
        self._digest = b""

    def load_initial(self) -> MeshModel:
        """Load the file once, raising `MeshFileError` (the server must not start on a broken file)."""
        self._stamp = self._stat()
        text = self._read()
        model = meshfile.parse(text, str(self.path))
        self._digest = hashlib.sha256(text.encode()).digest()
        return model

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            # Reading and parsing a large file takes long (0.6 s at 1,000 services): off the event
            # loop, so streams keep being served meanwhile. Only this task polls: one at a time.
            self._applied(await asyncio.to_thread(self._load_changed))

    def check(self) -> bool:
        """Reload if the file changed and has settled; True when a new model was applied."""
        return self._applied(self._load_changed())

    def _applied(self, outcome: MeshModel | MeshFileError | None) -> bool:
        if isinstance(outcome, MeshFileError):
            log.error("mesh file rejected, still serving the last good one: %s", outcome)
            self._on_error(outcome)
            return False
        if outcome is None:
            return False
        log.info(
            "mesh file %s reloaded: %d services, %d static workloads",
            self.path,
            len(outcome.services),
            len(outcome.workloads),
        )
        self._apply(outcome)
        return True

    def _load_changed(self) -> MeshModel | MeshFileError | None:
        """The new model if the file changed and has settled, its error if it is broken, else None."""
        stamp = self._stat()
        if stamp == self._stamp:
            self._pending = None
            return None
        now = self._clock()
        if self._pending is None or self._pending[0] != stamp:
            self._pending = (stamp, now)
            if self.settle > 0:
                # Never on first sight: a stat races the write it sees. A file being truncated by its
                # writer was seen empty with the previous write's mtime (so "written long ago"), and
                # that empty mesh was applied: every service gone mesh-wide for a moment, and every
                # sidecar sent its whole config again (seen under benchmarks/mesh_scale.py's edits).
                return None
        # Settled: the same on two polls, and unchanged for `settle` (or last written that long ago).
        quiet_since = self._pending[1] if stamp is None else min(self._pending[1], stamp[0] / 1e9)
        if now - quiet_since < self.settle:
            return None
        self._stamp, self._pending = stamp, None
        try:
            text = self._read()
            digest = hashlib.sha256(text.encode()).digest()
            if digest == self._digest:
                return None
            model = meshfile.parse(text, str(self.path), empty=False)
        except MeshFileError as e:
            return e
        self._digest = digest
        return model

    def _stat(self) -> _Stamp | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> str:
        return meshfile.read(self.path)


_Stamp = tuple[int, int, int]
"""mtime (ns), size, inode."""
