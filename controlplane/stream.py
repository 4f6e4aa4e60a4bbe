"""One ADS stream's protocol state (state of the world). No I/O: requests in, responses out.

Per type URL it keeps the subscription, what was last sent (names and versions),
the nonce of that response, and the last ACK and NACK. The rules it follows:

- A request whose `response_nonce` is not the latest one sent for its type is stale
  and ignored entirely (the proxy has not yet seen our latest response). A request for a
  type this stream has sent nothing of is a new subscription, whatever nonce it carries.
- A request that answers the latest nonce is an ACK, or a NACK when it carries
  `error_detail`. A NACK is recorded and nothing is re-sent: the proxy keeps its last
  good config, and the next change that alters the resources is pushed as usual.
- The first request for a type on a stream is always answered (wildcard types even
  when empty, since Envoy waits for them during initialization), unless it already carries
  the version it would be sent: a proxy reconnecting to a restarted or another replica with
  the same config is sent nothing again.
- Otherwise a request is answered only when it changes the subscription and the resources to
  send differ from the last sent; changed content arrives through `on_change` (a push).
- After clusters are sent, endpoints are owed again even if unchanged: Envoy re-requests them
  for every cluster it re-created (same names, same nonce), and a cluster stays warming until
  it gets them. They are sent in answer to that request, not pushed ahead of it.
- On a push, a wildcard type that drops names the proxy has first gets the new set
  plus the dropped ones, and the exact set only after every other type (removals last),
  so nothing the proxy is about to stop using disappears under it.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from .replies import Reply, sotw_body
from .resources import CLUSTER, ENDPOINT, PUSH_ORDER, WILDCARD, Resources, Snapshot, content_version, shared_names

Source = Callable[[str], Resources]
"""type URL -> every resource of that type this proxy may receive."""


@dataclass(frozen=True, slots=True)
class Nack:
    version: str
    """The rejected version (what we sent)."""
    nonce: str
    message: str
    """Envoy's error_detail message."""
    at: float
    resources: tuple[str, ...] = ()
    """Names of the resources in the rejected response (Envoy's message says which of them failed)."""
    accepted_version: str = ""
    """The version the proxy still runs: its last accepted one, "" if it never accepted any."""


@dataclass(slots=True)
class TypeState:
    names: frozenset[str] = frozenset()
    requested: bool = False
    sent: dict[str, str] = field(default_factory=dict)
    """name -> resource version of the last response."""
    version: str = ""
    nonce: str = ""
    acked_version: str = ""
    last_ack: float | None = None
    last_nack: Nack | None = None
    resend: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request did: responses to send, and what to report about it."""

    responses: list[Reply]
    kind: str
    """"request" (first or subscription change), "ack", "nack", "stale", or "resumed" (a reconnecting
    proxy already holds the version it would be sent)."""
    nack: Nack | None = None


class StreamState:
    def __init__(self, source: Source, *, clock: Callable[[], float] = time.time) -> None:
        self._source = source
        self._clock = clock
        self._nonces = itertools.count(1)
        self.types: dict[str, TypeState] = {}
        self._sent: dict[str, Resources] = {}

    def on_request(self, req: discovery_pb2.DiscoveryRequest) -> Outcome:
        t = self.types.setdefault(req.type_url, TypeState())
        # A type this stream never answered is a new subscription whatever nonce it carries: a proxy
        # that reconnects (to this or another replica) opens with the last nonce it saw.
        if t.nonce and req.response_nonce and req.response_nonce != t.nonce:
            return Outcome([], "stale")
        kind, nack = "request", None
        if req.response_nonce and t.nonce:
            if req.HasField("error_detail"):
                nack = Nack(
                    t.version, t.nonce, req.error_detail.message, self._clock(), tuple(sorted(t.sent)), req.version_info
                )
                t.last_nack = nack
                kind = "nack"
            else:
                t.acked_version = req.version_info
                t.last_ack = self._clock()
                kind = "ack"
        # Interned: every request (ACKs too) repeats the names, and thousands of streams name the same
        # ones; each stream keeping its own copies cost about 200 KB per sidecar of a 1,000-service mesh.
        # The set itself is the snapshot's when it names all of it (`shared_names`).
        names = frozenset() if req.type_url in WILDCARD else frozenset(map(sys.intern, req.resource_names))
        first, changed = not t.requested, names != t.names
        t.requested = True
        if changed or first:
            t.names = shared_names(names, self._source(req.type_url))
        # Content changes reach the stream as pushes (on_change); a request needs an answer only
        # when it is the first, changes the subscription, or endpoints are owed after clusters.
        if not (first or changed or t.resend):
            return Outcome([], kind, nack)
        # A proxy that reconnects already holding exactly this version (say the control plane
        # restarted with the same config) is not sent it again.
        have = req.version_info if first and req.version_info else ""
        response = self._respond(req.type_url, always=first, have=have)
        if response is None and have and t.version == have:
            return Outcome([], "resumed", nack)
        return Outcome([response] if response else [], kind, nack)

    def on_change(self) -> list[Reply]:
        """Responses for whatever changed in the source, in push order, removals last."""
        out: list[Reply] = []
        deferred: list[str] = []
        for type_url in PUSH_ORDER:
            t = self.types.get(type_url)
            if t is None or not t.requested:
                continue
            keep = t.sent.keys() - self._source(type_url).keys() if type_url in WILDCARD else set()
            if keep:
                deferred.append(type_url)
            # Endpoints owed after clusters (`resend`) wait for Envoy's own EDS request, which follows
            # every CDS update: sent now, they would make that request's nonce stale and cost a round trip.
            response = self._respond(type_url, keep=keep, owed=False)
            if response:
                out.append(response)
        for type_url in deferred:
            response = self._respond(type_url)
            if response:
                out.append(response)
        return out

    def _respond(
        self,
        type_url: str,
        *,
        always: bool = False,
        keep: set[str] | None = None,
        have: str = "",
        owed: bool = True,
    ) -> Reply | None:
        t = self.types[type_url]
        available = self._source(type_url)
        chosen: Resources
        if type_url in WILDCARD:
            # The cache's own snapshot unless names being dropped are added.
            chosen = dict(available) if keep else available
            for name in keep or ():
                # Still being dropped: resend it as the proxy last got it (same version).
                chosen.setdefault(name, self._sent[type_url][name])
        elif t.names.issuperset(available):
            chosen = available  # subscribed to all of it (Envoy's EDS, for every cluster it has)
        else:
            chosen = {n: available[n] for n in sorted(t.names) if n in available}
        # A whole snapshot is what many streams send: its versions, version and body are worked out once.
        shared = available if chosen is available and isinstance(available, Snapshot) else None
        versions = shared.versions() if shared is not None else {n: r.version for n, r in chosen.items()}
        if not (always or (owed and t.resend)) and (versions is t.sent or versions == t.sent):
            return None
        if not chosen and type_url not in WILDCARD and not t.sent:
            return None
        version = shared.version() if shared is not None else content_version(frozenset(versions.items()))
        if have and version == have:
            t.sent, t.version, t.acked_version, t.last_ack = versions, version, version, self._clock()
            self._sent[type_url] = chosen
            return None
        t.resend = False
        t.sent = versions
        t.version = version
        t.nonce = str(next(self._nonces))
        self._sent[type_url] = chosen
        if type_url == CLUSTER and ENDPOINT in self.types:
            self.types[ENDPOINT].resend = True

        def body() -> bytes:
            return sotw_body(type_url, version, [r for _, r in sorted(chosen.items())])

        encoded = shared.memo(("sotw", type_url), body) if shared is not None else body()
        return Reply(type_url, version, t.nonce, len(chosen), encoded)

    def last_sent(self, type_url: str) -> Resources:
        """The resources of the latest response of `type_url` (for debugging)."""
        return self._sent.get(type_url, {})
