"""Who is calling: the identity a proxy proves over gRPC, never the one its node metadata claims.

Credentials, as Istio takes them: a bearer token in the `authorization` metadata (a mesh token
from `meshctl token`, or in Kubernetes a projected service-account token checked by TokenReview),
or, on the TLS port, a mesh client certificate whose URI SAN is the workload's SPIFFE ID (gRPC has
already verified it against the mesh root during the handshake). Tokens travel only over TLS or a
unix socket: gRPC will not attach call credentials to a plaintext channel.

The plaintext port exists only with `--insecure-trust-node-metadata`; calls there are believed.
Pure: the server hands in what gRPC reported about the call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from cryptography import x509

from .errors import AuthError
from .tokens import Identity, TokenError

TokenVerifier = Callable[[str], Awaitable[Identity]]
"""A bearer token -> the identity it proves; raises TokenError (or AuthError) when it proves none."""


@dataclass(frozen=True, slots=True)
class Call:
    """What gRPC knows about a call: its transport and the credentials it carried."""

    transport: str
    """"ssl" (the TLS port), "local" (the unix socket) or "insecure" (the plaintext port)."""
    authorization: str | None = None
    peer_certificate: bytes | None = None
    """The client's leaf certificate (PEM) on the TLS port, if it presented one."""

    @classmethod
    def from_grpc(cls, metadata: Sequence[tuple[str, str | bytes]], auth_context: dict[str, list[bytes]]) -> Call:
        transport = b"".join(auth_context.get("transport_security_type", [])).decode() or "insecure"
        headers = [v for k, v in metadata if k == "authorization"]
        value = headers[0] if headers else None
        certificates = auth_context.get("x509_pem_cert") or []
        return cls(
            transport=transport,
            authorization=value.decode(errors="replace") if isinstance(value, bytes) else value,
            peer_certificate=certificates[0] if certificates else None,
        )


class Authenticator:
    """Turns a `Call` into the identity it proves. `trust_node_metadata` is for the plaintext port."""

    def __init__(self, trust_domain: str, verify_token: TokenVerifier, *, trust_node_metadata: bool = False) -> None:
        self.trust_domain = trust_domain
        self._verify_token = verify_token
        self.trust_node_metadata = trust_node_metadata

    async def authenticate(self, call: Call) -> Identity | None:
        """The caller's identity; None on the insecure port when node metadata is trusted."""
        if call.transport == "insecure":
            if self.trust_node_metadata:
                return None
            raise AuthError("plaintext xDS serves nothing: connect over TLS or the unix socket", reason="plaintext")
        if call.authorization is not None:
            scheme, _, token = call.authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError("the authorization metadata must be 'Bearer <token>'", reason="malformed-token")
            try:
                return await self._verify_token(token.strip())
            except TokenError as e:
                raise AuthError(f"bearer token refused: {e}", reason="bad-token") from None
        if call.peer_certificate is not None:
            return self._certificate_identity(call.peer_certificate)
        raise AuthError(
            "no credential: send a bearer token (meshctl bootstrap --token-file) or a mesh client certificate",
            reason="no-credential",
        )

    def _certificate_identity(self, pem: bytes) -> Identity:
        try:
            cert = x509.load_pem_x509_certificate(pem)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound):
            raise AuthError("the client certificate has no SPIFFE ID", reason="bad-certificate") from None
        prefix = f"spiffe://{self.trust_domain}/ns/"
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            namespace, sep, service_account = uri.removeprefix(prefix).partition("/sa/")
            if (
                uri.startswith(prefix)
                and sep
                and namespace
                and service_account
                and "/" not in namespace + service_account
            ):
                return Identity(namespace, service_account)
        raise AuthError(
            f"the client certificate is not a workload identity of trust domain {self.trust_domain}",
            reason="bad-certificate",
        )
