"""The control plane image (top-level Dockerfile), built here without a registry, runs `meshctl`.

No base image can be pulled on this project's machines, so `build_controlplane_image` follows the
Dockerfile step by step on a root filesystem made from the host's Debian packages, then `podman import`s it:

- FROM python:3.11-slim      -> Debian's python3.11 (same minor version) and its standard library, busybox
                                for /bin/sh and the shell tools, the shared libraries ldd lists.
- RUN apt-get install PKGS   -> each package's files copied from the host (only `iptables` is known: a new
                                package fails the test until it gets a local equivalent here).
- COPY SRC DEST              -> the same sources, filtered by .dockerignore, into a build context.
- RUN pip install ARGS /src  -> the same pip arguments, run by Debian's python3.11, plus --target into the
                                rootfs's dist-packages: the same wheels, the same build of the project
                                (protos compiled by setup.py), the same `meshctl` console script.
- RUN groupadd/useradd/mkdir/chown -> the same uid, gid and directories with the same owner.
- WORKDIR ENV USER EXPOSE ENTRYPOINT CMD -> passed verbatim to `podman import --change`.

Any other instruction fails the test: the local build must not silently drift from the Dockerfile.

NOT exercised without a registry: the python:3.11-slim base itself (its CPython build, its /usr/local
layout, pip's copy in it), Debian's `apt-get install` inside it (the iptables alternatives), and
`groupadd`/`useradd` themselves. `docker build .` on a machine with a registry covers those.

The image is tagged with a hash of every input (Dockerfile, .dockerignore, the context, this builder), kept
between runs like the local sidecar image (rebuilt when an input changes); older tags are removed. Containers
are always removed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
DOCKERFILE = TOP / "Dockerfile"
DOCKERIGNORE = TOP / ".dockerignore"
REPOSITORY = "localhost/meshplane-local"
PYTHON = "/usr/bin/python3.11"
BUSYBOX = "/bin/busybox"
XTABLES = "/usr/sbin/xtables-nft-multi"
ULIMITS = ["--ulimit", "nofile=1024:4096", "--ulimit", "nproc=1024:4096"]
"""podman here cannot raise rlimits (no CAP_SYS_RESOURCE): every container gets explicit lower ones."""
LABEL = "meshplane-test=images"
METADATA = {"WORKDIR", "ENV", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL", "STOPSIGNAL", "VOLUME"}
"""Dockerfile instructions `podman import --change` applies as they are."""
BUILD_TIMEOUT = 600
SHELL_TOOLS = [
    "sh",
    "id",
    "ls",
    "cat",
    "cp",
    "mv",
    "ln",
    "rm",
    "mkdir",
    "chown",
    "chmod",
    "sleep",
    "env",
    "test",
    "grep",
    "head",
    "tail",
    "sed",
    "wget",
]
"""busybox stands in for the base image's coreutils and friends (used by docker-compose.yml's setup job)."""


class BuildError(Exception):
    pass


def podman_argv() -> list[str]:
    """podman, with runc where it is installed (crun fails on these hosts: cgroups in hybrid mode)."""
    return ["podman", "--runtime", "runc"] if shutil.which("runc") else ["podman"]


def engine_problem() -> str | None:
    """Why the image cannot be built and run here, or None."""
    if not shutil.which("podman"):
        return "podman is not installed (make system-deps, or apt-get install podman runc)"
    if os.geteuid() != 0:
        return "building the image's root filesystem needs root (files owned by the image's users)"
    for tool in (PYTHON, BUSYBOX, XTABLES):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing (make system-deps installs python3, busybox-static and iptables)"
    done = subprocess.run([*podman_argv(), "info"], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        return f"podman does not work here: {done.stderr.strip()[-500:]}"
    return None


def require_engine() -> None:
    """Skip without podman; under CI, where podman is expected (tests/system-deps.sh installs it), fail."""
    problem = engine_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI must build and run the images: {problem}")
        pytest.skip(f"cannot build the control plane image here: {problem}")


# --- the Dockerfile, read as the builder reads it ---------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), " ".join(rest.split())))
    assert not pending, "the Dockerfile ends in a continuation line"
    return out


def shell_commands(run: str) -> list[list[str]]:
    """The commands of a RUN's `a && b && c`."""
    return [shlex.split(part) for part in run.split("&&")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns used here: the last matching pattern wins, `!` re-includes,
    a pattern matching a directory covers what is under it, `**/` matches any depth."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!")
        candidates = [pat, pat.removeprefix("**/")] if pat.startswith("**/") else [pat]
        for cand in candidates:
            anywhere = cand != pat
            for prefix in prefixes:
                names = [prefix, *(prefix.split("/")[-1:] if anywhere else [])]
                if any(fnmatch.fnmatchcase(n, cand) for n in names):
                    verdict = not negate
    return verdict


def dockerignore() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def context_files() -> list[Path]:
    """Every file of the build context: the repository minus .dockerignore."""
    patterns = dockerignore()
    files = []
    for path in sorted(TOP.rglob("*")):
        relative = path.relative_to(TOP).as_posix()
        if relative.startswith((".git/", ".venv/")) or not path.is_file():
            continue
        if not ignored(relative, patterns):
            files.append(path)
    return files


def image_tag() -> str:
    h = hashlib.sha256()
    builder = Path(__file__).read_bytes().split(b"\n# --- the tests ---")[0]  # the tests' edits need no new image
    h.update(builder)
    for path in [DOCKERFILE, DOCKERIGNORE, *context_files()]:
        h.update(path.relative_to(TOP).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{REPOSITORY}:{h.hexdigest()[:12]}"


# --- the local build ----------------------------------------------------------------------------------------------


class RootFS:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def copy_libs(self, binary: str) -> None:
        done = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False)
        for lib in re.findall(r"(/\S+)", done.stdout):
            target = self.path(lib)
            if not target.exists() and Path(lib).exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(lib).resolve(), target)

    def with_libs(self, *files: str) -> None:
        for f in files:
            target = self.path(f)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(f).resolve(), target)
            self.copy_libs(f)


def base_python_slim(fs: RootFS, version: str) -> None:
    """What FROM python:3.11-slim gives the later steps: Python of that minor version with its standard
    library, a shell and the usual tools, users root and nobody."""
    host = subprocess.run([PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True)
    if host.stdout.decode().strip() != version:
        raise BuildError(f"the Dockerfile wants Python {version}; the local stand-in {PYTHON} is not")
    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "usr/local/bin", "etc", "tmp", "var/lib", "run"):
        (fs.root / d).mkdir(parents=True, exist_ok=True)
    for d in ("bin", "sbin", "lib", "lib64"):
        (fs.root / d).symlink_to(f"usr/{d}")
    (fs.root / "tmp").chmod(0o1777)
    fs.with_libs(PYTHON, BUSYBOX)
    for tool in SHELL_TOOLS:
        (fs.root / "usr/bin" / tool).symlink_to("busybox")
    for name in ("python3", "python"):
        (fs.root / "usr/bin" / name).symlink_to("python3.11")
    stdlib = Path(f"/usr/lib/python{version}")
    skip = shutil.ignore_patterns("test", "__pycache__", "idlelib", "tkinter", "ensurepip", "lib2to3", "dist-packages")
    shutil.copytree(stdlib, fs.path(str(stdlib)), symlinks=True, ignore=skip)
    for ext in sorted((stdlib / "lib-dynload").glob("*.so")):
        fs.copy_libs(str(ext))
    (fs.root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/nonexistent:/bin/sh\n")
    (fs.root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (fs.root / "etc/nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")


def apt_install(fs: RootFS, packages: list[str]) -> None:
    local = {"iptables": install_iptables}
    unknown = sorted(set(packages) - set(local))
    if unknown:
        raise BuildError(f"the Dockerfile installs {unknown}: give this local build an equivalent for each")
    for package in packages:
        local[package](fs)


def install_iptables(fs: RootFS) -> None:
    """Debian's iptables package: the nft multi-call binary, its extensions, the usual names."""
    fs.with_libs(XTABLES)
    shutil.copytree("/usr/lib/x86_64-linux-gnu/xtables", fs.path("/usr/lib/x86_64-linux-gnu/xtables"))
    for ext in sorted(Path("/usr/lib/x86_64-linux-gnu/xtables").glob("*.so")):
        fs.copy_libs(str(ext))
    for name in ("iptables", "iptables-restore", "iptables-save", "ip6tables", "ip6tables-restore", "ip6tables-save"):
        (fs.root / "usr/sbin" / name).symlink_to("xtables-nft-multi")


def pip_install(fs: RootFS, argv: list[str], workdir: str, context: Path, version: str) -> None:
    """The Dockerfile's `pip install ...`, by Debian's python3.11 into the rootfs's dist-packages (on its
    sys.path); the console scripts go to /usr/local/bin, as pip puts them in python:3.11-slim."""
    if argv[:2] != ["pip", "install"]:
        raise BuildError(f"unexpected pip command {argv}")
    args = [str(context) if a == workdir or a == "." else a for a in argv[2:]]
    if str(context) not in args:
        raise BuildError(f"the pip install does not install the copied project ({workdir}): {argv}")
    target = fs.path(f"/usr/local/lib/python{version}/dist-packages")
    done = subprocess.run(
        [PYTHON, "-m", "pip", "install", "--quiet", "--target", str(target), *args],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise BuildError(f"pip install failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    for script in sorted((target / "bin").iterdir()):
        first = script.read_bytes().split(b"\n", 1)[0]
        if first != f"#!{PYTHON}".encode():
            raise BuildError(f"{script.name}: unexpected interpreter line {first!r}")
        shutil.move(script, fs.path("/usr/local/bin") / script.name)
    (target / "bin").rmdir()
    for so in sorted(target.rglob("*.so")):
        fs.copy_libs(str(so))


def add_users(fs: RootFS, commands: list[list[str]]) -> None:
    """groupadd/useradd/mkdir/chown exactly as the RUN line says (the tools themselves are Debian's)."""

    def flag(cmd: list[str], name: str) -> str:
        return cmd[cmd.index(name) + 1]

    groups: dict[str, int] = {}
    users: dict[str, int] = {}
    for cmd in commands:
        tool, name = cmd[0], cmd[-1]
        if tool == "groupadd":
            groups[name] = int(flag(cmd, "--gid"))
            with (fs.root / "etc/group").open("a") as f:
                f.write(f"{name}:x:{groups[name]}:\n")
        elif tool == "useradd":
            users[name] = int(flag(cmd, "--uid"))
            gid = int(flag(cmd, "--gid"))
            home, shell = flag(cmd, "--home-dir"), flag(cmd, "--shell")
            with (fs.root / "etc/passwd").open("a") as f:
                f.write(f"{name}:x:{users[name]}:{gid}::{home}:{shell}\n")
        elif tool == "mkdir" and cmd[1] == "-p":
            for d in cmd[2:]:
                fs.path(d).mkdir(parents=True, exist_ok=True)
        elif tool == "chown":
            uid, _, gid = cmd[1].partition(":")
            for d in cmd[2:]:
                os.chown(fs.path(d), int(uid), int(gid or uid))
        else:
            raise BuildError(f"the local build cannot follow {shlex.join(cmd)}")


def build_controlplane_image(tag: str) -> None:
    """Build `tag` from the Dockerfile's steps on a local rootfs (see the module docstring)."""
    steps = instructions(DOCKERFILE.read_text())
    changes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="meshplane-image-") as tmp:
        fs = RootFS(Path(tmp) / "rootfs")
        fs.root.mkdir()
        context = Path(tmp) / "context"
        workdir = "/"
        version = ""
        for keyword, args in steps:
            if keyword == "FROM":
                match = re.fullmatch(r"python:(3\.\d+)-slim", args)
                if not match:
                    raise BuildError(f"FROM {args}: the local build stands in for python:3.X-slim only")
                version = match.group(1)
                base_python_slim(fs, version)
            elif keyword == "COPY":
                *sources, dest = shlex.split(args)
                if any(s.startswith("--") for s in sources):
                    raise BuildError(f"COPY {args}: flags are not followed here")
                target = Path(dest if dest.startswith("/") else f"{workdir}/{dest}")
                for source in sources:
                    copy_source(
                        TOP / source, context / target.relative_to("/"), many=len(sources) > 1 or dest.endswith("/")
                    )
            elif keyword == "RUN":
                commands = shell_commands(args)
                if commands[0][:2] == ["apt-get", "update"]:
                    installs = [c for c in commands if c[:2] == ["apt-get", "install"]]
                    assert len(installs) == 1, args
                    apt_install(fs, [a for a in installs[0][2:] if not a.startswith("-")])
                elif commands[0][:2] == ["pip", "install"]:
                    assert all(c[:2] == ["rm", "-rf"] for c in commands[1:]), args
                    pip_install(fs, commands[0], workdir, context / workdir.lstrip("/"), version)
                    for c in commands[1:]:
                        for d in c[2:]:
                            shutil.rmtree(fs.path(d), ignore_errors=True)
                elif commands[0][0] == "groupadd":
                    add_users(fs, commands)
                else:
                    raise BuildError(f"RUN {args}: the local build does not know this step")
            elif keyword in METADATA:
                if keyword == "WORKDIR":
                    workdir = args
                    fs.path(args).mkdir(parents=True, exist_ok=True)
                # podman import takes one port per EXPOSE.
                values = args.split() if keyword == "EXPOSE" else [args]
                for value in values:
                    changes += ["--change", f"{keyword} {value}"]
            else:
                raise BuildError(f"{keyword} {args}: the local build does not know this instruction")
        tarball = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "--numeric-owner", "-C", str(fs.root), "-cf", str(tarball), "."], check=True)
        done = subprocess.run(
            [*podman_argv(), "import", "-q", *changes, str(tarball), tag],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise BuildError(f"podman import failed: {done.stderr}")


def copy_source(source: Path, dest: Path, *, many: bool) -> None:
    """COPY of one source, filtered by .dockerignore as the build context is."""
    patterns = dockerignore()
    relative = source.relative_to(TOP).as_posix()
    if ignored(relative, patterns) and not source.is_dir():
        raise BuildError(f"COPY {relative}: it is excluded by .dockerignore")
    if source.is_file():
        target = dest / source.name if many else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        return
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(TOP).as_posix()
        if path.is_file() and not ignored(rel, patterns):
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def ensure_controlplane_image() -> str:
    """The local control plane image's tag, built if podman lacks it; older local builds are removed."""
    tag = image_tag()
    podman = podman_argv()
    listed = subprocess.run(
        [*podman, "images", "--format", "{{.Repository}}:{{.Tag}}", REPOSITORY],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    for old in set(listed.stdout.split()) - {tag}:
        subprocess.run([*podman, "rmi", "--force", old], capture_output=True, timeout=120, check=False)
    if tag not in listed.stdout.split():
        build_controlplane_image(tag)
    return tag


def run(image: str, *argv: str, options: tuple[str, ...] = (), timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`podman run --rm` one command in `image`."""
    return subprocess.run(
        [*podman_argv(), "run", "--rm", "--label", LABEL, "--network", "none", *ULIMITS, *options, image, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    require_engine()
    try:
        tag = ensure_controlplane_image()
    except BuildError as e:
        pytest.fail(f"building the control plane image from the Dockerfile's steps failed: {e}")
    yield tag
    remove_labelled(LABEL)


def remove_labelled(label: str) -> None:
    listed = subprocess.run(
        [*podman_argv(), "ps", "-aq", "--filter", f"label={label}"], capture_output=True, text=True, timeout=60
    )
    if listed.stdout.split():
        subprocess.run([*podman_argv(), "rm", "-f", *listed.stdout.split()], capture_output=True, timeout=120)


# --- the tests ------------------------------------------------------------------------------------------------


def test_the_dockerfile_is_the_control_plane_and_init_image() -> None:
    """Pure checks of the Dockerfile (they run everywhere): no dev extras, non-root serve, meshctl entrypoint."""
    steps = instructions(DOCKERFILE.read_text())
    keywords = [k for k, _ in steps]
    assert steps[0][0] == "FROM"
    pip = [a for k, a in steps if k == "RUN" and "pip install" in a]
    assert len(pip) == 1 and "[" not in pip[0], f"the image installs the project without extras: {pip}"
    apt = next(a for k, a in steps if k == "RUN" and "apt-get install" in a)
    assert "iptables" in apt.split() and "--no-install-recommends" in apt
    users = [a for k, a in steps if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, "serve runs as a non-root user"
    assert dict(steps)["ENTRYPOINT"] == json.dumps(["meshctl"])
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    # The build context holds what the install needs and nothing local or generated.
    names = {p.relative_to(TOP).as_posix() for p in context_files()}
    assert {"pyproject.toml", "setup.py", "README.md", "protos/ca.proto", "controlplane/cli.py"} <= names
    assert not [n for n in names if n.startswith((".venv", "tests/", ".git")) or "__pycache__" in n]
    assert not [n for n in names if re.search(r"_pb2", n)], "generated protos are compiled in the build"


def test_meshctl_runs_in_the_image(image: str) -> None:
    done = run(image, "--help")
    assert done.returncode == 0, done.stderr
    for command in ("serve", "bootstrap", "iptables", "token", "webhook-config", "inject"):
        assert command in done.stdout
    # The default user is the unprivileged one; the package imports from the installed tree, not a checkout.
    done = run(
        image,
        "-c",
        "import os, meshplane.controlplane.cli as c, meshplane.protos.ca_pb2\n"
        "print(os.getuid(), os.getgid(), c.__file__)",
        options=("--entrypoint", "python3"),
    )
    assert done.returncode == 0, done.stderr
    uid, gid, where = done.stdout.split()
    assert (uid, gid) == ("10001", "10001")
    assert where == "/usr/local/lib/python3.11/dist-packages/meshplane/controlplane/cli.py"


def test_the_init_step_applies_capture_rules_in_the_image(image: str) -> None:
    dry = run(image, "iptables", "--dry-run", "--ipv6", "off")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("# iptables-restore --noflush\n")
    for chain in ("MESH_INBOUND", "MESH_REDIRECT", "MESH_IN_REDIRECT", "MESH_OUTPUT"):
        assert f":{chain} " in dry.stdout
    assert "--to-ports 15001" in dry.stdout and "--to-ports 15006" in dry.stdout
    # As the webhook runs the init container: root, NET_ADMIN and NET_RAW only, in the pod's own network
    # namespace (here the container's, loopback only), with the image's iptables.
    applied = run(
        image,
        "-c",
        "meshctl iptables --ipv6 off && iptables-save -t nat",
        options=(
            "--entrypoint",
            "sh",
            "--user",
            "0",
            "--cap-drop",
            "ALL",
            "--cap-add",
            "NET_ADMIN,NET_RAW",
        ),
    )
    assert applied.returncode == 0, applied.stderr
    assert "-A OUTPUT -p tcp -j MESH_OUTPUT" in applied.stdout
    assert "-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in applied.stdout
    assert "-A MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN" in applied.stdout


def test_serve_starts_in_the_image_with_a_read_only_root(image: str) -> None:
    """As the Deployment runs it: non-root, read-only root filesystem, no capabilities, writable /tmp and state."""
    name = f"mp-image-{uuid.uuid4().hex[:8]}"
    mesh = "trustDomain: cluster.local\nmtls: STRICT\nservices: []\n"
    script = (
        "import sys, time, urllib.request\n"
        "for _ in range(150):\n"
        "    try:\n"
        "        print(urllib.request.urlopen('http://127.0.0.1:15014/readyz', timeout=1).status); sys.exit(0)\n"
        "    except OSError:\n"
        "        time.sleep(0.2)\n"
        "sys.exit(1)\n"
    )
    podman = podman_argv()
    try:
        started = subprocess.run(
            [
                *podman,
                "run",
                "-d",
                "--name",
                name,
                "--label",
                LABEL,
                *ULIMITS,
                "--read-only",
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
                "--tmpfs",
                "/tmp",
                "--tmpfs",
                "/var/lib/meshplane:U",  # owned by the image's user, like an emptyDir with fsGroup
                "--network",
                "none",
                "--entrypoint",
                "sh",
                image,
                "-c",
                f"printf '{mesh}' > /tmp/mesh.yaml && exec meshctl serve --mesh /tmp/mesh.yaml "
                "--ca-dir /var/lib/meshplane/ca --state-dir /var/lib/meshplane/state",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert started.returncode == 0, started.stderr
        probe = subprocess.run(
            [*podman, "exec", name, "python3", "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        logs = subprocess.run([*podman, "logs", name], capture_output=True, text=True, timeout=30, check=False)
        assert probe.returncode == 0 and probe.stdout.strip() == "200", f"not ready:\n{logs.stdout}{logs.stderr}"
        bundle = subprocess.run(
            [*podman, "exec", name, "ls", "/var/lib/meshplane/ca"], capture_output=True, text=True, timeout=30
        )
        assert "trust-bundle.pem" in bundle.stdout.split(), bundle.stdout
    finally:
        deadline = time.monotonic() + 30
        subprocess.run(
            [*podman, "rm", "-f", "-t", "2", name], capture_output=True, timeout=max(1, deadline - time.monotonic())
        )
