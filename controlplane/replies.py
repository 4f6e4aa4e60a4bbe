"""xDS responses as bytes, their shared part encoded once. No I/O.

A push sends the same resources to every stream of a view; only the nonce (and, in delta, the
stream's version counter) is the stream's own. So a response is its shared body, serialized once
and kept on the snapshot it came from (see `resources.Snapshot`), plus those one or two fields
appended per stream: protobuf reads concatenated encodings as one message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from envoy.service.discovery.v3 import discovery_pb2

from .resources import Resource

_VERSION_FIELD = 1
"""`version_info` (DiscoveryResponse) and `system_version_info` (DeltaDiscoveryResponse)."""
_NONCE_FIELD = 5
"""`nonce`, in both."""


@dataclass(frozen=True)
class Reply:
    """One response on one stream: what the server logs and counts, and its bytes for gRPC."""

    type_url: str
    version: str
    nonce: str
    count: int
    """Resources it carries."""
    body: bytes
    """The encoded response without the stream's own fields (shared between streams)."""
    delta: bool = False

    def encode(self) -> bytes:
        """The serialized DiscoveryResponse or DeltaDiscoveryResponse (gRPC's response serializer)."""
        own = _field(_NONCE_FIELD, self.nonce)
        return self.body + (_field(_VERSION_FIELD, self.version) + own if self.delta else own)

    @cached_property
    def message(self) -> discovery_pb2.DiscoveryResponse | discovery_pb2.DeltaDiscoveryResponse:
        """The response as the proxy reads it (for tests and debugging; the server sends `encode()`)."""
        cls = discovery_pb2.DeltaDiscoveryResponse if self.delta else discovery_pb2.DiscoveryResponse
        return cls.FromString(self.encode())

    # The fields of the message, read as on the message itself.
    @property
    def version_info(self) -> str:
        return self.version

    @property
    def system_version_info(self) -> str:
        return self.version

    @property
    def resources(self) -> object:
        return self.message.resources

    @property
    def removed_resources(self) -> list[str]:
        message = self.message
        return list(message.removed_resources) if isinstance(message, discovery_pb2.DeltaDiscoveryResponse) else []


def sotw_body(type_url: str, version: str, resources: Iterable[Resource]) -> bytes:
    """A DiscoveryResponse without its nonce; `resources` in the order given."""
    response = discovery_pb2.DiscoveryResponse(
        version_info=version, type_url=type_url, resources=[r.packed for r in resources]
    )
    return bytes(response.SerializeToString())


def delta_body(type_url: str, changed: Iterable[Resource], removed: Iterable[str]) -> bytes:
    """A DeltaDiscoveryResponse without its version and nonce."""
    response = discovery_pb2.DeltaDiscoveryResponse(
        type_url=type_url,
        resources=[discovery_pb2.Resource(name=r.name, version=r.version, resource=r.packed) for r in changed],
        removed_resources=removed,
    )
    return bytes(response.SerializeToString())


def _field(number: int, value: str) -> bytes:
    """A length-delimited string field; empty strings are left out, as protobuf does."""
    if not value:
        return b""
    data = value.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
