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
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2

from .resources import CLUSTER, ENDPOINT, PUSH_ORDER, WILDCARD, Resource, Resources
from .stream import Nack, Source

WILDCARD_NAME = "*"


@dataclass(slots=True)
class DeltaTypeState:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    held: dict[str, str] = field(default_factory=dict)
    """name -> version the proxy holds."""
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

    @property
    def sent(self) -> dict[str, str]:
        """What the proxy holds (the name the state-of-the-world state uses, for /debug)."""
        return self.held


@dataclass(frozen=True, slots=True)
class DeltaOutcome:
    responses: list[discovery_pb2.DeltaDiscoveryResponse]
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
            else:
                self._ack(t)
                kind = "ack"
        first = not t.requested
        if first:
            t.requested = True
            t.held = dict(req.initial_resource_versions)
            if req.type_url in WILDCARD and not req.resource_names_subscribe:
                t.wildcard = True  # the legacy wildcard: a first request that names nothing
        for name in req.resource_names_subscribe:
            if name == WILDCARD_NAME:
                t.wildcard = True
            else:
                name = sys.intern(name)  # shared by every stream naming it (see stream.StreamState)
                t.names.add(name)
                t.owed.add(name)  # a (re)subscription wants the resource even if it held it once
        for name in req.resource_names_unsubscribe:
            if name == WILDCARD_NAME:
                t.wildcard = False
            else:
                t.names.discard(name)
                t.absent.discard(name)
                t.held.pop(name, None)
                t.owed.discard(name)
        if t.held and first:
            t.owed -= set(t.held)  # reconnecting: what it holds at our version is not owed
        # A first request must be answered, even with nothing, to end a new Envoy's wait; one that
        # reconnects holding resources is not waiting and is sent only what differs.
        response = self._respond(req.type_url, removals=True, always=first and not req.initial_resource_versions)
        if response is None and first:
            # It already holds the current version: in sync without a word (what /debug shows).
            t.version = t.acked_version = str(next(self._versions))
            t.last_ack = self._clock()
            kind = "resumed"
        return DeltaOutcome([response] if response else [], kind, nack)

    def on_change(self) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        """Responses for whatever changed, in push order: additions and changes, then removals."""
        out = []
        for removals in (False, True):
            for type_url in PUSH_ORDER:
                t = self.types.get(type_url)
                if t is None or not t.requested:
                    continue
                response = self._respond(type_url, removals=removals)
                if response:
                    out.append(response)
        return out

    def _ack(self, t: DeltaTypeState) -> None:
        for name, version in t.pending.items():
            if version is None:
                t.held.pop(name, None)
            else:
                t.held[name] = version
        t.pending = {}
        t.acked_version = t.version
        t.last_ack = self._clock()

    def _wanted(self, t: DeltaTypeState, available: Resources) -> set[str]:
        return set(available) if t.wildcard else t.names & set(available)

    def _respond(
        self, type_url: str, *, removals: bool, always: bool = False
    ) -> discovery_pb2.DeltaDiscoveryResponse | None:
        t = self.types[type_url]
        available = self._source(type_url)
        # What the proxy will hold once it ACKs the response in flight.
        holding = {**t.held, **{n: v for n, v in t.pending.items() if v is not None}}
        for n in (n for n, v in t.pending.items() if v is None):
            holding.pop(n, None)
        changed = [
            available[n]
            for n in sorted(self._wanted(t, available))
            if (holding.get(n) != available[n].version or n in t.owed) and t.rejected.get(n) != available[n].version
        ]
        removed: list[str] = []
        if removals:
            removed = sorted(n for n in holding if n not in available or not (t.wildcard or n in t.names))
            missing = sorted(t.names - set(available) - set(holding) - t.absent)
            removed += missing
            t.absent.update(missing)
        # Rejected versions that are gone or replaced no longer hold anything back; once none is
        # left after a NACK, an empty response brings the proxy's ACKed version level again.
        for n in [n for n, v in t.rejected.items() if n not in available or available[n].version != v]:
            del t.rejected[n]
        resync = (
            removals and not t.rejected and not t.pending and t.last_nack is not None and t.acked_version != t.version
        )
        if not (changed or removed or always or resync):
            return None
        t.owed -= {r.name for r in changed}
        t.pending = {**t.pending, **{r.name: r.version for r in changed}, **dict.fromkeys(removed)}
        t.nonce = str(next(self._nonces))
        t.version = str(next(self._versions))
        if type_url == CLUSTER and ENDPOINT in self.types:
            self.types[ENDPOINT].owed |= _eds_names(changed)
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=t.version,
            type_url=type_url,
            nonce=t.nonce,
            resources=[discovery_pb2.Resource(name=r.name, version=r.version, resource=r.packed) for r in changed],
            removed_resources=removed,
        )

    def last_sent(self, type_url: str) -> Resources:
        """The resources of `type_url` the proxy holds at their current version (for debugging)."""
        t = self.types.get(type_url)
        if t is None:
            return {}
        available = self._source(type_url)
        return {n: available[n] for n in sorted(t.held) if n in available and available[n].version == t.held[n]}


def _eds_names(clusters: list[Resource]) -> set[str]:
    out = set()
    for r in clusters:
        c = cluster_pb2.Cluster()
        r.packed.Unpack(c)
        if c.type == cluster_pb2.Cluster.EDS:
            out.add(c.eds_cluster_config.service_name or c.name)
    return out
