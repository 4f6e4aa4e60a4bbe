"""SDS: `default` (the proxy's own certificate and key) and `ROOTCA` (the trust bundle)."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from .common import SECRET_DEFAULT, SECRET_ROOTCA


def workload_secret(cert_pem: bytes, key_pem: bytes) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=SECRET_DEFAULT,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=cert_pem),
            private_key=base_pb2.DataSource(inline_bytes=key_pem),
        ),
    )


def root_secret(root_pem: bytes) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=SECRET_ROOTCA,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=root_pem)
        ),
    )
