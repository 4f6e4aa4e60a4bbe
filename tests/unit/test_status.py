"""proxy-status's states from describe()-shaped data, its rendering, and the admin API's loopback guard."""

import datetime as dt
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meshplane.controlplane import admin, status
from meshplane.controlplane.metrics import Metrics

NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def ago(seconds: float) -> str:
    return (NOW - dt.timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def t(sent: str, acked: str, *, ack_age: float | None = 3, nonce: str = "4", nack: Any = None, n: int = 2) -> Any:
    return {
        "requested": True,
        "subscribed": [],
        "sent_version": sent,
        "nonce": nonce,
        "acked_version": acked,
        "last_ack": None if ack_age is None else ago(ack_age),
        "resources": [f"r{i}" for i in range(n)],
        "last_nack": nack,
    }


BAD_NACK = {
    "version": "v2",
    "nonce": "4",
    "message": "Error adding/updating cluster(s) nack-me: Proto constraint validation failed",
    "at": ago(12),
    "resources": ["nack-me", "outbound|9080||backend.demo.svc.cluster.local"],
    "accepted_version": "v1",
}

PROXY = {
    "id": "sidecar~10.0.0.7~backend-1.demo~demo.svc.cluster.local",
    "stream": 3,
    "peer": "ipv4:127.0.0.1:50000",
    "connected_at": ago(300),
    "identity": "spiffe://cluster.local/ns/demo/sa/backend",
    "types": {
        "CDS": t("v2", "v1", ack_age=40, nack=BAD_NACK, n=7),
        "EDS": t("e1", "e1", ack_age=3),
        "LDS": t("l2", "l1", ack_age=250),
        "RDS": {"requested": True, "subscribed": ["9999"], "sent_version": "", "nonce": "", "acked_version": ""},
        # SDS never subscribed: absent from describe().
    },
}


def test_each_state_from_describe() -> None:
    doc = status.syncz([PROXY], "meshplane-0", NOW)
    (row,) = doc["proxies"]
    types = row["types"]
    assert types["CDS"]["state"] == status.NACKED and types["CDS"]["age"] == 12
    assert types["EDS"]["state"] == status.SYNCED and types["EDS"]["age"] == 3
    assert types["LDS"]["state"] == status.STALE and types["LDS"]["age"] == 250
    assert types["RDS"]["state"] == status.NOT_SENT and types["RDS"]["subscribed"] == ["9999"]
    assert types["SDS"]["state"] == status.NOT_SENT and not types["SDS"]["requested"]
    assert row["replica"] == doc["replica"] == "meshplane-0"
    assert set(doc["states"]) == {"SYNCED", "STALE", "NACKED", "NOT SENT"}


def test_nack_details() -> None:
    cds = status.type_status(PROXY["types"]["CDS"], NOW)
    assert cds["nack"]["rejected_version"] == "v2"
    assert cds["nack"]["accepted_version"] == "v1"
    assert cds["nack"]["named_in_message"] == ["nack-me"]
    assert cds["resources"] == 7


def test_a_nack_of_an_older_response_is_history_not_the_state() -> None:
    """After a NACK the next push (a new nonce) is ACKed: SYNCED, with the old rejection kept as a note."""
    fixed = t("v3", "v3", nonce="5", nack=BAD_NACK)
    s = status.type_status(fixed, NOW)
    assert s["state"] == status.SYNCED and s["previous_nack"]["rejected_version"] == "v2"


def test_stale_without_any_ack() -> None:
    s = status.type_status(t("v1", "", ack_age=None), NOW)
    assert s["state"] == status.STALE and status.cell(s) == "STALE (never ACKed)"


def test_table_is_aligned_with_ages() -> None:
    out = status.table(status.syncz([PROXY], "meshplane-0", NOW))
    header, row = out.splitlines()
    assert header.split() == ["NAME", "IDENTITY", "REPLICA", "CDS", "EDS", "LDS", "RDS", "SDS"]
    for column in ("IDENTITY", "REPLICA", "CDS", "EDS", "LDS", "RDS", "SDS"):
        value = {
            "IDENTITY": "spiffe://",
            "REPLICA": "meshplane-0",
            "CDS": "NACKED (12s)",
            "EDS": "SYNCED (3s)",
            "LDS": "STALE (4m10s)",
            "RDS": "NOT SENT",
            "SDS": "NOT SENT",
        }[column]
        assert row.index(value, header.index(column)) == header.index(column), column


def test_table_without_proxies_says_so() -> None:
    assert status.table(status.syncz([], "meshplane-0", NOW)) == "no proxies connected to meshplane-0\n"


def test_detail_explains_the_nack() -> None:
    doc = status.syncz([PROXY, {**PROXY, "stream": 1}], "meshplane-0", NOW)
    proxy = status.find(doc, PROXY["id"])
    assert proxy is not None and proxy["stream"] == 3  # the newest stream
    out = status.detail(proxy)
    assert "CDS NACKED" in out and "rejected version v2 and keeps running version v1" in out
    assert "Envoy's error:      Error adding/updating cluster(s) nack-me" in out
    assert "rejected resources: nack-me\n" in out
    assert "RDS NOT SENT: the proxy asked for 9999, which the control plane does not have" in out
    assert status.find(doc, "nobody") is None


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (59.9, "59s"), (60, "1m"), (250, "4m10s"), (3600 * 2 + 300, "2h5m"), (86400, "1d")]
)
def test_duration(seconds: float, text: str) -> None:
    assert status.duration(seconds) == text


# -- the loopback guard ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.7", False),
        ("192.168.1.1", False),
        ("::ffff:10.0.0.7", False),
        ("fe80::1%eth0", False),
        ("", False),
        (None, False),
        ("not-an-ip", False),
    ],
)
def test_is_loopback(peer: str | None, local: bool) -> None:
    assert admin.is_loopback(peer) is local


def test_only_debug_is_guarded() -> None:
    assert admin.debug_allowed("/metrics", "10.0.0.7", from_anywhere=False)
    assert admin.debug_allowed("/healthz", None, from_anywhere=False)
    assert not admin.debug_allowed("/debug/proxies", "10.0.0.7", from_anywhere=False)
    assert admin.debug_allowed("/debug/proxies", "10.0.0.7", from_anywhere=True)
    assert admin.debug_allowed("/debug/proxies", "127.0.0.1", from_anywhere=False)


class FakeXds:
    connections: dict[int, Any] = {}

    def describe(self) -> list[dict[str, Any]]:
        return [PROXY]

    def sent_config(self, proxy_id: str) -> dict[str, Any] | None:
        return {"CDS": []} if proxy_id == PROXY["id"] else None


async def client_from(remote: str, *, from_anywhere: bool = False) -> TestClient[Any, Any]:
    app = admin.make_app(FakeXds(), Metrics(), lambda: True, debug_from_anywhere=from_anywhere, replica="r0")  # type: ignore[arg-type]

    @web.middleware
    async def pretend(request: web.Request, handler: Any) -> web.StreamResponse:
        # The real peer is 127.0.0.1; this is what aiohttp would report for another host.
        return await handler(request.clone(remote=remote))

    app.middlewares.insert(0, pretend)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


async def test_debug_refuses_other_hosts_but_health_and_metrics_answer() -> None:
    client = await client_from("10.1.2.3")
    try:
        for path in ("/debug/proxies", "/debug/syncz", f"/debug/config/{PROXY['id']}", "/%64ebug/proxies"):
            r = await client.get(path)
            assert r.status == 403, path
            body = await r.json()
            assert "came from 10.1.2.3" in body["error"] and "--debug-from-anywhere" in body["error"]
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(path)).status == 200, path
        assert (await client.get("/nothing")).status == 404
    finally:
        await client.close()


async def test_debug_answers_loopback_and_when_opened() -> None:
    for remote, anywhere in (("127.0.0.1", False), ("::1", False), ("10.1.2.3", True)):
        client = await client_from(remote, from_anywhere=anywhere)
        try:
            r = await client.get("/debug/syncz")
            assert r.status == 200
            doc = await r.json()
            assert doc["replica"] == "r0" and doc["proxies"][0]["types"]["EDS"]["state"] == "SYNCED"
        finally:
            await client.close()
