"""Versioned resources, packed and serialized once per distinct proxy view. No I/O.

The cache knows nothing of gRPC: streams ask it for a view's resources and compare
versions with what they last sent. A new model drops every memo at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable
from typing import Protocol

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import message

from meshplane.bootstrap.protobuf import pack

from .ca import IssuedCertificate
from .generate import SECRET_DEFAULT, SECRET_ROOTCA, MeshConfig, ProxyView, view_of
from .generate.secrets import root_secret, workload_secret
from .model import InterceptionMode, MeshModel, Workload, spiffe_id
from .resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, Resource, Resources, Snapshot

ViewRequest = tuple[Workload, InterceptionMode, bool, bool]
"""What a view is asked for with: a proxy's workload, interception mode, DNS capture and gateway-ness."""


class CertificateSource(Protocol):
    @property
    def trust_bundle_pem(self) -> bytes: ...

    def workload_certificate(self, spiffe_id: str) -> IssuedCertificate: ...


class InconsistentSnapshot(RuntimeError):
    """Generated config references something it does not contain: a generator bug."""


def resource(msg: message.Message) -> Resource:
    packed = pack(msg)
    version = hashlib.blake2b(packed.value, digest_size=8).hexdigest()
    return Resource(getattr(msg, "name", "") or getattr(msg, "cluster_name", ""), version, packed)


class ConfigCache:
    """Per model: `MeshConfig`; per view: a snapshot of packed resources; per message: one packing."""

    def __init__(
        self,
        model: MeshModel,
        ca: CertificateSource,
        config: Callable[[MeshModel, MeshConfig | None], MeshConfig] = MeshConfig,
        *,
        previous: ConfigCache | None = None,
    ) -> None:
        """With `previous`, start from its config and packings (see `update`) without changing it."""
        self._config_factory = config
        self._ca = ca
        self._root: tuple[bytes, Resource] | None = None
        self._secrets: dict[str, tuple[bytes, bytes, Snapshot]] = {}
        """identity -> (its certificate, the trust bundle, both secrets)"""
        if previous is None:
            self._start(model, None, {})
        else:
            self._start(model, previous._config, previous._packed)

    @property
    def model(self) -> MeshModel:
        return self._model

    def update(self, model: MeshModel) -> None:
        self._start(model, self._config, self._packed)

    def _start(
        self, model: MeshModel, config: MeshConfig | None, packed: dict[int, tuple[message.Message, Resource]]
    ) -> None:
        # The new config reuses the messages of the last one whose inputs did not change, and their
        # packings are carried over with them: one generation back, so nothing older is kept alive.
        self._model = model
        self._config = self._config_factory(model, config)
        self._views: dict[ProxyView, dict[str, Snapshot]] = {}
        self._view_of: dict[tuple[Workload, InterceptionMode, bool, bool], ProxyView] = {}
        self._packed_before = packed
        self._packed: dict[int, tuple[message.Message, Resource]] = {}
        self._snapshots: dict[int, tuple[list[message.Message], Snapshot]] = {}

    def staged(self, model: MeshModel, wanted: Iterable[ViewRequest]) -> ConfigCache:
        """A cache of `model` with the views `wanted` built, for `adopt`. It only reads this cache (the
        previous config's messages and packings, which it reuses), so it may run in a thread while this
        one serves: building a large mesh's views takes long."""
        staged = ConfigCache(model, self._ca, self._config_factory, previous=self)
        for workload, interception, dns_capture, router in set(wanted):
            view = staged.view(workload, interception=interception, dns_capture=dns_capture, router=router)
            staged.resources(view, CLUSTER)
        return staged

    def adopt(self, staged: ConfigCache) -> None:
        """Serve `staged`'s model and views from now on (secrets stay: they do not depend on the model).
        Its snapshots are all its own: the ones it replaces are retired (streams may hold them a while)."""
        for snap in self._views.values():
            for s in snap.values():
                s.retire()
        self._model, self._config = staged._model, staged._config
        self._views, self._view_of = staged._views, staged._view_of
        self._packed, self._packed_before = staged._packed, staged._packed_before
        self._snapshots = staged._snapshots

    def view(
        self,
        workload: Workload,
        *,
        interception: InterceptionMode = InterceptionMode.REDIRECT,
        dns_capture: bool = False,
        router: bool = False,
    ) -> ProxyView:
        """The view of `workload` under the current model, computed once per model, workload and what
        its node asks for (interception mode, DNS listener, gateway).

        Built from the model's own entry for the workload when it has one (say a mesh-file entry
        with `mtls: DISABLE` for a proxy that also connects): what clients send and what the
        proxy accepts then come from the same entry."""
        key = (workload, interception, dns_capture, router)
        found = self._view_of.get(key)
        if found is None:
            entry = self._model.workload(workload.namespace, workload.name) or workload
            found = view_of(self._model, entry, interception=interception, dns_capture=dns_capture, router=router)
            if workload.on_demand_clusters != found.on_demand:  # the proxy's bootstrap decides, not an entry
                found = dataclasses.replace(found, on_demand=workload.on_demand_clusters)
            self._view_of[key] = found
        return found

    def resources(self, view: ProxyView, type_url: str) -> Resources:
        """All resources of `type_url` for a proxy with `view`, keyed by name."""
        if type_url == SECRET:
            return self._secret_resources(view)
        snap = self._views.get(view)
        if snap is None:
            generated = self._config.resources(view)
            check_consistent(generated)
            snap = {t: self._snapshot(msgs) for t, msgs in generated.items()}
            self._views[view] = snap
        found = snap.get(type_url)
        if found is None:
            found = snap[type_url] = Snapshot()
        return found

    def views(self) -> int:
        return len(self._views)

    def _snapshot(self, msgs: list[message.Message]) -> Snapshot:
        # Views share whole lists (every view of a scope has the same endpoints, every view of a namespace
        # the same routes): one snapshot per list, so what is worked out on a snapshot is shared too.
        hit = self._snapshots.get(id(msgs))
        if hit is None or hit[0] is not msgs:
            hit = self._snapshots[id(msgs)] = (msgs, Snapshot((r.name, r) for r in map(self._pack_once, msgs)))
        return hit[1]

    def _pack_once(self, msg: message.Message) -> Resource:
        # Views share message objects for shared config: pack and hash each object once.
        hit = self._packed.get(id(msg))
        if hit is None or hit[0] is not msg:
            hit = self._packed_before.get(id(msg))
            if hit is None or hit[0] is not msg:
                hit = (msg, resource(msg))
            self._packed[id(msg)] = hit
        return hit[1]

    def retain_secrets(self, identities: set[str]) -> None:
        """Forget packed secrets of identities no connected proxy has (keys are not kept for nothing)."""
        for gone in self._secrets.keys() - identities:
            del self._secrets[gone]

    def _secret_resources(self, view: ProxyView) -> Resources:
        """Only the proxy's own identity: a proxy can never be sent another identity's key."""
        identity = spiffe_id(self._model.trust_domain, view.namespace, view.service_account)
        issued = self._ca.workload_certificate(identity)
        bundle = self._ca.trust_bundle_pem
        cached = self._secrets.get(identity)
        if cached is None or cached[:2] != (issued.cert_pem, bundle):
            if self._root is None or self._root[0] != bundle:
                self._root = (bundle, resource(root_secret(bundle)))
            own = resource(workload_secret(issued.cert_pem, issued.key_pem))
            cached = (issued.cert_pem, bundle, Snapshot({SECRET_DEFAULT: own, SECRET_ROOTCA: self._root[1]}.items()))
            self._secrets[identity] = cached
        return cached[2]


def check_consistent(generated: dict[str, list[message.Message]]) -> None:
    """Every EDS name a cluster uses and every RDS name a listener uses is generated too. Reads the
    messages, not their packings: unpacking thousands of clusters per view cost more than building."""
    endpoint_names = {getattr(m, "cluster_name", "") for m in generated.get(ENDPOINT, [])}
    route_names = {getattr(m, "name", "") for m in generated.get(ROUTE, [])}
    for cluster in generated.get(CLUSTER, []):
        if isinstance(cluster, cluster_pb2.Cluster) and cluster.type == cluster_pb2.Cluster.EDS:
            name = cluster.eds_cluster_config.service_name or cluster.name
            if name not in endpoint_names:
                raise InconsistentSnapshot(f"cluster {cluster.name} uses endpoints {name!r} that are not generated")
    for listener in generated.get(LISTENER, []):
        if not isinstance(listener, listener_pb2.Listener):
            continue
        for chain in listener.filter_chains:
            for f in chain.filters:
                if f.typed_config.Is(hcm.HttpConnectionManager.DESCRIPTOR):
                    manager = hcm.HttpConnectionManager()
                    f.typed_config.Unpack(manager)
                    if manager.HasField("rds") and manager.rds.route_config_name not in route_names:
                        raise InconsistentSnapshot(
                            f"listener {listener.name} uses routes {manager.rds.route_config_name!r} "
                            "that are not generated"
                        )
