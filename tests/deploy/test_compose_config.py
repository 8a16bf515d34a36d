"""Cheap deployment checks (no engine): compose file, Dockerfiles, .dockerignore and the test harness's parsers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.stack import (
    COMPOSE_FILE,
    HOST_NETWORK_OVERRIDE,
    REPO_ROOT,
    BaseContext,
    Unavailable,
    debian_mirror,
    ensure_compose_cli,
    load_ray_node,
    pip_conf_for_image,
)

DOCKER_DIR = REPO_ROOT / "docker"


@pytest.fixture(scope="module")
def compose_cli() -> Path:
    try:
        return ensure_compose_cli()
    except Unavailable as exc:
        pytest.skip(str(exc))


def compose_config(cli: Path, tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                   files: tuple[Path, ...] = (COMPOSE_FILE,)) -> subprocess.CompletedProcess[str]:
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    file_args = [arg for path in files for arg in ("-f", str(path))]
    return subprocess.run(
        [str(cli), "--project-directory", str(REPO_ROOT), "--env-file", str(empty_env), *file_args, *args],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **(env or {})},
    )


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"], ["--profile", "cluster"]],
                         ids=["default", "gpu", "cluster"])
def test_compose_config_is_valid(compose_cli: Path, tmp_path: Path, profile: list[str]) -> None:
    result = compose_config(compose_cli, tmp_path, *profile, "config", "-q")
    assert result.returncode == 0, result.stderr


def _services(cli: Path, tmp_path: Path, *args: str, **kwargs) -> dict:
    result = compose_config(cli, tmp_path, *args, "config", "--format", "json", **kwargs)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def test_default_stack_is_indexer_then_read_only_api(compose_cli: Path, tmp_path: Path) -> None:
    services = _services(compose_cli, tmp_path)
    assert set(services) == {"indexer", "api"}
    indexer, api = services["indexer"], services["api"]
    assert api["depends_on"]["indexer"]["condition"] == "service_completed_successfully"
    assert indexer["init"] is True and api["init"] is True
    assert indexer["command"][:4] == ["python", "-m", "index", "pipeline"]
    assert api["command"][:3] == ["python", "-m", "service"]
    mounts = {m["target"]: m for m in api["volumes"]}
    assert mounts["/artifacts"]["source"] == "artifacts" and mounts["/artifacts"]["read_only"] is True
    assert {m["target"]: m["source"] for m in indexer["volumes"]}["/artifacts"] == "artifacts"
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert indexer["healthcheck"]["disable"] is True
    assert int(indexer["shm_size"]) >= 512 * 1024**2  # DataLoader workers share batches through /dev/shm
    assert api["environment"]["STL_ARTIFACTS"] == "/artifacts"
    assert api["environment"]["STL_ADMIN_TOKEN"] == ""  # no secret unless the environment gives one
    assert [p["target"] for p in api["ports"]] == [8000]
    # The API image has no torch (it serves the export with OpenVINO); only the indexer's trains.
    assert api["build"]["args"]["PIP_EXTRAS"] == "cpu,serve" and api["image"] == "shop-the-look:cpu"
    # ray: the same image runs the cluster profile's Ray nodes.
    assert indexer["build"]["args"]["PIP_EXTRAS"] == "cpu,serve,train,ray"
    assert indexer["image"] == "shop-the-look:cpu-indexer"
    assert api["environment"]["STL_RUNTIME"] == "auto" and api["environment"]["STL_PRECISION"] == "fp32"
    assert api["environment"]["STL_RELOAD_POLL_S"] == "0"  # replicas follow `current` only when asked


def test_settings_come_from_the_environment(compose_cli: Path, tmp_path: Path) -> None:
    env = {"STL_ADMIN_TOKEN": "s3cret", "STL_DEMO_SCENES": "40", "STL_DEMO_PRODUCTS": "30", "STL_PORT": "9123",
           "STL_DEVICE": "cpu", "STL_RELOAD_POLL_S": "2.5"}
    services = _services(compose_cli, tmp_path, env=env)
    api, indexer = services["api"], services["indexer"]
    assert api["environment"]["STL_ADMIN_TOKEN"] == "s3cret"
    assert api["environment"]["STL_RELOAD_POLL_S"] == "2.5"
    assert api["environment"]["STL_PORT"] == "9123" and api["command"][-1] == "9123"
    command = indexer["command"]
    assert command[command.index("--scenes") + 1] == "40"
    assert command[command.index("--products") + 1] == "30"
    assert command[command.index("--device") + 1] == "cpu"


def test_gpu_profile_reserves_an_nvidia_device(compose_cli: Path, tmp_path: Path) -> None:
    services = _services(compose_cli, tmp_path, "--profile", "gpu")
    assert {"indexer-gpu", "api-gpu"} <= set(services)
    for name in ("indexer-gpu", "api-gpu"):
        service = services[name]
        assert service["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["api-gpu"]["depends_on"]["indexer-gpu"]["condition"] == "service_completed_successfully"
    # Own volumes: a `--profile gpu up` of everything must not race the CPU indexer.
    gpu_sources = {m["source"] for m in services["indexer-gpu"]["volumes"]}
    cpu_sources = {m["source"] for m in services["indexer"]["volumes"]}
    assert not gpu_sources & cpu_sources


def _port_range(published: str) -> range:
    first, _, last = str(published).partition("-")
    return range(int(first), int(last or first) + 1)


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_api_scales_to_replicas_on_a_host_port_range(compose_cli: Path, tmp_path: Path, replicas: int) -> None:
    """`up --scale api=N` (or STL_API_REPLICAS=N): no fixed name or host port that two replicas would share."""
    services = _services(compose_cli, tmp_path, "--profile", "gpu", env={"STL_API_REPLICAS": str(replicas)})
    api = services["api"]
    assert api["deploy"]["replicas"] == replicas
    assert "container_name" not in api
    [port] = api["ports"]
    assert port["target"] == 8000
    cpu_ports = _port_range(port["published"])
    assert len(cpu_ports) >= replicas and cpu_ports.start == 8000  # the first replica keeps localhost:8000
    # The GPU API publishes outside the CPU replicas' range: both profiles can run at once.
    gpu_ports = {p for entry in services["api-gpu"]["ports"] for p in _port_range(entry["published"])}
    assert not gpu_ports & set(cpu_ports)
    assert "deploy" not in services["indexer"] or services["indexer"]["deploy"].get("replicas") in (None, 1)


def test_host_network_override_drops_published_ports(compose_cli: Path, tmp_path: Path) -> None:
    services = _services(compose_cli, tmp_path, env={"STL_PORT": "9124"},
                         files=(COMPOSE_FILE, HOST_NETWORK_OVERRIDE))
    for name in ("indexer", "api"):
        assert services[name]["network_mode"] == "host"
    assert not services["api"].get("ports")
    assert services["api"]["command"][-3:] == ["127.0.0.1", "--port", "9124"]


CLUSTER_NODES = ("ray-head", "ray-worker-1", "ray-worker-2")
CLUSTER_JOB = "indexer-cluster"


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_default_stack_starts_no_cluster(compose_cli: Path, tmp_path: Path) -> None:
    default = _services(compose_cli, tmp_path)
    assert not {*CLUSTER_NODES, CLUSTER_JOB} & set(default)
    gpu = _services(compose_cli, tmp_path, "--profile", "gpu")
    assert not {*CLUSTER_NODES, CLUSTER_JOB} & set(gpu)
    cluster = _services(compose_cli, tmp_path, "--profile", "cluster")
    for name in (*CLUSTER_NODES, CLUSTER_JOB):
        assert cluster[name]["profiles"] == ["cluster"]


def test_cluster_profile_is_a_head_two_workers_and_a_job_pointing_at_the_head(compose_cli: Path,
                                                                                tmp_path: Path) -> None:
    services = _services(compose_cli, tmp_path, "--profile", "cluster")
    head, job = services["ray-head"], services[CLUSTER_JOB]
    workers = [services[name] for name in CLUSTER_NODES[1:]]
    assert [name for name, service in services.items() if service["command"][:2] == ["stl-ray-node", "head"]] \
        == ["ray-head"]
    assert sorted(name for name, service in services.items()
                  if service["command"][:2] == ["stl-ray-node", "worker"]) == ["ray-worker-1", "ray-worker-2"]
    # The head coordinates only: every actor runs on a worker.
    assert _option(head["command"], "--cpus") == "0"
    assert all(int(_option(worker["command"], "--cpus")) >= 2 for worker in workers)  # 2+2 CPUs: 3 actors
    head_address = f"ray-head:{_option(head['command'], '--port')}"
    # The job: the pipeline on the Ray engine, at the head, as a driver that waits for both workers.
    assert job["command"][:2] == ["stl-ray-node", "driver"]
    assert _option(job["command"], "--wait-workers") == str(len(workers))
    pipeline = job["command"][job["command"].index("--") + 1:]
    assert pipeline[:4] == ["python", "-m", "index", "pipeline"]
    assert _option(pipeline, "--engine") == "ray" and _option(pipeline, "--ray-address") == head_address
    for service in (head, *workers, job):
        assert service["environment"]["STL_RAY_ADDRESS"] == head_address
        assert service["environment"]["RAY_USAGE_STATS_ENABLED"] == "0"
        assert service["image"] == "shop-the-look:cpu-indexer"
        assert "ray" in service["build"]["args"]["PIP_EXTRAS"].split(",")
        # Ray's object store lives in /dev/shm: it must fit there (docker's default is 64 MB).
        assert int(service["shm_size"]) > int(service["environment"]["STL_RAY_OBJECT_STORE_BYTES"])
    assert "stl-ray-node" in " ".join(head["healthcheck"]["test"])
    for worker in workers:
        assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
        assert worker["healthcheck"]["disable"] is True  # not the image's /readyz probe
    assert job["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert {"ray-worker-1", "ray-worker-2"} <= set(job["depends_on"])
    # The job's pipeline is the default indexer's, plus the engine: the two cannot drift apart.
    assert pipeline[:pipeline.index("--engine")] == services["indexer"]["command"]


def test_cluster_volumes_are_its_own_and_read_only_on_the_nodes(compose_cli: Path, tmp_path: Path) -> None:
    services = _services(compose_cli, tmp_path, "--profile", "cluster")
    job_mounts = {m["target"]: m for m in services[CLUSTER_JOB]["volumes"]}
    assert job_mounts["/data"]["source"] == "data-cluster" and not job_mounts["/data"].get("read_only")
    assert job_mounts["/artifacts"]["source"] == "artifacts-cluster"
    for name in CLUSTER_NODES:  # the nodes read images and checkpoints; only the driver writes
        [mount] = services[name]["volumes"]
        assert (mount["source"], mount["target"], mount["read_only"]) == ("data-cluster", "/data", True)
    default_sources = {m["source"] for name in ("indexer", "api") for m in services[name]["volumes"]}
    assert not default_sources & {m["source"] for m in job_mounts.values()}


def _claimed_ports(start_command: list[str]) -> set[int]:
    """Every port a `ray start` command line binds: its --*-port flags, worker ranges expanded."""
    flags = dict(arg.split("=", 1) for arg in start_command if arg.startswith("--") and "=" in arg)
    ports = {int(value) for flag, value in flags.items() if flag.endswith("-port") and "worker-port" not in flag}
    if "--min-worker-port" in flags:
        ports |= set(range(int(flags["--min-worker-port"]), int(flags["--max-worker-port"]) + 1))
    return ports


def test_cluster_nodes_own_disjoint_port_blocks(compose_cli: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """On the host network the four Ray nodes share one port space: no two may claim the same port."""
    ray_node = load_ray_node()
    monkeypatch.setattr(ray_node, "ray_cli", lambda: "ray")
    services = _services(compose_cli, tmp_path, "--profile", "cluster")
    claimed: dict[int, str] = {}
    for name in (*CLUSTER_NODES, CLUSTER_JOB):
        command = services[name]["command"]
        node_args = command[1:command.index("--")] if "--" in command else command[1:]
        start = ray_node.start_command(ray_node.get_args_parser().parse_args(node_args))
        ports = _claimed_ports(start)
        assert len(ports) >= 100, start  # the worker range came through
        clash = {port: claimed[port] for port in ports if port in claimed}
        assert not clash, f"{name} claims ports of {clash}"
        claimed.update(dict.fromkeys(ports, name))
    # Outside Ray's own default worker range (10002-19999) and Linux's ephemeral ports, the GCS aside.
    gcs = int(_option(services["ray-head"]["command"], "--port"))
    assert all(20000 <= port < 32768 for port in set(claimed) - {gcs})


def test_host_network_override_points_the_cluster_at_loopback(compose_cli: Path, tmp_path: Path) -> None:
    env = {"STL_PORT": "9125", "STL_RAY_HEAD": "127.0.0.1", "STL_RAY_PORT": "26399"}
    services = _services(compose_cli, tmp_path, "--profile", "cluster", env=env,
                         files=(COMPOSE_FILE, HOST_NETWORK_OVERRIDE))
    for name in (*CLUSTER_NODES, CLUSTER_JOB):
        assert services[name]["network_mode"] == "host"
        assert services[name]["environment"]["STL_RAY_ADDRESS"] == "127.0.0.1:26399"
    assert _option(services["ray-head"]["command"], "--port") == "26399"
    assert _option(services[CLUSTER_JOB]["command"], "--ray-address") == "127.0.0.1:26399"


def dockerfile_instructions(text: str) -> list[str]:
    """One string per instruction: comments dropped, backslash continuation lines joined."""
    instructions: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
        else:
            instructions.append(pending)
            pending = ""
    return instructions


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_build_with_the_classic_builder(name: str) -> None:
    text = (DOCKER_DIR / name).read_text()
    instructions = dockerfile_instructions(text)
    assert not re.search(r"^\s*#\s*syntax=", text, re.MULTILINE)
    # BuildKit-only: cache/secret mounts, heredocs.
    assert not [line for line in instructions if "--mount" in line or "<<" in line]
    assert instructions[0].startswith("ARG BASE_IMAGE=") and instructions[1] == "FROM ${BASE_IMAGE}"
    assert any(line.startswith("USER ") and line != "USER root" for line in instructions)
    assert "/readyz" in text and "HEALTHCHECK" in text
    # Dependencies are installed from pyproject.toml before the source is copied, so edits keep the cache.
    install_deps = next(i for i, line in enumerate(instructions) if "pip install -r requirements.txt" in line)
    copy_source = next(i for i, line in enumerate(instructions) if line.startswith("COPY training"))
    assert install_deps < copy_source
    assert "ADMIN_TOKEN" not in text


def test_cpu_image_installs_stl_ray_node() -> None:
    instructions = dockerfile_instructions((DOCKER_DIR / "Dockerfile").read_text())
    assert "COPY docker/ray_node.py /usr/local/bin/stl-ray-node" in instructions
    assert any("chmod 0755 /usr/local/bin/stl-ray-node" in line for line in instructions)


def test_gpu_image_installs_the_gpu_extra_only() -> None:
    gpu, cpu = (DOCKER_DIR / "Dockerfile.gpu").read_text(), (DOCKER_DIR / "Dockerfile").read_text()
    assert "ARG PIP_EXTRAS=gpu" in gpu and "ARG PIP_EXTRAS=cpu" in cpu
    assert "ARG BASE_IMAGE=nvidia/cuda:" in gpu


@pytest.mark.parametrize(("extra", "wanted", "unwanted"), [("cpu,train", "faiss-cpu", "faiss-gpu"),
                                                          ("gpu,train", "faiss-gpu", "faiss-cpu")])
def test_pyproject_requirements_per_extra(extra: str, wanted: str, unwanted: str) -> None:
    result = subprocess.run([sys.executable, str(DOCKER_DIR / "pyproject_requirements.py"),
                             str(REPO_ROOT / "pyproject.toml"), extra], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    names = [re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0] for line in result.stdout.splitlines()]
    assert "torch" in names and wanted in names and unwanted not in names


def test_the_serve_extra_installs_no_torch() -> None:
    result = subprocess.run([sys.executable, str(DOCKER_DIR / "pyproject_requirements.py"),
                             str(REPO_ROOT / "pyproject.toml"), "cpu,serve"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    names = {re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0] for line in result.stdout.splitlines()}
    assert {"fastapi", "uvicorn", "openvino", "faiss-cpu"} <= names and not names & {"torch", "torchvision", "timm"}


def test_pyproject_requirements_rejects_an_unknown_extra() -> None:
    result = subprocess.run([sys.executable, str(DOCKER_DIR / "pyproject_requirements.py"),
                             str(REPO_ROOT / "pyproject.toml"), "cpu,nope"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "nope" in result.stderr


def test_dockerignore_keeps_data_and_environments_out() -> None:
    patterns = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "data", "artifacts", "runs", "benchmarks/results", ".env"} <= patterns
    assert not {"training", "index", "service", "pyproject.toml", "docker"} & patterns


def test_debian_mirror_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n")
    assert debian_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text("# comment\ndeb [arch=amd64] http://one.example/debian bookworm main\n")
    assert debian_mirror(tmp_path) == "http://one.example/debian"
    assert debian_mirror(tmp_path / "missing") == "http://deb.debian.org/debian"


def test_pip_conf_keeps_only_what_an_image_can_reach() -> None:
    text = pip_conf_for_image({"extra-index-url": "file:///opt/pypi/simple https://mirror.example/simple",
                               "index-url": "file:///nowhere", "default-timeout": "180"})
    assert "file://" not in text
    assert "extra-index-url = https://mirror.example/simple" in text
    assert "index-url = file" not in text and "timeout = 180" in text
    assert "cert = /etc/ssl/certs/ca-certificates.crt" in text


def test_base_image_digest_follows_its_inputs() -> None:
    first = BaseContext("http://a/debian", "", "[global]\n", {"x.crt": b"one"})
    assert first.digest() == BaseContext("http://a/debian", "", "[global]\n", {"x.crt": b"one"}).digest()
    assert first.digest() != BaseContext("http://a/debian", "", "[global]\n", {"x.crt": b"two"}).digest()
    assert first.digest() != BaseContext("http://b/debian", "", "[global]\n", {"x.crt": b"one"}).digest()
