"""EDS: one ClusterLoadAssignment per outbound cluster, empty when nothing is selected."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from ..model import MeshModel, MtlsMode, Port, Service
from .common import (
    TLS_MODE_ISTIO,
    TLS_MODE_KEY,
    TRANSPORT_SOCKET_MATCH,
    outbound_cluster_name,
    struct,
)


def assignment(model: MeshModel, service: Service, port: Port) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=outbound_cluster_name(port, service, model.domain_suffix))
    found = model.service_endpoints(service)
    if not found:
        return cla
    locality = cla.endpoints.add()
    for e in found:
        workload = e.workload
        # Built in place with add(): constructing each endpoint as nested messages cost 5x more.
        endpoint = locality.lb_endpoints.add()
        address = endpoint.endpoint.address.socket_address
        address.address = workload.address
        address.port_value = dict(e.ports).get(port.name, port.workload_port) if e.ports else port.workload_port
        if workload.draining:
            endpoint.health_status = health_check_pb2.DRAINING
        if workload.sidecar and model.mtls_of(workload) is not MtlsMode.DISABLE:
            endpoint.metadata.CopyFrom(_TLS_MODE_ISTIO)
    return cla


_TLS_MODE_ISTIO = base_pb2.Metadata(filter_metadata={TRANSPORT_SOCKET_MATCH: struct({TLS_MODE_KEY: TLS_MODE_ISTIO})})
"""The endpoint metadata that selects the mTLS transport socket; never modified (copied)."""
