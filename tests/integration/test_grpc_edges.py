"""The gRPC surface with a real gRPC client: bad nodes, per-type services, the CA service, abrupt disconnects."""

import asyncio
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2

from meshplane.controlplane.app import ControlPlane
from meshplane.controlplane.resources import CLUSTER, LISTENER, SECRET
from meshplane.protos import ca_pb2, ca_pb2_grpc
from tests.harness import wait_until

from .conftest import xds_channel


def node(name: str = "web-1", sa: str = "web", labels: dict[str, str] | None = None) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update(
        {"NAMESPACE": "demo", "NAME": name, "SERVICE_ACCOUNT": sa, "INSTANCE_IPS": "10.0.0.42", "LABELS": labels or {}}
    )
    return base_pb2.Node(id=f"sidecar~10.0.0.42~{name}.demo~demo.svc.cluster.local", metadata=meta)


class Client:
    """A hand-driven ADS client: send requests, read responses with a deadline."""

    def __init__(self, channel: grpc.aio.Channel, stub: Any = None) -> None:
        self.queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        stub = stub or ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources
        self.call = stub(self._requests())

    async def _requests(self) -> Any:
        while (item := await self.queue.get()) is not None:
            yield item

    def send(self, **fields: Any) -> None:
        self.queue.put_nowait(discovery_pb2.DiscoveryRequest(**fields))

    async def recv(self) -> discovery_pb2.DiscoveryResponse:
        return await asyncio.wait_for(self.call.read(), 5)


async def test_stream_without_identity_is_rejected_clearly(plane: ControlPlane) -> None:
    async with xds_channel(plane) as channel:
        client = Client(channel)
        client.send(type_url=CLUSTER, node=base_pb2.Node(id="just-an-id"))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.recv()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no namespace or name" in str(e.value.details())


async def test_a_proxy_only_ever_gets_its_own_identity(plane: ControlPlane) -> None:
    async with xds_channel(plane) as channel:
        client = Client(channel)
        # Asking for other names gets nothing: there is no way to name another identity's secret.
        client.send(
            type_url=SECRET,
            node=node(),
            resource_names=["default", "ROOTCA", "spiffe://cluster.local/ns/demo/sa/backend", "backend"],
        )
        resp = await client.recv()
        names = []
        for packed in resp.resources:
            secret = secret_pb2.Secret()
            packed.Unpack(secret)
            names.append(secret.name)
            if secret.name == "default":
                cert = x509.load_pem_x509_certificate(secret.tls_certificate.certificate_chain.inline_bytes)
                uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [
                    "spiffe://cluster.local/ns/demo/sa/web"
                ]
        assert sorted(names) == ["ROOTCA", "default"]
        client.queue.put_nowait(None)


async def test_per_type_service_serves_its_type_only(plane: ControlPlane) -> None:
    async with xds_channel(plane) as channel:
        stub = cds_pb2_grpc.ClusterDiscoveryServiceStub(channel).StreamClusters
        client = Client(channel, stub)
        client.send(type_url=CLUSTER, node=node())
        resp = await client.recv()
        assert resp.type_url == CLUSTER and len(resp.resources) > 3
        client.send(type_url=LISTENER, response_nonce=resp.nonce)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.recv()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "serves CDS only" in str(e.value.details())


async def test_disconnect_mid_push_leaves_the_server_healthy(plane: ControlPlane, mesh_file: Any) -> None:
    for _ in range(5):
        channel = xds_channel(plane)
        client = Client(channel)
        client.send(type_url=CLUSTER, node=node(labels={"app": "backend"}))
        client.send(type_url=LISTENER)
        await client.recv()
        await channel.close()  # gone without a word, with responses in flight
    await wait_until(lambda: asyncio.sleep(0, result=not plane.xds.connections), what="streams to be cleaned up")
    async with xds_channel(plane) as channel:
        client = Client(channel)
        client.send(type_url=CLUSTER, node=node())
        assert (await client.recv()).resources


async def test_certificate_service_signs_a_csr(plane: ControlPlane) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    spiffe = "spiffe://cluster.local/ns/demo/sa/web"
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    async with xds_channel(plane) as channel:
        stub = ca_pb2_grpc.CertificateServiceStub(channel)
        resp = await stub.CreateCertificate(ca_pb2.CreateCertificateRequest(csr=csr, validity_seconds=600))
        leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
        leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(resp.cert_chain[1].encode()))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateCertificate(ca_pb2.CreateCertificateRequest(csr="junk"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "PKCS#10" in str(e.value.details())


async def test_health_and_readiness(plane: ControlPlane) -> None:
    import aiohttp

    async def status(path: str) -> int:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{plane.admin_port}{path}") as r:
            return r.status

    assert await status("/healthz") == 200 and await status("/readyz") == 200
    await plane.xds.stop(grace=0)  # shutting down: readiness goes first, liveness stays
    assert await status("/readyz") == 503 and await status("/healthz") == 200


async def test_bad_node_metadata_is_invalid_argument_naming_the_field(plane: ControlPlane) -> None:
    async with xds_channel(plane) as channel:
        client = Client(channel)
        client.send(type_url=SECRET, node=node(sa="a/b"), resource_names=["default"])
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.recv()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "SERVICE_ACCOUNT" in str(e.value.details())


async def test_a_new_stream_whose_first_request_carries_a_nonce_is_answered(plane: ControlPlane) -> None:
    """Other xDS clients, and Envoys after a control-plane restart, open with the last nonce they saw."""
    async with xds_channel(plane) as channel:
        client = Client(channel)
        client.send(type_url=CLUSTER, node=node(), response_nonce="17", version_info="from-another-server")
        resp = await client.recv()
        assert resp.type_url == CLUSTER and resp.resources
        client.send(type_url=LISTENER, response_nonce="3", version_info="older")
        assert (await client.recv()).type_url == LISTENER


async def test_a_certificate_nobody_asks_for_is_renewed_without_spinning(plane_factory: Any, mesh_file: Any) -> None:
    """A stream that never subscribes to SDS keeps its identity alive; renewal must still move on
    instead of pushing every 100 ms forever."""
    import datetime as dt

    plane = await plane_factory(cert_ttl=dt.timedelta(seconds=2))
    async with xds_channel(plane) as channel:
        sds = Client(channel)
        sds.send(type_url=SECRET, node=node("sds-1"), resource_names=["default"])
        await sds.recv()
        # Same identity (sa "web"), a second proxy subscribed to clusters only.
        cds = Client(channel)
        cds.send(type_url=CLUSTER, node=node("cds-only"))
        first = await cds.recv()
        cds.send(type_url=CLUSTER, response_nonce=first.nonce, version_info=first.version_info)

        async def acked() -> bool:
            return any(
                (t := c.state.types.get(CLUSTER)) is not None and t.acked_version == first.version_info
                for c in plane.xds.connections.values()
            )

        await wait_until(acked, what="the clusters ACK")
        sds.call.cancel()  # the only SDS subscriber leaves; the identity stays alive through cds-only
        before = _pushes(plane)
        await asyncio.sleep(3)  # past the 1 s renewal point of the certificate
        pushed = _pushes(plane) - before
        assert pushed <= 4, f"{pushed} pushes in 3 s: renewal is spinning"
        assert plane.ca.next_renewal() is None or plane.ca.next_renewal() > dt.datetime.now(dt.UTC)


def _pushes(plane: ControlPlane) -> float:
    return sum(
        s.value for metric in plane.metrics.pushes.collect() for s in metric.samples if s.name.endswith("_total")
    )


async def test_shutdown_turns_readiness_off_before_closing_streams(plane_factory: Any) -> None:
    import aiohttp

    plane = await plane_factory(shutdown_delay=1.0)
    async with xds_channel(plane) as channel:
        client = Client(channel)
        client.send(type_url=CLUSTER, node=node())
        await client.recv()
        stopping = asyncio.get_running_loop().create_task(plane.xds.stop(grace=0.5))

        async def not_ready() -> bool:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{plane.admin_port}/readyz") as r:
                return r.status == 503

        await wait_until(not_ready, timeout=2, interval=0.02, what="/readyz to turn 503")
        assert plane.xds.connections, "the stream was closed in the same instant readiness turned off"
        await asyncio.wait_for(stopping, 5)
        assert not plane.xds.connections


async def test_too_many_resource_names_in_one_request_is_invalid_argument(plane: ControlPlane) -> None:
    from meshplane.controlplane.resources import ENDPOINT
    from meshplane.controlplane.server import MAX_NAMES

    async with xds_channel(plane) as channel:
        client = Client(channel)
        client.send(type_url=ENDPOINT, node=node(), resource_names=[f"c{i}" for i in range(MAX_NAMES + 1)])
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.recv()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and str(MAX_NAMES) in str(e.value.details())


async def test_streams_per_proxy_are_bounded(plane: ControlPlane) -> None:
    from meshplane.controlplane.server import MAX_STREAMS_PER_PROXY

    async with xds_channel(plane) as channel:
        clients = []
        for _ in range(MAX_STREAMS_PER_PROXY):
            c = Client(channel)
            c.send(type_url=CLUSTER, node=node())
            await c.recv()
            clients.append(c)
        extra = Client(channel)
        extra.send(type_url=CLUSTER, node=node())
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await extra.recv()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        other = Client(channel)  # another proxy of the same identity is not affected
        other.send(type_url=CLUSTER, node=node("web-2"))
        assert (await other.recv()).resources
        clients.pop().call.cancel()  # one closed: room for one again
        for _ in range(50):
            if len(plane.xds.connections) == MAX_STREAMS_PER_PROXY:
                break
            await asyncio.sleep(0.05)
        again = Client(channel)
        again.send(type_url=CLUSTER, node=node())
        assert (await again.recv()).resources
        for c in [*clients, again, other]:
            c.call.cancel()


def many_services(count: int) -> str:
    lines = ["trustDomain: cluster.local", "services:"]
    lines += [f"  - {{name: svc-{i}, namespace: demo, ports: [{{port: 8080, name: http}}]}}" for i in range(count)]
    return "\n".join(lines) + "\n"


def cluster_names(resp: discovery_pb2.DiscoveryResponse) -> set[str]:
    out = set()
    for packed in resp.resources:
        c = cluster_pb2.Cluster()
        packed.Unpack(c)
        out.add(c.name)
    return out


async def test_a_sidecar_that_stops_reading_holds_no_one_back_and_gets_the_latest_after(
    plane_factory: Any, mesh_file: Any
) -> None:
    """300 services: a CDS response (about 160 KB) is more than a stream's 64 KiB flow-control window, so
    the server's write to a sidecar that reads nothing (BDP probing off: the window stays at its start)
    blocks. Edits meanwhile reach another sidecar; the stalled one, once it reads, gets one response
    with the latest clusters, not one per edit."""
    base, edits = 300, 6
    mesh_file.write_text(many_services(base))
    plane = await plane_factory()
    async with (
        xds_channel(plane, **{"grpc.http2.bdp_probe": 0}) as slow_channel,
        xds_channel(plane, sa="fast") as fast_channel,
    ):
        slow, fast = Client(slow_channel), Client(fast_channel)
        slow.send(type_url=CLUSTER, node=node("slow-1"))
        fast.send(type_url=CLUSTER, node=node("fast-1", sa="fast"))
        resp = await fast.recv()
        assert len(cluster_names(resp)) > base
        for edit in range(1, edits + 1):
            mesh_file.write_text(many_services(base + edit))
            want = f"outbound|8080||svc-{base + edit - 1}.demo.svc.cluster.local"
            while want not in cluster_names(resp):  # recv() fails the test if an edit takes over 5 s
                fast.send(type_url=CLUSTER, version_info=resp.version_info, response_nonce=resp.nonce)
                resp = await fast.recv()
        latest = cluster_names(resp)
        got = []
        while not got or cluster_names(got[-1]) != latest:
            got.append(await slow.recv())
            slow.send(type_url=CLUSTER, version_info=got[-1].version_info, response_nonce=got[-1].nonce)
        # The response in flight when it stalled (the first: its write was blocked all along), then the
        # latest: the edits between coalesced into one response, none queued per edit.
        assert len(cluster_names(got[0])) < len(latest) - edits + 1
        assert len(got) == 2, [len(cluster_names(r)) for r in got]
        slow.queue.put_nowait(None)
        fast.queue.put_nowait(None)
