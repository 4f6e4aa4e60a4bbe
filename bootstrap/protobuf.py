"""Protobuf basics shared by the sidecar bootstrap and the xDS generators: Any packing, durations,
socket addresses. The lowest layer: imports nothing of Meshplane's."""

from __future__ import annotations

import datetime as dt

from envoy.config.core.v3 import address_pb2
from google.protobuf import any_pb2, duration_pb2, message

__all__ = ["pack", "seconds", "socket_address"]

TYPE_URL_PREFIX = "type.googleapis.com/"


def pack(msg: message.Message) -> any_pb2.Any:
    # What Any.Pack does, in one constructor call: 2.5x cheaper, and a full config packs thousands.
    return any_pb2.Any(type_url=TYPE_URL_PREFIX + msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(dt.timedelta(seconds=value))
    return d


def socket_address(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))
