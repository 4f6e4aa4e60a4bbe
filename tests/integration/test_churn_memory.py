"""Pod churn against a running control plane: memory stays flat.

Each round a new proxy (new name, new service account, an endpoint of one of 400 services)
connects over a real gRPC stream, subscribes to CDS, EDS and SDS as Envoy does, ACKs, and
leaves. Every round changes the model, the endpoint sets and the identities in use, which is
what made the version memo and the packed secrets grow without bound.
"""

import asyncio
import gc
import os
from pathlib import Path
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2

from meshplane.controlplane.app import ControlPlane
from meshplane.controlplane.resources import CLUSTER, ENDPOINT, SECRET
from tests.harness import wait_until

from .conftest import call_token, xds_channel

SERVICES = 400
WARMUP, ROUNDS = 70, 200


def mesh() -> str:
    lines = ["trustDomain: cluster.local", "services:"]
    for i in range(SERVICES):
        lines.append(
            f"  - {{name: svc-{i}, namespace: churn, ports: [{{port: 8080, name: http}}], selector: {{app: a{i}}}}}"
        )
    return "\n".join(lines) + "\n"


def node(i: int) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update(
        {
            "NAMESPACE": "churn",
            "NAME": f"pod-{i}",
            "SERVICE_ACCOUNT": f"sa-{i}",
            "INSTANCE_IPS": f"10.1.{i // 250}.{i % 250 + 1}",
            "LABELS": {"app": f"a{i % SERVICES}"},
        }
    )
    return base_pb2.Node(id=f"sidecar~10.1.0.1~pod-{i}.churn~churn.svc.cluster.local", metadata=meta)


async def one_proxy(plane: ControlPlane, stub: Any, i: int) -> None:
    """Connect, subscribe like Envoy (CDS, then EDS for its clusters, SDS), ACK everything, leave."""
    queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

    async def requests() -> Any:
        while (item := await queue.get()) is not None:
            yield item

    call = stub.StreamAggregatedResources(requests(), credentials=call_token(plane, "churn", f"sa-{i}"))
    queue.put_nowait(discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=node(i)))
    cds = await asyncio.wait_for(call.read(), 5)
    names = []
    for packed in cds.resources:
        c = cluster_pb2.Cluster()
        packed.Unpack(c)
        if c.type == cluster_pb2.Cluster.EDS:
            names.append(c.name)
    queue.put_nowait(
        discovery_pb2.DiscoveryRequest(type_url=CLUSTER, version_info=cds.version_info, response_nonce=cds.nonce)
    )
    queue.put_nowait(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names))
    queue.put_nowait(discovery_pb2.DiscoveryRequest(type_url=SECRET, resource_names=["default", "ROOTCA"]))
    for _ in range(2):
        resp = await asyncio.wait_for(call.read(), 5)
        subscribed = names if resp.type_url == ENDPOINT else ["default", "ROOTCA"]
        queue.put_nowait(
            discovery_pb2.DiscoveryRequest(
                type_url=resp.type_url,
                resource_names=subscribed,
                version_info=resp.version_info,
                response_nonce=resp.nonce,
            )
        )
    queue.put_nowait(None)
    call.cancel()


async def gone(plane: ControlPlane) -> None:
    """The proxy's grace period has ended: it is no longer registered (the model changed again)."""

    async def unregistered() -> bool:
        return not plane.xds.connections and not plane.registry.registrations()

    await wait_until(unregistered, timeout=5, interval=0.005, what="the proxy to be unregistered")


def rss() -> int:
    gc.collect()
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_memory_stays_flat_under_pod_churn(plane_factory: Any, mesh_file: Path) -> None:
    mesh_file.write_text(mesh())
    plane: ControlPlane = await plane_factory(proxy_grace=0.01, debounce=0.005, debounce_max=0.02)
    async with xds_channel(plane, namespace=None) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        for i in range(WARMUP):
            await one_proxy(plane, stub, i)
            await gone(plane)
        after_warmup = rss()
        for i in range(WARMUP, ROUNDS):
            await one_proxy(plane, stub, i)
            await gone(plane)
        at_end = rss()
    growth = (at_end - after_warmup) / 2**20
    print(
        f"resident memory after {WARMUP} rounds {after_warmup / 2**20:.1f} MiB, after {ROUNDS} {at_end / 2**20:.1f} MiB"
    )
    assert growth < 10, f"memory grew {growth:.1f} MiB over {ROUNDS - WARMUP} rounds of churn"
