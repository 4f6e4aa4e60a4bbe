"""Envoy bootstrap for a sidecar, and the traffic-capture rules its init step applies."""

from .envoy import BootstrapError, Ports, WorkloadIdentity, bootstrap, render

__all__ = ["BootstrapError", "Ports", "WorkloadIdentity", "bootstrap", "render"]
