"""docker-compose.yml and the Dockerfile agree with each other and with makima's
configuration: every service a worker needs, addresses that point at services
that exist, credentials that match, a worker that can be scaled (no fixed name,
no host port). `docker compose config` validates the file when the compose
plugin is installed (there is no Docker engine in the test environment).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_images(compose: dict) -> None:
    services = compose["services"]
    assert {"postgres", "temporal", "temporal-ui", "temporal-setup", "worker"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["temporal"]["image"].startswith("temporalio/auto-setup:")
    assert services["temporal-ui"]["image"].startswith("temporalio/ui:")
    assert services["worker"]["build"] == "."
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"


def test_addresses_and_credentials_are_consistent(compose: dict) -> None:
    s = compose["services"]
    pg = s["postgres"]["environment"]
    temporal = s["temporal"]["environment"]
    assert temporal["DB"] == "postgres12" and temporal["POSTGRES_SEEDS"] == "postgres"
    assert (temporal["POSTGRES_USER"], temporal["POSTGRES_PWD"]) == (
        pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"])
    assert "7233:7233" in s["temporal"]["ports"] and "8080:8080" in s["temporal-ui"]["ports"]
    for name in ("temporal-ui", "temporal-setup", "worker"):
        assert s[name]["environment"]["TEMPORAL_ADDRESS"] == "temporal:7233", name
    url = urlparse(s["worker"]["environment"]["DATABASE_URL"])
    assert (url.hostname, url.port, url.username, url.password, url.path) == (
        "postgres", 5432, pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], "/" + pg["POSTGRES_DB"])
    setup = " ".join(s["temporal-setup"]["command"])
    for attribute, kind in (("MakimaStatus", "Keyword"), ("MakimaOwner", "Keyword"),
                            ("MakimaGeneration", "Int")):
        assert f"--name {attribute} --type {kind}" in setup


def test_the_worker_scales_and_its_image_builds_from_files_that_exist(compose: dict) -> None:
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    assert 'CMD ["python", "worker.py"]' in dockerfile
    # the worker refuses to start without a working sandbox
    assert "bubblewrap" in dockerfile
    assert {"seccomp=unconfined", "apparmor=unconfined"} <= set(worker["security_opt"])


def test_the_image_runs_the_default_executor_as_a_user_with_a_home_of_its_own(
        compose: dict) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install --no-cache-dir '.[claude]'" in dockerfile  # the default executor
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "Claude Code refuses bypass as root"
    assert "VOLUME /var/lib/makima" in dockerfile
    worker = compose["services"]["worker"]
    assert worker["environment"]["MAKIMA_HOME"] == "/var/lib/makima"
    # every replica has its own home: no named or host volume is mounted over it
    assert not any(str(volume).split(":")[1:2] == ["/var/lib/makima"]
                   for volume in worker.get("volumes", []))
    assert any(str(volume).endswith(":/repos") for volume in worker["volumes"])


def test_docker_compose_config_when_available() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True,
                                        check=False).returncode != 0:
        pytest.skip("no docker compose plugin here; the file was checked as YAML above")
    done = subprocess.run([docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config",
                           "--quiet"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
