"""Sources of workloads and services -> one `MeshModel`, and a watcher for the mesh file.

The registry merges the mesh file's model with the workloads that connected
proxies announce about themselves. Every change calls `on_change` with a new model.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from . import meshfile
from .errors import MeshFileError
from .model import MeshModel, Workload

log = logging.getLogger("meshplane.registry")


class Registry:
    """Not thread-safe: call from the event loop."""

    def __init__(self, static: MeshModel, on_change: Callable[[MeshModel], None] = lambda m: None) -> None:
        self._static = static
        self._proxies: dict[str, tuple[Workload, int]] = {}
        self._on_change = on_change
        self._model = static

    @property
    def model(self) -> MeshModel:
        return self._model

    def set_static(self, static: MeshModel) -> None:
        self._static = static
        self._rebuild()

    def register(self, proxy_id: str, workload: Workload) -> None:
        """A proxy's stream opened; several streams of one proxy are counted."""
        _, count = self._proxies.get(proxy_id, (workload, 0))
        self._proxies[proxy_id] = (workload, count + 1)
        if count == 0:
            self._rebuild()

    def unregister(self, proxy_id: str) -> None:
        entry = self._proxies.get(proxy_id)
        if entry is None:
            return
        workload, count = entry
        if count > 1:
            self._proxies[proxy_id] = (workload, count - 1)
            return
        del self._proxies[proxy_id]
        self._rebuild()

    def _rebuild(self) -> None:
        dynamic = tuple(w for _, (w, _) in sorted(self._proxies.items()))
        model = self._static.with_workloads(dynamic)
        if model != self._model:
            self._model = model
            self._on_change(model)


class MeshFileWatcher:
    """Polls a mesh file and applies good edits; a broken edit is logged and the last good model stays.

    Polling (not inotify) because it also sees the atomic renames editors and
    Kubernetes ConfigMap volumes use, costs one stat per interval, and needs no extra package.
    """

    def __init__(
        self,
        path: str | Path,
        apply: Callable[[MeshModel], None],
        *,
        interval: float = 0.2,
        on_error: Callable[[MeshFileError], None] = lambda e: None,
    ) -> None:
        self.path = Path(path)
        self._apply = apply
        self._on_error = on_error
        self.interval = interval
        self._stamp: tuple[int, int, int] | None = None
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
            self.check()

    def check(self) -> bool:
        """Reload if the file changed; True when a new model was applied."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            text = self._read()
            digest = hashlib.sha256(text.encode()).digest()
            if digest == self._digest:
                return False
            model = meshfile.parse(text, str(self.path))
        except MeshFileError as e:
            log.error("mesh file rejected, still serving the last good one: %s", e)
            self._on_error(e)
            return False
        self._digest = digest
        log.info(
            "mesh file %s reloaded: %d services, %d static workloads",
            self.path,
            len(model.services),
            len(model.workloads),
        )
        self._apply(model)
        return True

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> str:
        return meshfile.read(self.path)
