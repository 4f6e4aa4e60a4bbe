"""Mesh tokens: compact JWS (ES256) signed by the mesh CA's root key, verified offline.

Outside Kubernetes there is no TokenReview API to ask, so `meshctl token` mints a token that
names a workload identity and the control plane verifies it with the CA's public key. The
claims follow Kubernetes' service-account tokens, so one code path maps either to an identity:
`sub` is `system:serviceaccount:<namespace>:<service-account>`, `aud` the audiences, `iss`
the issuer, `iat`/`nbf`/`exp` seconds since the epoch. Only ES256 is accepted (a token cannot
choose its own algorithm).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from . import names

ISSUER = "meshplane"
AUDIENCE = "meshplane"
"""The default audience: what Meshplane's tokens are for (Istio's is `istio-ca`)."""
MAX_TOKEN = 4096
"""Bytes; a service-account token is 1-2 KB, and a caller must not make us parse more (gRPC itself
refuses metadata past 8 KiB)."""
SKEW = 60
"""Seconds of clock difference tolerated on `nbf`, `iat` and `exp`."""
_SUBJECT = "system:serviceaccount:"


class TokenError(ValueError):
    """A token that does not prove an identity; the message says why (never echoes the token)."""


@dataclass(frozen=True, slots=True)
class Identity:
    namespace: str
    service_account: str
    pod: str = ""
    """The pod a Kubernetes bound token names, when it names one."""


def subject(namespace: str, service_account: str) -> str:
    return f"{_SUBJECT}{namespace}:{service_account}"


def identity_of_subject(sub: str) -> Identity:
    """`system:serviceaccount:<ns>:<sa>` -> the identity; anything else is a TokenError."""
    if not sub.startswith(_SUBJECT):
        raise TokenError(f"the token's subject is not a service account (expected {_SUBJECT}<namespace>:<name>)")
    namespace, sep, service_account = sub.removeprefix(_SUBJECT).partition(":")
    if not sep or not names.DNS_LABEL.match(namespace) or not names.DNS_NAME.match(service_account):
        raise TokenError("the token's subject does not name a valid namespace and service account")
    return Identity(namespace, service_account)


def mint(
    key: ec.EllipticCurvePrivateKey,
    namespace: str,
    service_account: str,
    *,
    ttl: float,
    audiences: Sequence[str] = (AUDIENCE,),
    now: float | None = None,
) -> str:
    """A token for `namespace/service_account`, valid `ttl` seconds from `now`."""
    identity_of_subject(subject(namespace, service_account))  # the same checks as on the way in
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": ISSUER,
        "sub": subject(namespace, service_account),
        "aud": list(audiences),
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl),
    }
    signing_input = f"{_b64(json.dumps({'alg': 'ES256', 'typ': 'JWT'}))}.{_b64(json.dumps(claims))}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def verify(
    token: str,
    keys: Sequence[ec.EllipticCurvePublicKey],
    *,
    audience: str = AUDIENCE,
    clock: Callable[[], float] = time.time,
) -> Identity:
    """The identity `token` proves, if one of `keys` signed it and it is valid now for `audience`."""
    if len(token) > MAX_TOKEN:
        raise TokenError(f"the token is longer than {MAX_TOKEN} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("the token is not a compact JWS (header.payload.signature)")
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except (ValueError, binascii.Error):
        raise TokenError("the token is not valid base64url JSON") from None
    if not isinstance(header, dict) or header.get("alg") != "ES256":
        raise TokenError("the token is not signed with ES256 (the only algorithm accepted)")
    if len(signature) != 64:
        raise TokenError("the token's signature is malformed")
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    signed = f"{parts[0]}.{parts[1]}".encode()
    for key in keys:
        try:
            key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
            break
        except InvalidSignature:
            continue
    else:
        raise TokenError("the token's signature does not verify with the mesh CA (forged, or another mesh's)")
    if not isinstance(claims, dict):
        raise TokenError("the token's claims are not a JSON object")
    if claims.get("iss") != ISSUER:
        raise TokenError(f"the token's issuer is not {ISSUER!r}")
    audiences = claims.get("aud")
    audiences = [audiences] if isinstance(audiences, str) else audiences
    if not isinstance(audiences, list) or audience not in audiences:
        raise TokenError(f"the token is not for audience {audience!r}")
    now = clock()
    exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
    if not isinstance(exp, int) or now > exp + SKEW:
        raise TokenError("the token has expired")
    if isinstance(nbf, int) and now < nbf - SKEW:
        raise TokenError("the token is not valid yet")
    sub = claims.get("sub")
    if not isinstance(sub, str):
        raise TokenError("the token has no subject")
    return identity_of_subject(sub)


def issuer(token: str) -> str | None:
    """The `iss` a token claims, unverified: which verifier to ask (never a reason to trust it)."""
    try:
        claims = json.loads(_unb64(token.split(".")[1]))
    except (IndexError, ValueError, binascii.Error):
        return None
    return claims.get("iss") if isinstance(claims, dict) and isinstance(claims.get("iss"), str) else None


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
