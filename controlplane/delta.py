"""One incremental (delta) ADS stream's protocol state. No I/O: requests in, responses out.

The delta twin of `stream.StreamState`. Per type URL it keeps what the proxy subscribed to (names,
or the wildcard), what the proxy holds (name -> version: what we sent, or what it said it had in
`initial_resource_versions` when it reconnected), the nonce of the latest response, and the last
ACK and NACK. The rules:

- A response carries only what differs from what the proxy holds: new or changed resources, and
  `removed_resources` for names it holds that are gone (or that it subscribed to and do not exist).
  A reconnecting proxy that already holds everything is sent nothing.
- Subscriptions change with every request (`resource_names_subscribe` / `_unsubscribe`; `*`, or a
  first wildcard-type request that names nothing, is the wildcard); a request that answers the
  latest nonce is also an ACK, or a NACK with `error_detail`. A NACK is recorded and nothing is
  re-sent: the proxy keeps what it had, and it holds what it had before the rejected response.
- The first request for a type is always answered (an empty response ends a new Envoy's wait for
  it), unless the proxy reconnects holding resources: then only what differs is sent, if anything.
- Pushes go in the order of `PUSH_ORDER`, additions and changes first and removals after every
  type, so nothing the proxy is about to stop using disappears under it.
- After clusters change, their endpoints are sent again: a re-created EDS cluster waits for them.

A push costs what changed, not what exists: a proxy known to hold exactly one of the cache's
snapshots (its `base`) is sent that snapshot's diff to the new one, worked out once for every
stream, and a response many streams send is encoded once (see `replies`). Anything else (a NACK,
owed endpoints, a subscription change) takes the general path, which compares name by name.
`tests/fuzz/test_push_paths.py` holds both paths to the same bytes.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import NamedTuple

from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2

from .replies import Reply, delta_body
from .resources import CLUSTER, ENDPOINT, PUSH_ORDER, WILDCARD, Resource, Resources, Snapshot, shared_names
from .stream import Nack, Source

WILDCARD_NAME = "*"
SHARED_DIFF = 64
"""A diff of at most this many names is encoded once per snapshot for every stream that sends it."""


@dataclass(slots=True)
class DeltaTypeState:
    wildcard: bool = False
    names: frozenset[str] = frozenset()
    held: dict[str, str] = field(default_factory=dict)
    """name -> version the proxy holds; a snapshot's own map while `held_shared` (copied before a change)."""
    held_shared: bool = False
    absent: set[str] = field(default_factory=set)
    """Subscribed names already reported as removed (they do not exist): not reported again."""
    requested: bool = False
    nonce: str = ""
    pending: dict[str, str | None] = field(default_factory=dict)
    """The latest response's changes (version, or None for a removal), applied to `held` on ACK."""
    version: str = ""
    acked_version: str = ""
    last_ack: float | None = None
    last_nack: Nack | None = None
    owed: set[str] = field(default_factory=set)
    """Names to send again even if the proxy holds their version (endpoints of re-created clusters)."""
    rejected: dict[str, str] = field(default_factory=dict)
    """name -> version the proxy NACKed: not sent again until it changes."""
    base: Snapshot | None = None
    """The snapshot the proxy holds exactly (every wanted name at its version, nothing pending, owed or
    rejected, every missing subscribed name reported): a push then sends its diff to the new one."""
    syncing: Snapshot | None = None
    """The snapshot the proxy will hold exactly once it ACKs the latest response."""

    @property
    def sent(self) -> dict[str, str]:
        """What the proxy holds (the name the state-of-the-world state uses, for /debug)."""
        return self.held


@dataclass(frozen=True, slots=True)
class DeltaOutcome:
    responses: list[Reply]
    kind: str
    """"request", "ack", "nack", "stale" (a nonce that is not the latest: its subscription changes
    still count) or "resumed" (a reconnecting proxy that holds the current version)."""
    nack: Nack | None = None


class DeltaStreamState:
    def __init__(self, source: Source, *, clock: Callable[[], float] = time.time) -> None:
        self._source = source
        self._clock = clock
        self._nonces = itertools.count(1)
        self._versions = itertools.count(1)
        self.types: dict[str, DeltaTypeState] = {}

    def on_request(self, req: discovery_pb2.DeltaDiscoveryRequest) -> DeltaOutcome:
        t = self.types.setdefault(req.type_url, DeltaTypeState())
        kind, nack = "request", None
        if req.response_nonce and t.nonce:
            if req.response_nonce != t.nonce:
                kind = "stale"
            elif req.HasField("error_detail"):
                nack = Nack(
                    t.version,
                    t.nonce,
                    req.error_detail.message,
                    self._clock(),
                    tuple(sorted(t.pending)),
                    t.acked_version,
                )
                t.rejected.update({n: v for n, v in t.pending.items() if v is not None})
                t.last_nack, t.pending, kind = nack, {}, "nack"
                t.base = t.syncing = None
            else:
                self._ack(t)
                kind = "ack"
        first = not t.requested
        if req.resource_names_subscribe or req.resource_names_unsubscribe:
            t.base = None
        if first:
            t.requested = True
            t.held, t.held_shared = dict(req.initial_resource_versions), False
            if req.type_url in WILDCARD and not req.resource_names_subscribe:
                t.wildcard = True  # the legacy wildcard: a first request that names nothing
        if req.resource_names_subscribe:
            # Interned: shared by every stream naming them (see stream.StreamState).
            subscribed = set(map(sys.intern, req.resource_names_subscribe))
            if WILDCARD_NAME in subscribed:
                t.wildcard = True
                subscribed.discard(WILDCARD_NAME)
            t.names |= subscribed
            t.owed |= subscribed  # a (re)subscription wants the resource even if it held it once
        unsubscribed = set(req.resource_names_unsubscribe)
        if WILDCARD_NAME in unsubscribed:
            t.wildcard = False
            unsubscribed.discard(WILDCARD_NAME)
        for name in unsubscribed:
            t.absent.discard(name)
            _own(t).pop(name, None)
            t.owed.discard(name)
        if req.resource_names_subscribe or req.resource_names_unsubscribe:
            # One new set per request, not per name: the set may be a snapshot's, shared and frozen.
            t.names = shared_names(t.names - unsubscribed, self._source(req.type_url))
        if t.held and first:
            t.owed -= set(t.held)  # reconnecting: what it holds at our version is not owed
        # A first request must be answered, even with nothing, to end a new Envoy's wait; one that
        # reconnects holding resources is not waiting and is sent only what differs.
        response = self._respond(req.type_url, always=first and not req.initial_resource_versions)
        if response is None and first:
            # It already holds the current version: in sync without a word (what /debug shows).
            t.version = t.acked_version = str(next(self._versions))
            t.last_ack = self._clock()
            kind = "resumed"
        return DeltaOutcome([response] if response else [], kind, nack)

    def on_change(self) -> list[Reply]:
        """Responses for whatever changed, in push order: additions and changes, then removals."""
        out, plans = [], []
        for type_url in PUSH_ORDER:
            t = self.types.get(type_url)
            if t is None or not t.requested:
                continue
            # In order: clusters sent make their endpoints owed before those are planned.
            plan = self._plan(type_url, self._source(type_url))
            if plan.changed:
                out.append(self._emit(type_url, plan._replace(removed=[])))
            plans.append((t, type_url, plan))
        for t, type_url, plan in plans:
            if plan.removed or (plan.resync and not plan.changed):
                out.append(self._emit(type_url, plan._replace(changed=[])))
            self._sending(t, plan)
        return out

    def _ack(self, t: DeltaTypeState) -> None:
        if t.syncing is None or not _share(t, t.syncing):
            held = _own(t)
            for name, version in t.pending.items():
                if version is None:
                    held.pop(name, None)
                else:
                    held[name] = version
        t.pending = {}
        t.acked_version = t.version
        t.last_ack = self._clock()
        t.base = t.syncing

    def _wanted(self, t: DeltaTypeState, available: Resources) -> AbstractSet[str]:
        return set(available) if t.wildcard else t.names & set(available)

    def _sending(self, t: DeltaTypeState, plan: _Plan) -> None:
        """After `plan` is worked through: the snapshot the proxy holds exactly once it ACKs what is in
        flight, or, with nothing in flight, holds now."""
        if t.acked_version == t.version:
            t.base = plan.in_sync
            if plan.in_sync is not None:
                _share(t, plan.in_sync)  # say a proxy that reconnected holding all of it
        else:
            t.syncing = plan.in_sync

    def _respond(self, type_url: str, *, always: bool = False) -> Reply | None:
        plan = self._plan(type_url, self._source(type_url))
        reply = self._emit(type_url, plan) if plan.changed or plan.removed or always or plan.resync else None
        self._sending(self.types[type_url], plan)
        return reply

    def _plan(self, type_url: str, available: Resources) -> _Plan:
        """What to send `type_url`'s proxy for it to hold `available`; records removed names as reported."""
        t = self.types[type_url]
        base = t.base
        settled = not (t.pending or t.owed or t.rejected)
        if base is not None and isinstance(available, Snapshot) and settled:
            # The proxy holds `base` exactly: send what changed since, in O(changes).
            if available is base:
                return _Plan([], [], False, available)
            new, gone = available.diff(base)
            removed = [n for n in gone if t.wildcard or n in t.names]
            t.absent.update(n for n in removed if n in t.names)
            changed = [available[n] for n in new if t.wildcard or n in t.names]
            return _Plan(changed, removed, False, available)
        if settled and isinstance(available, Snapshot) and _holds_exactly(t, available):
            # Say a proxy that reconnected holding all of it: compared in bulk, nothing to send.
            resync = t.last_nack is not None and t.acked_version != t.version
            return _Plan([], [], resync, available)
        # What the proxy will hold once it ACKs the response in flight.
        holding = {**t.held, **{n: v for n, v in t.pending.items() if v is not None}}
        for n in (n for n, v in t.pending.items() if v is None):
            holding.pop(n, None)
        wanted = self._wanted(t, available)
        changed = [
            available[n]
            for n in sorted(wanted)
            if (holding.get(n) != available[n].version or n in t.owed) and t.rejected.get(n) != available[n].version
        ]
        removed = sorted(n for n in holding if n not in available or not (t.wildcard or n in t.names))
        removed += sorted(t.names - set(available) - set(holding) - t.absent)
        # A subscribed name reported removed is not reported again while it stays missing.
        t.absent.update(n for n in removed if n in t.names)
        # Rejected versions that are gone or replaced no longer hold anything back; once none is
        # left after a NACK, an empty response brings the proxy's ACKed version level again.
        for n in [n for n, v in t.rejected.items() if n not in available or available[n].version != v]:
            del t.rejected[n]
        resync = not t.rejected and not t.pending and t.last_nack is not None and t.acked_version != t.version
        # Once this is ACKed, the proxy holds every wanted name at its version and nothing else: unless
        # something stays owed or rejected, it then holds `available` exactly (later pushes take the diff).
        exact = not t.rejected and not (t.owed - {r.name for r in changed})
        return _Plan(changed, removed, resync, available if exact and isinstance(available, Snapshot) else None)

    def _emit(self, type_url: str, plan: _Plan) -> Reply:
        """The response for `plan`, recorded as sent: it is pending until the proxy ACKs it."""
        t = self.types[type_url]
        changed, removed = plan.changed, plan.removed
        t.owed -= {r.name for r in changed}
        t.pending = {**t.pending, **{r.name: r.version for r in changed}, **dict.fromkeys(removed)}
        t.nonce = str(next(self._nonces))
        t.version = str(next(self._versions))
        available = plan.in_sync
        whole = available is not None and len(changed) == len(available) and not removed
        if type_url == CLUSTER and ENDPOINT in self.types:
            eds = self.types[ENDPOINT]
            # Every cluster of a snapshot is read once for all the streams that are sent them all.
            shared = available if whole else None
            eds.owed |= shared.memo("eds", lambda: _eds_names(changed)) if shared is not None else _eds_names(changed)
            if eds.owed:
                eds.base = eds.syncing = None

        def body() -> bytes:
            return delta_body(type_url, changed, removed)

        if available is None or not (whole or len(changed) + len(removed) <= SHARED_DIFF):
            encoded = body()
        elif whole:
            encoded = available.memo(("delta-all", type_url), body)
        else:
            key = ("delta", type_url, tuple((r.name, r.version) for r in changed), tuple(removed))
            encoded = available.memo(key, body)
        return Reply(type_url, t.version, t.nonce, len(changed), encoded, delta=True)

    def last_sent(self, type_url: str) -> Resources:
        """The resources of `type_url` the proxy holds at their current version (for debugging)."""
        t = self.types.get(type_url)
        if t is None:
            return {}
        available = self._source(type_url)
        return {n: available[n] for n in sorted(t.held) if n in available and available[n].version == t.held[n]}


def _holds_exactly(t: DeltaTypeState, available: Snapshot) -> bool:
    """The proxy holds every resource of `available` at its version and nothing else, wants all of it, and
    every subscribed name that does not exist was reported removed."""
    if t.held != available.versions():
        return False
    return (t.wildcard or t.names.issuperset(available)) and not (t.names - available.keys() - t.absent)


def _share(t: DeltaTypeState, synced: Snapshot) -> bool:
    """If the proxy holds all of `synced` (exactly, as the caller knows), hold its map instead of a copy:
    thousands of streams hold the same one. False when it holds only part of it."""
    if t.held_shared and t.held is synced.versions():
        return True
    if not (t.wildcard or _same_names(t, synced) or t.names.issuperset(synced)):
        return False
    t.held, t.held_shared = synced.versions(), True
    return True


def _same_names(t: DeltaTypeState, synced: Snapshot) -> bool:
    """The proxy holds all of its base, which has the same names as `synced`: it wants all of `synced`
    too, known without comparing every name (an ACK after one endpoint changed)."""
    base = t.base
    return (
        base is not None
        and t.held_shared
        and t.held is base.versions()
        and len(synced) == len(base)
        and not synced.diff(base)[1]
    )


def _own(t: DeltaTypeState) -> dict[str, str]:
    """`t.held`, made the stream's own before it is changed."""
    if t.held_shared:
        t.held, t.held_shared = dict(t.held), False
    return t.held


class _Plan(NamedTuple):
    changed: list[Resource]
    removed: list[str]
    resync: bool
    """Send even if empty: it brings the proxy's ACKed version level after a NACK."""
    in_sync: Snapshot | None
    """The snapshot the proxy will hold exactly once it ACKs this, if any."""


def _eds_names(clusters: list[Resource]) -> set[str]:
    out = set()
    for r in clusters:
        c = cluster_pb2.Cluster()
        r.packed.Unpack(c)
        if c.type == cluster_pb2.Cluster.EDS:
            out.add(c.eds_cluster_config.service_name or c.name)
    return out
