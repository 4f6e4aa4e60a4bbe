"""xDS resource types: type URLs, which types are wildcard, and the push order.

The order is defined once, here. Clusters come before the endpoints they load,
listeners before the routes they name, so a proxy never points at something it
has not received yet (make-before-break); removals are sent last (see stream.py).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf import any_pb2

from meshplane.bootstrap.protobuf import TYPE_URL_PREFIX as _PREFIX

CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
SECRET = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

PUSH_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)
"""CDS, EDS, LDS, RDS, SDS: the order Istio uses, and the one Envoy's warming expects."""

WILDCARD: frozenset[str] = frozenset({CLUSTER, LISTENER})
"""Types whose every response carries the proxy's full set (state of the world)."""

SHORT_NAMES = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS", SECRET: "SDS"}


def short(type_url: str) -> str:
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])


@dataclass(frozen=True, slots=True)
class Resource:
    """One named resource, packed and serialized once and shared by every stream that sends it."""

    name: str
    version: str
    packed: any_pb2.Any


Resources = dict[str, Resource]
"""name -> Resource for one type."""

_T = TypeVar("_T")
_serials = itertools.count(1)
MEMO_SIZE = 32
"""Encoded bodies and diffs one snapshot keeps (a few per kind of stream state it is sent to)."""


class Snapshot(dict[str, Resource]):
    """One view's resources of one type under one model, never changed once built.

    Thousands of streams send the same snapshot, so what each would work out from it is worked out once
    and kept on it: the name -> version map, the content version, encoded response bodies, and what
    changed since an earlier snapshot. A stream's push then costs what changed, not what exists.
    Earlier snapshots are named by serial, never referenced: a snapshot keeps no other alive."""

    __slots__ = ("_memo", "_names", "_version", "_versions", "serial")

    def __init__(self, items: Iterable[tuple[str, Resource]] = ()) -> None:
        super().__init__(items)
        self.serial = next(_serials)
        self._versions: dict[str, str] | None = None
        self._names: frozenset[str] | None = None
        self._version: str | None = None
        self._memo: dict[object, object] = {}

    def versions(self) -> dict[str, str]:
        if self._versions is None:
            self._versions = {n: r.version for n, r in self.items()}
        return self._versions

    def names(self) -> frozenset[str]:
        if self._names is None:
            self._names = frozenset(self)
        return self._names

    def version(self) -> str:
        if self._version is None:
            self._version = content_version(frozenset(self.versions().items()))
        return self._version

    def diff(self, old: Snapshot) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(names new or changed since `old`, names gone since `old`), each sorted."""
        return self.memo(
            ("diff", old.serial),
            lambda: (
                tuple(sorted(n for n, r in self.items() if (o := old.get(n)) is None or o.version != r.version)),
                tuple(sorted(n for n in old if n not in self)),
            ),
        )

    def retire(self) -> None:
        """A newer snapshot replaced this one: forget what was kept for sending it. Streams that still
        hold it only compare against it, and thousands of them may each hold another one."""
        self._memo.clear()

    def memo(self, key: object, make: Callable[[], _T]) -> _T:
        if key in self._memo:
            return self._memo[key]  # type: ignore[return-value]
        if len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
        value = self._memo[key] = make()
        return value


def shared_names(names: frozenset[str], available: Resources) -> frozenset[str]:
    """`names`, or, when they are exactly `available`'s, the set its snapshot keeps for every stream that
    subscribes to all of it: a set of 1,000 names is 32 KB, and thousands of streams name the same ones."""
    if isinstance(available, Snapshot) and len(names) == len(available) and names == (mine := available.names()):
        return mine
    return names


@functools.lru_cache(maxsize=64)
def content_version(versions: frozenset[tuple[str, str]]) -> str:
    """A content hash of (name, version) pairs: the state-of-the-world version of a set of resources.

    Memoized for streams whose sets are not one snapshot's (those keep theirs on the snapshot); bounded
    small on purpose: a key holds a whole set (about 0.5 MB at 2,000 resources)."""
    h = hashlib.blake2b(digest_size=8)
    for name, v in sorted(versions):
        h.update(f"{name}\0{v}\n".encode())
    return h.hexdigest()
