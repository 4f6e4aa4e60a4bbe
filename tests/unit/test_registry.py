import asyncio
import os
import time
from pathlib import Path

from meshplane.controlplane import meshfile
from meshplane.controlplane.model import MeshModel, Workload, labels
from meshplane.controlplane.registry import MeshFileWatcher, Registry
from meshplane.controlplane.server import Debouncer

MESH = "services:\n  - {name: web, ports: [{port: 80, name: http}], selector: {app: web}}\n"


def proxy(name: str = "web-1") -> Workload:
    return Workload(name, "default", "web", "10.0.0.1", labels({"app": "web"}))


def test_proxies_become_endpoints_and_streams_are_counted() -> None:
    seen: list[MeshModel] = []
    registry = Registry(meshfile.parse(MESH), lambda m, settled: seen.append(m))
    registry.register("p1", proxy())
    registry.register("p1", proxy())  # a second stream of the same proxy (reconnect race)
    assert len(seen) == 1
    assert registry.model.endpoints(registry.model.services[0]) == (proxy(),)
    registry.unregister("p1")
    assert len(seen) == 1  # one stream is still open
    registry.unregister("p1")
    assert registry.model.workloads == () and len(seen) == 2
    registry.unregister("never-seen")
    assert len(seen) == 2


def test_static_workload_wins_over_a_proxy_of_the_same_name() -> None:
    static = meshfile.parse(
        MESH + "workloads:\n  - {name: web-1, serviceAccount: web, labels: {app: web}, address: 10.9.9.9}\n"
    )
    registry = Registry(static)
    registry.register("p1", proxy())
    assert [w.address for w in registry.model.workloads] == ["10.9.9.9"]


def watched(
    tmp_path: Path, text: str, *, settle: float, now: list[float] | None = None
) -> tuple[Path, MeshFileWatcher, list[MeshModel], list[str]]:
    """A mesh file of `text` and its watcher (on the clock `now[0]` if given): what it applied, its errors."""
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    applied: list[MeshModel] = []
    errors: list[str] = []
    clock = (lambda: now[0]) if now is not None else time.time
    watcher = MeshFileWatcher(
        path, applied.append, settle=settle, clock=clock, on_error=lambda e: errors.append(str(e))
    )
    watcher.load_initial()
    return path, watcher, applied, errors


def test_watcher_applies_good_edits_and_keeps_last_good(tmp_path: Path) -> None:
    path, watcher, applied, errors = watched(tmp_path, MESH, settle=0)
    assert not watcher.check()
    path.write_text(MESH + "  - {name: api, ports: [{port: 81}]}\n")
    assert watcher.check() and len(applied[-1].services) == 2
    path.write_text("services: [\n")
    assert not watcher.check()
    assert errors and "mesh.yaml:2: invalid YAML" in errors[0]
    # An editor's atomic rename back to the same content as the last good file changes nothing.
    tmp = tmp_path / "new"
    tmp.write_text(MESH + "  - {name: api, ports: [{port: 81}]}\n")
    os.replace(tmp, path)
    assert not watcher.check() and len(applied) == 1
    path.unlink()
    assert not watcher.check()  # a vanished file is not an empty mesh


async def test_debouncer_coalesces_bursts() -> None:
    fired: list[float] = []
    debounce = Debouncer(0.05, 1.0, fired.append)
    for _ in range(5):
        debounce()
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.15)
    assert len(fired) == 1


async def test_debouncer_fires_by_max_delay_under_constant_change() -> None:
    fired: list[float] = []
    debounce = Debouncer(0.05, 0.2, fired.append)
    for _ in range(20):  # a change every 20 ms, for 400 ms: never quiet for 50 ms
        debounce()
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)
    assert 2 <= len(fired) <= 3


def test_a_proxy_that_reconnects_with_new_labels_is_seen_with_them() -> None:
    """Reconnecting within the grace period (the old stream not yet unregistered) with other labels."""
    seen: list[MeshModel] = []
    registry = Registry(meshfile.parse(MESH), lambda m, settled: seen.append(m))
    registry.register("p1", proxy())
    moved = Workload("web-1", "default", "web", "10.0.0.1", labels({"app": "api"}))
    registry.register("p1", moved)  # the new stream
    registry.unregister("p1")  # the old stream's grace period ends
    assert registry.model.workloads == (moved,)
    assert registry.model.endpoints(registry.model.services[0]) == ()
    assert len(seen) == 2


def test_watcher_waits_until_a_file_written_in_place_stops_changing(tmp_path: Path) -> None:
    """`cat > mesh.yaml` truncates then writes: a valid first half must never be applied."""
    now = [1000.0]
    path, watcher, applied, _ = watched(tmp_path, MESH + "  - {name: api, ports: [{port: 81}]}\n", settle=0.5, now=now)
    path.write_text(MESH)  # half written: valid YAML with one service fewer
    os.utime(path, (now[0], now[0]))
    assert not watcher.check() and not applied  # too fresh
    now[0] += 0.2
    path.write_text(MESH + "  - {name: api, ports: [{port: 81}]}\n  - {name: db, ports: [{port: 5432}]}\n")
    os.utime(path, (now[0], now[0]))
    now[0] += 0.2
    assert not watcher.check() and not applied  # still changing
    now[0] += 0.5
    assert watcher.check()
    assert [s.name for s in applied[-1].services] == ["web", "api", "db"]


def test_a_file_seen_mid_write_with_its_previous_mtime_is_not_applied(tmp_path: Path) -> None:
    """A stat can race a truncating write: the new size with the previous write's mtime. That state looks
    long settled, but it is seen once: it is never applied on first sight."""
    now = [1000.0]
    path, watcher, applied, _ = watched(tmp_path, MESH + "  - {name: api, ports: [{port: 81}]}\n", settle=0.25, now=now)
    path.write_text(MESH)  # what the racing stat saw: part of the file, last written long ago
    os.utime(path, (now[0] - 60, now[0] - 60))
    assert not watcher.check() and not applied
    now[0] += 0.2
    path.write_text(MESH + "  - {name: api, ports: [{port: 81}]}\n  - {name: db, ports: [{port: 5432}]}\n")
    os.utime(path, (now[0], now[0]))
    assert not watcher.check() and not applied  # another state: first sight again
    now[0] += 0.2
    assert not watcher.check() and not applied  # seen twice, but written only 0.2 s ago
    now[0] += 0.2
    assert watcher.check()
    assert [[s.name for s in m.services] for m in applied] == [["web", "api", "db"]]


def test_an_empty_file_is_refused_on_reload_and_services_can_still_all_go(tmp_path: Path) -> None:
    path, watcher, applied, errors = watched(tmp_path, MESH, settle=0)
    path.write_text("# nothing yet\n")
    assert not watcher.check() and not applied
    assert errors == [f"{path}: the file is empty (no YAML document); to remove every service, write `services: []`"]
    path.write_text("services: []\n")
    assert watcher.check() and applied[-1].services == ()


def test_a_mesh_file_entry_naming_another_identity_for_a_connected_proxy_is_dropped() -> None:
    static = meshfile.parse(
        MESH + "workloads:\n  - {name: web-1, serviceAccount: other, labels: {app: web}, address: 10.9.9.9}\n"
    )
    registry = Registry(static)
    registry.register("p1", proxy())
    assert registry.model.workloads == (proxy(),)  # clients expect the identity the proxy really has


def test_saved_registrations_stand_in_until_their_proxy_is_back_or_expired(tmp_path: Path) -> None:
    from meshplane.controlplane.registry import RegistrationStore

    store = RegistrationStore(tmp_path / "state" / "registrations.json")
    store.save({"p1": proxy("web-1"), "p2": proxy("web-2")})
    registry = Registry(meshfile.parse(MESH))
    registry.restore(store.load())
    assert {w.name for w in registry.model.workloads} == {"web-1", "web-2"}
    registry.register("p1", proxy("web-1"))
    assert registry.expire_restored() == ["p2"]
    assert {w.name for w in registry.model.workloads} == {"web-1"}
    (tmp_path / "state" / "registrations.json").write_text("{not json")
    assert store.load() == {}


def test_a_disconnected_proxy_drains_until_its_grace_ends_or_it_is_back() -> None:
    registry = Registry(meshfile.parse(MESH))
    registry.register("p1", proxy())
    registry.drain("p1")
    (w,) = registry.model.workloads
    assert w.draining
    registry.register("p1", proxy())  # back within the grace period
    (w,) = registry.model.workloads
    assert not w.draining


async def test_a_settled_change_runs_without_waiting_for_quiet_but_still_coalesces() -> None:
    fired: list[float] = []
    debounce = Debouncer(0.5, 1.0, lambda first: fired.append(time.monotonic() - first))
    debounce(settled=True)
    debounce()  # arrives while the first waits its turn: coalesced into it
    await asyncio.sleep(0.05)
    assert len(fired) == 1 and fired[0] < 0.05  # not the 0.5 s of quiet an unsettled change waits for
    debounce()
    await asyncio.sleep(0.1)
    assert len(fired) == 1  # an ordinary change still waits
    debounce.cancel()


async def test_proxies_coming_and_going_are_merged_and_a_cluster_view_can_say_it_is_settled() -> None:
    """Registrations are merged here (REBUILD_DELAY), then debounced by the server: a storm of them must
    not become a push every few milliseconds. A mesh-file edit is settled (its watcher waited for the
    file to stop changing), and so is a cluster view that says so."""
    seen: list[tuple[int, bool]] = []
    registry = Registry(meshfile.parse(MESH), lambda m, settled: seen.append((len(m.workloads), settled)))
    for i in range(5):
        registry.register(f"p{i}", proxy(f"web-{i}"))
    await asyncio.sleep(0.1)
    assert seen == [(5, False)]  # five proxies, one change
    registry.set_static(meshfile.parse(MESH.replace("port: 80", "port: 81")))
    assert seen[-1] == (5, True)
    registry.set_cluster((), (proxy("pod-1"),), settled=True)
    assert seen[-1] == (6, True)


async def test_a_cancelled_debouncer_takes_no_more_calls() -> None:
    """Shutting down: proxies going away still change the model, but nothing may be built or pushed."""
    fired: list[float] = []
    debounce = Debouncer(0.01, 0.1, fired.append)
    debounce.cancel()
    debounce(settled=True)
    await asyncio.sleep(0.05)
    assert fired == []
