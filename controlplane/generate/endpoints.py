"""EDS: one ClusterLoadAssignment per outbound cluster, empty when nothing is selected."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec
from envoy.config.endpoint.v3 import endpoint_pb2

from meshplane.bootstrap.protobuf import socket_address

from ..model import MeshModel, MtlsMode, Port, Service
from .common import (
    TLS_MODE_ISTIO,
    TLS_MODE_KEY,
    TRANSPORT_SOCKET_MATCH,
    outbound_cluster_name,
    struct,
)


def assignment(model: MeshModel, service: Service, port: Port) -> endpoint_pb2.ClusterLoadAssignment:
    lb_endpoints = []
    for e in model.service_endpoints(service):
        workload = e.workload
        address = socket_address(workload.address, dict(e.ports).get(port.name, port.workload_port))
        endpoint = ec.LbEndpoint(endpoint=ec.Endpoint(address=address))
        if workload.draining:
            endpoint.health_status = health_check_pb2.DRAINING
        if workload.sidecar and model.mtls_of(workload) is not MtlsMode.DISABLE:
            endpoint.metadata.CopyFrom(
                base_pb2.Metadata(filter_metadata={TRANSPORT_SOCKET_MATCH: struct({TLS_MODE_KEY: TLS_MODE_ISTIO})})
            )
        lb_endpoints.append(endpoint)
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=outbound_cluster_name(port, service, model.domain_suffix))
    if lb_endpoints:
        cla.endpoints.append(ec.LocalityLbEndpoints(lb_endpoints=lb_endpoints))
    return cla
