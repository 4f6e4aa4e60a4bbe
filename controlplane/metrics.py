"""The control plane's Prometheus metrics, in a registry of their own (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from meshplane.webhook.app import WebhookMetrics


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connected = Gauge("meshplane_xds_connected_proxies", "Proxies with an open xDS stream", registry=r)
        self.behind = Gauge(
            "meshplane_xds_unacked_streams",
            "Open streams whose proxy has not yet ACKed the latest response of every type (NACKed ones included)",
            registry=r,
        )
        self.pushes = Counter("meshplane_xds_pushes", "xDS responses sent", ["type"], registry=r)
        self.resources_sent = Counter(
            "meshplane_xds_resources_sent",
            "Resources carried by xDS responses (delta sends only changes)",
            ["type"],
            registry=r,
        )
        self.push_rounds = Counter(
            "meshplane_xds_push_rounds", "Pushes of a new model or new certificates to every stream", registry=r
        )
        self.push_seconds = Histogram(
            "meshplane_xds_push_latency_seconds",
            "From a change reaching the server to the response being sent",
            ["type"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.acks = Counter("meshplane_xds_acks", "Responses acknowledged by proxies", ["type"], registry=r)
        self.nacks = Counter("meshplane_xds_nacks", "Responses rejected by proxies", ["type"], registry=r)
        self.auth_failures = Counter(
            "meshplane_xds_auth_failures", "Calls refused: no or bad credential, or beyond it", ["reason"], registry=r
        )
        self.streams_ended = Counter(
            "meshplane_xds_streams_ended",
            "Streams that ended after the proxy was identified: closed (by either side) or cancelled (the proxy "
            "went away, or gRPC cancelled the call)",
            ["how"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "meshplane_event_loop_lag_seconds",
            "How late the event loop ran a timer; new streams wait in gRPC's queue meanwhile",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
        )
        self.stale = Counter("meshplane_xds_stale_requests", "Requests with an outdated nonce, ignored", registry=r)
        self.reloads = Counter("meshplane_mesh_reloads", "Mesh file reloads", ["result"], registry=r)
        self.views = Gauge("meshplane_config_views", "Distinct proxy views generated for the current model", registry=r)
        self.webhook = WebhookMetrics(r)
        self.certificates = Counter("meshplane_ca_certificates_issued", "Certificates signed for CSRs", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
