"""Sync status of connected proxies, as `meshctl proxy-status` shows it. Pure: data in, data or text out.

`syncz()` turns `XdsServer.describe()` into what /debug/syncz serves; `table()` and `detail()`
render that for people. Per proxy and xDS type, one state:

- SYNCED: the last response sent was ACKed. The age is that of the ACK.
- STALE: a response was sent and neither ACKed nor rejected yet (in flight, or the proxy is slow
  or stuck). The age is that of the proxy's last ACK of the type ("never" if none).
- NACKED: the proxy rejected the last response and keeps running the version it had; the
  details say which version was rejected, Envoy's message and the last accepted version.
- NOT SENT: nothing of the type was sent on this stream: the proxy never asked for it, or
  asked for names the control plane does not have.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

TYPES = ("CDS", "EDS", "LDS", "RDS", "SDS")
"""Columns in the order config flows to a proxy (resources.PUSH_ORDER)."""

SYNCED = "SYNCED"
STALE = "STALE"
NACKED = "NACKED"
NOT_SENT = "NOT SENT"

STATES = {
    SYNCED: "the last response sent was ACKed; the age is that of the ACK",
    STALE: "sent, not yet ACKed or rejected; the age is that of the last ACK of this type",
    NACKED: "the proxy rejected the last response and keeps its last accepted version",
    NOT_SENT: "nothing of this type was sent: the proxy never asked, or asked for names that do not exist",
}
"""What each state means; served with the data and printed by `--help`."""

Doc = Mapping[str, Any]


def type_status(t: Doc | None, now: dt.datetime) -> dict[str, Any]:
    """The state of one xDS type of one stream (an entry of describe()'s "types"), with its details."""
    if not t or not t.get("sent_version"):
        subscribed = list((t or {}).get("subscribed") or [])
        return {"state": NOT_SENT, "age": None, "requested": bool(t and t.get("requested")), "subscribed": subscribed}
    nack = t.get("last_nack")
    out: dict[str, Any] = {
        "sent_version": t["sent_version"],
        "acked_version": t.get("acked_version") or "",
        "last_ack": t.get("last_ack"),
        "resources": len(t.get("resources") or []),
        "resource_names": list(t.get("resources") or []),
    }
    if nack and nack.get("nonce") == t.get("nonce"):
        out["state"] = NACKED
        out["age"] = _age(nack.get("at"), now)
        out["nack"] = {
            "rejected_version": nack.get("version", ""),
            "accepted_version": nack.get("accepted_version", out["acked_version"]),
            "message": nack.get("message", ""),
            "resources": list(nack.get("resources") or []),
            "named_in_message": [n for n in nack.get("resources") or [] if n and n in nack.get("message", "")],
            "at": nack.get("at"),
        }
    elif out["acked_version"] == t["sent_version"]:
        out["state"] = SYNCED
        out["age"] = _age(t.get("last_ack"), now)
    else:
        out["state"] = STALE
        out["age"] = _age(t.get("last_ack"), now)
    if nack and out["state"] != NACKED:
        out["previous_nack"] = {"rejected_version": nack.get("version", ""), "message": nack.get("message", "")}
    return out


def syncz(proxies: Sequence[Doc], replica: str, now: dt.datetime) -> dict[str, Any]:
    """What /debug/syncz serves: one entry per stream of `describe()` with each type's state."""
    return {
        "replica": replica,
        "at": now.isoformat(timespec="milliseconds"),
        "states": STATES,
        "proxies": [
            {
                "id": p["id"],
                "identity": p.get("identity", ""),
                "replica": replica,
                "stream": p.get("stream"),
                "peer": p.get("peer", ""),
                "connected_at": p.get("connected_at"),
                "types": {kind: type_status((p.get("types") or {}).get(kind), now) for kind in TYPES},
            }
            for p in proxies
        ],
    }


def cell(status: Doc) -> str:
    """`SYNCED (3s)`, `STALE (never ACKed)`, `NACKED (12s)`, `NOT SENT`."""
    state = str(status["state"])
    if state == NOT_SENT:
        return state
    age = status.get("age")
    if age is None:
        return f"{state} (never ACKed)" if state == STALE else state
    return f"{state} ({duration(age)})"


def table(doc: Doc) -> str:
    """One aligned row per connected proxy, like `istioctl proxy-status`."""
    header = ["NAME", "IDENTITY", "REPLICA", *TYPES]
    rows = [
        [p["id"], p.get("identity", ""), p.get("replica", ""), *(cell(p["types"][k]) for k in TYPES)]
        for p in doc.get("proxies", [])
    ]
    if not rows:
        return f"no proxies connected to {doc.get('replica', 'the control plane')}\n"
    return _align([header, *rows])


def find(doc: Doc, proxy_id: str) -> Doc | None:
    """The newest stream of `proxy_id` in a /debug/syncz document."""
    streams = [p for p in doc.get("proxies", []) if p["id"] == proxy_id]
    return max(streams, key=lambda p: p.get("stream") or 0) if streams else None


def detail(proxy: Doc) -> str:
    """Everything known about one proxy's sync: per type state, versions, counts and any NACK."""
    lines = [
        f"Proxy:      {proxy['id']}",
        f"Identity:   {proxy.get('identity', '')}",
        f"Replica:    {proxy.get('replica', '')} (stream {proxy.get('stream')} from {proxy.get('peer', '')})",
        f"Connected:  {proxy.get('connected_at', '')}",
        "",
    ]
    rows = [["TYPE", "STATE", "SENT VERSION", "ACKED VERSION", "RESOURCES"]]
    for kind in TYPES:
        s = proxy["types"][kind]
        rows.append(
            [kind, cell(s), s.get("sent_version", "-"), s.get("acked_version") or "-", str(s.get("resources", 0))]
        )
    lines.append(_align(rows).rstrip("\n"))
    for kind in TYPES:
        s = proxy["types"][kind]
        if s["state"] == NACKED:
            n = s["nack"]
            named = n["named_in_message"]
            lines += [
                "",
                f"{kind} NACKED at {n['at']}: the proxy rejected version {n['rejected_version']} and keeps running "
                + (
                    f"version {n['accepted_version']}"
                    if n["accepted_version"]
                    else "nothing of this type (none ever accepted)"
                ),
                "  Envoy's error:      " + "\n                      ".join(n["message"].strip().splitlines()),
                "  rejected resources: "
                + (", ".join(named) if named else "not named in Envoy's error; one of those in the response"),
                f"  in the response:    {_names(n['resources'])}",
            ]
        elif s["state"] == NOT_SENT and s.get("requested"):
            wanted = ", ".join(s.get("subscribed") or []) or "everything"
            lines += ["", f"{kind} NOT SENT: the proxy asked for {wanted}, which the control plane does not have"]
        elif "previous_nack" in s:
            p = s["previous_nack"]
            lines += ["", f"{kind}: an earlier version {p['rejected_version']} was rejected: {p['message']}"]
    return "\n".join(lines) + "\n"


def duration(seconds: float) -> str:
    """3s, 4m10s, 2h5m, 3d4h: short and coarse, for ages in a table."""
    s = max(0, int(seconds))
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // subsize
            return f"{s // size}{unit}{rest}{sub}" if rest else f"{s // size}{unit}"
    return f"{s}s"


def _age(iso: str | None, now: dt.datetime) -> float | None:
    if not iso:
        return None
    return max(0.0, (now - dt.datetime.fromisoformat(iso)).total_seconds())


def _names(names: Sequence[str], limit: int = 8) -> str:
    if not names:
        return "(none)"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _align(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "".join("   ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in rows)
