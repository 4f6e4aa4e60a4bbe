"""Config generation alone, no server (scenario 3): what building a sidecar's view costs.

    .venv/bin/python benchmarks/config_build.py [--services 1000] [--runs 7]

The mesh: `--services` services over 10 namespaces, each with an HTTP port and a TCP port (50
distinct TCP ports), two workloads each (10 service accounts per namespace). Three figures, each
the median of `--runs`, in CPU milliseconds of this process (the machine is shared; CPU time is
what the build costs, wall time what a proxy waits):

- `parse`: the mesh file's YAML to a model.
- `full build`: a new model's complete config for one view (CDS, EDS, LDS, RDS), built,
  checked, packed and serialized, as the server does for the first proxy of a view.
- `one endpoint`: the same after one workload moves to another address, starting from the
  previous model's config (what a pod replaced in a rollout costs), and how many resources of
  each type changed.

The garbage collector is set up as `meshctl serve` sets it up (`app.tune_gc`); `--default-gc` keeps
Python's defaults, to see what that setting is worth.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

from meshplane.controlplane import app, meshfile
from meshplane.controlplane.cache import ConfigCache
from meshplane.controlplane.model import MeshModel
from meshplane.controlplane.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resources

TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
MAX_SERVICES = 20000


def mesh(services: int) -> str:
    lines = ["services:"]
    for i in range(services):
        lines += [
            f"  - name: svc-{i}",
            f"    namespace: ns-{i % 10}",
            f"    ports: [{{port: 8080, name: http}}, {{port: {9000 + i % 50}, name: tcp}}]",
            f"    selector: {{app: svc-{i}}}",
            f"    addresses: [10.96.{i // 250}.{i % 250 + 1}]",
        ]
    lines.append("workloads:")
    for i in range(2 * services):
        s = i % services
        lines.append(
            f"  - {{name: w-{i}, namespace: ns-{s % 10}, serviceAccount: sa-{s % 100}, labels: {{app: svc-{s}}}, "
            f"address: 10.{1 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}}}"
        )
    return "\n".join(lines) + "\n"


class _NoSecrets:
    """The build does not touch certificates; the cache only needs the attribute."""

    trust_bundle_pem = b""


def cpu_ms(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.process_time()
    out = fn()
    return (time.process_time() - t0) * 1000, out


def snapshot(cache: ConfigCache, model: MeshModel) -> dict[str, Resources]:
    view = cache.view(model.workloads[0])
    return {t: cache.resources(view, t) for t in TYPES}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--default-gc", action="store_true", help="Python's collector settings, not the server's")
    args = p.parse_args()
    if not 0 < args.services <= MAX_SERVICES or not 0 < args.runs <= 100:
        p.error(f"--services in 1..{MAX_SERVICES}, --runs in 1..100")
    if not args.default_gc:
        app.tune_gc()
    text = mesh(args.services)
    parse, full, incremental = [], [], []
    changed: dict[str, int] = {}
    size = 0
    for run in range(args.runs):
        ms, model = cpu_ms(lambda: meshfile.parse(text))
        parse.append(ms)
        assert isinstance(model, MeshModel)
        cache = ConfigCache(model, _NoSecrets())  # type: ignore[arg-type]
        ms, before = cpu_ms(lambda m=model, c=cache: snapshot(c, m))
        full.append(ms)
        assert isinstance(before, dict)
        size = sum(len(r.packed.value) for res in before.values() for r in res.values())
        workloads = list(model.workloads)
        workloads[run + 1] = dataclasses.replace(workloads[run + 1], address=f"10.250.0.{run + 1}")
        moved = dataclasses.replace(model, workloads=tuple(workloads))

        def rebuild(c: ConfigCache = cache, m: MeshModel = moved) -> dict[str, Resources]:
            c.update(m)
            return snapshot(c, m)

        ms, after = cpu_ms(rebuild)
        incremental.append(ms)
        assert isinstance(after, dict)
        changed = {
            t.rsplit(".", 1)[-1]: sum(1 for n, r in after[t].items() if n not in before[t] or before[t][n] != r)
            for t in TYPES
        }
    counts = {t.rsplit(".", 1)[-1]: len(res) for t, res in before.items()}
    gc = "Python's default collector" if args.default_gc else "the collector as meshctl serve sets it"
    print(
        f"{args.services} services, {2 * args.services} workloads; one view: {counts}, {size / 1e6:.2f} MB packed; {gc}"
    )
    print(
        f"median of {args.runs} (CPU ms): parse {statistics.median(parse):.0f}, "
        f"full build {statistics.median(full):.0f}, one endpoint {statistics.median(incremental):.0f} "
        f"(changed: {changed})"
    )


if __name__ == "__main__":
    main()
