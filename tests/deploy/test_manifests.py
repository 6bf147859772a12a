"""The Kubernetes manifests (deploy/k8s, docs/OPERATIONS.md "Kubernetes").

Each overlay is rendered by the real `kubectl kustomize`; every document is validated against
Kubernetes 1.32's API schemas in strict mode (kubernetes-validate: an unknown field, a wrong type
or a missing required field fails), the ServiceMonitor, a CRD that kubernetes-validate has no
schema for, against servicemonitor.schema.json (the CRD's fields that we use, strict too). Then
what the deployment depends on is checked across the documents (probes on the plaintext health
port, TLS and tokens on, Services, PDB and HPA pointing at the pods, the grace period), the
`kubectl create secret` commands of docs/OPERATIONS.md are run, and the server binary is
started with the Deployment's own command line and the Secrets' files where the pod mounts them.
What is not checked: anything only a cluster knows (that the image runs on its nodes, that the
Secrets and the claim exist, that an adapter serves the HPA's metric).

Run (tools/test.sh does):
  $(tools/venv.sh path)/bin/python -m pytest -q -p no:cacheprovider tests/deploy
kubectl: the one on PATH, else the venv's (tools/requirements-kubectl.txt). LMHEAD_SERVER: the
server binary for the last test (default bazel-bin/server/lmhead_server).
"""

import base64
import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy/k8s"
OVERLAYS = ["cpu", "gpu"]
KUBERNETES_VERSION = "1.32.0"
SERVER = Path(os.environ.get("LMHEAD_SERVER", REPO / "bazel-bin/server/lmhead_server"))
SERVICE_MONITOR_SCHEMA = json.loads(
    (Path(__file__).parent / "servicemonitor.schema.json").read_text())
# What the headless Service's DNS name is documented as (clients dial dns:///NAME:50051).
HEADLESS_DNS = "lmhead-headless.lmhead.svc.cluster.local"


def kubectl() -> str:
    found = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    if not Path(found).exists():
        pytest.fail("no kubectl: on PATH or in the venv (tools/venv.sh ensure installs it)")
    return found


def render(directory: Path) -> List[dict]:
    """`kubectl kustomize DIRECTORY`, parsed; a kustomize error fails with its message."""
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, render(K8S / "overlays" / request.param)


# ---- checks: each returns the problems it found, [] when there are none ----


def schema_problems(docs: List[dict]) -> List[str]:
    problems = []
    for doc in docs:
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("apiVersion") == "monitoring.coreos.com/v1" and doc.get("kind") == \
                "ServiceMonitor":
            for error in jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA).iter_errors(doc):
                path = ".".join(str(p) for p in error.absolute_path)
                problems.append(f"{what}: {path}: {error.message} (servicemonitor.schema.json)")
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            problems.append(f"{what}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            # kubernetes-validate's command line only warns here; an unknown kind is an error.
            problems.append(f"{what}: {error.message}")
    return problems


class Manifests:
    """The rendered documents, by kind."""

    def __init__(self, docs: List[dict]):
        self.docs = docs

    def all(self, kind: str) -> List[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str) -> dict:
        found = self.all(kind)
        assert len(found) == 1, f"expected one {kind}, found {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict:
        return self.one("Deployment")

    @property
    def pod(self) -> dict:
        return self.deployment["spec"]["template"]

    @property
    def container(self) -> dict:
        containers = self.pod["spec"]["containers"]
        assert len(containers) == 1, f"expected one container, found {len(containers)}"
        return containers[0]

    def flag(self, name: str) -> Optional[str]:
        """The value of --NAME=VALUE in the container's args (the last one wins, as in absl)."""
        value = None
        for arg in self.container.get("args", []):
            if arg == f"--{name}":
                value = "true"
            elif arg.startswith(f"--{name}="):
                value = arg.split("=", 1)[1]
        return value

    def container_port(self, name_or_number) -> Optional[int]:
        for port in self.container.get("ports", []):
            if name_or_number in (port.get("name"), port["containerPort"]):
                return port["containerPort"]
        return None


def selects(selector: Dict[str, str], labels: Dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def deployment_problems(m: Manifests) -> List[str]:
    problems = []
    args = m.container.get("args", [])
    # The image's entry point adds --allow_insecure: the pod must run the server itself.
    if m.container.get("command") != ["/usr/local/bin/lmhead_server"]:
        problems.append(f"command: expected [/usr/local/bin/lmhead_server] (the image's entry "
                        f"point passes --allow_insecure), got {m.container.get('command')}")
    if m.flag("host") != "0.0.0.0":
        problems.append(f"args: expected --host=0.0.0.0, got --host={m.flag('host')}")
    if any(a.startswith("--allow_insecure") and a != "--allow_insecure=false" for a in args):
        problems.append("args: --allow_insecure in a secure overlay")
    volumes = {v["name"]: v for v in m.pod["spec"].get("volumes", [])}
    mounts = {x["mountPath"]: x for x in m.container.get("volumeMounts", [])}
    secrets = {"tls_cert": ("lmhead-tls", "tls.crt"), "tls_key": ("lmhead-tls", "tls.key"),
               "auth_token_file": ("lmhead-tokens", "tokens")}
    for flag, (secret, key) in secrets.items():
        path = m.flag(flag)
        if path is None:
            problems.append(f"args: no --{flag} (the base is TLS and tokens)")
            continue
        mount = mounts.get(str(Path(path).parent))
        volume = volumes.get(mount["name"]) if mount else None
        source = (volume or {}).get("secret", {})
        items = {i["path"]: i["key"] for i in source.get("items", [])}
        if source.get("secretName") != secret or items.get(Path(path).name, Path(path).name) \
                != key or not mount.get("readOnly"):
            problems.append(f"--{flag}={path}: expected key {key} of Secret {secret} mounted "
                            "read-only in that directory")
    health = m.flag("health_port")
    if health is None or m.container_port("health") != int(health):
        problems.append(f"args: --health_port={health} is not the container port 'health' "
                        f"({m.container_port('health')})")
    if m.flag("metrics_port") is None or m.container_port("metrics") != \
            int(m.flag("metrics_port")):
        problems.append(f"args: --metrics_port={m.flag('metrics_port')} is not the container "
                        f"port 'metrics' ({m.container_port('metrics')})")
    if m.container_port("grpc") != int(m.flag("port") or 50051):
        problems.append(f"args: --port={m.flag('port')} is not the container port 'grpc'")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = m.container.get(probe)
        if spec is None:
            problems.append(f"{probe}: missing")
            continue
        other = sorted(set(spec) & {"httpGet", "tcpSocket", "exec"})
        port = spec.get("grpc", {}).get("port")
        if other or health is None or port != int(health):
            problems.append(f"{probe}: expected a grpc probe on the health port {health} (the "
                            f"kubelet cannot speak TLS to the main port), got {other or port}")
    sleep = m.container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get(
        "seconds", 0)
    grace = int(m.flag("shutdown_grace_seconds") or 30)
    termination = m.pod["spec"].get("terminationGracePeriodSeconds", 30)
    if termination <= sleep + grace:
        problems.append(f"terminationGracePeriodSeconds {termination} does not exceed the "
                        f"preStop sleep ({sleep}) plus --shutdown_grace_seconds ({grace})")
    pod_security = m.pod["spec"].get("securityContext", {})
    security = {**pod_security, **m.container.get("securityContext", {})}
    expected = {"runAsNonRoot": True, "runAsUser": 10001, "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False}
    for key, value in expected.items():
        if security.get(key) != value:
            problems.append(f"securityContext.{key}: expected {value}, got {security.get(key)}")
    if security.get("privileged"):
        problems.append("securityContext.privileged: true")
    if security.get("capabilities", {}).get("drop") != ["ALL"] or \
            security.get("capabilities", {}).get("add"):
        problems.append(f"securityContext.capabilities: expected drop [ALL] and no add, got "
                        f"{security.get('capabilities')}")
    if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"securityContext.seccompProfile: expected RuntimeDefault, got "
                        f"{security.get('seccompProfile')}")
    resources = m.container.get("resources", {})
    for part, keys in (("requests", ("cpu", "memory")), ("limits", ("memory",))):
        for key in keys:
            if key not in resources.get(part, {}):
                problems.append(f"resources.{part}.{key}: missing")
    if not selects(m.deployment["spec"]["selector"].get("matchLabels", {}),
                   m.pod["metadata"].get("labels", {})):
        problems.append("Deployment selector does not match its pod labels")
    return problems


def service_problems(m: Manifests) -> List[str]:
    problems = []
    labels = m.pod["metadata"].get("labels", {})
    for service in m.all("Service"):
        name = service["metadata"]["name"]
        if not selects(service["spec"].get("selector", {}), labels):
            problems.append(f"Service {name}: selector does not match the pod labels")
        for port in service["spec"]["ports"]:
            if m.container_port(port.get("targetPort", port["port"])) is None:
                problems.append(f"Service {name}: targetPort {port.get('targetPort')} is no "
                                "container port")
    headless = [s for s in m.all("Service") if s["spec"].get("clusterIP") == "None"]
    if len(headless) != 1:
        problems.append(f"expected one headless Service (clusterIP: None), got {len(headless)}")
    else:
        service = headless[0]
        dns = f"{service['metadata']['name']}.{service['metadata'].get('namespace')}" \
              ".svc.cluster.local"
        if dns != HEADLESS_DNS:
            problems.append(f"headless Service: its DNS name is {dns}, documented {HEADLESS_DNS}")
        grpc = [p for p in service["spec"]["ports"] if p.get("name") == "grpc"]
        if not grpc or grpc[0]["port"] != 50051 or \
                m.container_port(grpc[0].get("targetPort")) != int(m.flag("port") or 50051):
            problems.append("headless Service: expected port 'grpc' 50051 to the server's --port")
        if service["spec"].get("publishNotReadyAddresses"):
            problems.append("headless Service: publishNotReadyAddresses sends clients to pods "
                            "that are loading or draining")
    return problems


def disruption_and_scaling_problems(m: Manifests) -> List[str]:
    problems = []
    labels = m.pod["metadata"].get("labels", {})
    pdb = m.one("PodDisruptionBudget")
    if not selects(pdb["spec"]["selector"].get("matchLabels", {}), labels):
        problems.append("PodDisruptionBudget: selector does not match the pod labels")
    hpa = m.one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    want = {"apiVersion": "apps/v1", "kind": "Deployment",
            "name": m.deployment["metadata"]["name"]}
    if {k: target.get(k) for k in want} != want:
        problems.append(f"HorizontalPodAutoscaler: scaleTargetRef {target}, expected {want}")
    metrics = [(x["type"], x.get("pods", {}).get("metric", {}).get("name"))
               for x in hpa["spec"].get("metrics", [])]
    if metrics != [("Pods", "lmhead_queue_tokens")]:
        problems.append(f"HorizontalPodAutoscaler: metrics {metrics}, expected the Pods metric "
                        "lmhead_queue_tokens")
    if hpa["spec"].get("minReplicas", 1) < 2:
        problems.append("HorizontalPodAutoscaler: minReplicas under 2 leaves no pod while one "
                        "drains")
    monitor = m.one("ServiceMonitor")
    selector = monitor["spec"]["selector"].get("matchLabels", {})
    chosen = [s for s in m.all("Service") if selects(selector, s["metadata"].get("labels", {}))]
    if len(chosen) != 1:
        problems.append(f"ServiceMonitor: selects {len(chosen)} Services, expected one (each "
                        "pod would be scraped once per Service)")
    else:
        ports = {p.get("name"): p for p in chosen[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            port = ports.get(endpoint.get("port"))
            if port is None or m.container_port(port.get("targetPort")) != \
                    int(m.flag("metrics_port") or -1):
                problems.append(f"ServiceMonitor: endpoint port {endpoint.get('port')} does not "
                                "reach the server's --metrics_port")
            if endpoint.get("path", "/metrics") != "/metrics":
                problems.append(f"ServiceMonitor: path {endpoint.get('path')}, the server "
                                "serves /metrics")
    return problems


def problems(docs: List[dict]) -> List[str]:
    m = Manifests(docs)
    return (schema_problems(docs) + deployment_problems(m) + service_problems(m)
            + disruption_and_scaling_problems(m))


# ---- the tests ----


def test_overlays_render_valid_documents(overlay):
    name, docs = overlay
    kinds = sorted(f"{d['apiVersion']} {d['kind']}" for d in docs)
    assert kinds == ["apps/v1 Deployment", "autoscaling/v2 HorizontalPodAutoscaler",
                     "monitoring.coreos.com/v1 ServiceMonitor",
                     "policy/v1 PodDisruptionBudget", "v1 Service", "v1 Service"], name
    assert all(d["metadata"].get("namespace") == "lmhead" for d in docs), name
    found = schema_problems(docs)
    assert not found, f"overlays/{name}:\n" + "\n".join(found)


def test_overlays_are_secure_probed_and_consistent(overlay):
    name, docs = overlay
    found = problems(docs)
    assert not found, f"overlays/{name}:\n" + "\n".join(found)


def test_gpu_and_cpu_overlays_differ_where_they_should():
    gpu = Manifests(render(K8S / "overlays/gpu"))
    cpu = Manifests(render(K8S / "overlays/cpu"))
    resources = gpu.container["resources"]
    assert resources["limits"].get("nvidia.com/gpu") == 1
    assert resources["requests"].get("nvidia.com/gpu") == 1
    assert gpu.flag("device") == "cuda:0"
    assert gpu.container["image"] == "lmhead:cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        gpu.pod["spec"].get("tolerations", [])
    assert "nvidia.com/gpu" not in json.dumps(cpu.container["resources"])
    assert cpu.flag("device") in (None, "cpu")
    assert cpu.container["image"] == "lmhead:cpu"
    assert not cpu.pod["spec"].get("tolerations")

    def gib(quantity: str) -> float:
        number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi)", quantity).groups()
        return float(number) / (1024 if unit == "Mi" else 1)

    assert gib(gpu.container["resources"]["limits"]["memory"]) > \
        gib(cpu.container["resources"]["limits"]["memory"])
    threads = {e["name"]: e["value"] for e in cpu.container.get("env", [])}.get("OMP_NUM_THREADS")
    assert threads == str(cpu.container["resources"]["requests"]["cpu"])


BROKEN = {
    "a misspelt field": (lambda m: m.container.__setitem__(
        "readinesProbe", m.container.pop("readinessProbe")), "'readinesProbe' was unexpected"),
    "a probe on the TLS port": (lambda m: m.container["livenessProbe"]["grpc"].__setitem__(
        "port", 50051), "livenessProbe: expected a grpc probe on the health port"),
    "--allow_insecure": (lambda m: m.container["args"].append("--allow_insecure"),
                         "--allow_insecure in a secure overlay"),
    "the image's entry point": (lambda m: m.container.pop("command"), "command: expected"),
    "no TLS key": (lambda m: m.container["args"].remove("--tls_key=/etc/lmhead/tls/tls.key"),
                   "no --tls_key"),
    "a short grace period": (lambda m: m.pod["spec"].__setitem__(
        "terminationGracePeriodSeconds", 30), "does not exceed"),
    "a writable root": (lambda m: m.container["securityContext"].__setitem__(
        "readOnlyRootFilesystem", False), "readOnlyRootFilesystem"),
    "a PDB for other pods": (lambda m: m.one("PodDisruptionBudget")["spec"]["selector"].
                             __setitem__("matchLabels", {"app": "other"}), "PodDisruptionBudget"),
    "an HPA on CPU": (lambda m: m.one("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]
                      ["metric"].__setitem__("name", "cpu"), "lmhead_queue_tokens"),
    "a headless Service with a cluster IP": (
        lambda m: [s["spec"].pop("clusterIP") for s in m.all("Service")
                   if s["spec"].get("clusterIP") == "None"], "one headless Service"),
    "a ServiceMonitor field the CRD lacks": (
        lambda m: m.one("ServiceMonitor")["spec"]["endpoints"][0].__setitem__("portName", "x"),
        "servicemonitor.schema.json"),
    "a ServiceMonitor on the gRPC port": (
        lambda m: m.one("ServiceMonitor")["spec"]["endpoints"][0].__setitem__("port", "grpc"),
        "does not reach the server's --metrics_port"),
    "an unknown kind": (lambda m: m.docs.append(
        {"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "x"}}),
        "Couldn't find schema for kind Thing"),
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_the_checks_catch_a_broken_manifest(breakage):
    """Each check fails on the mistake it is there for (the GPU overlay, broken one way)."""
    docs = copy.deepcopy(render(K8S / "overlays/gpu"))
    assert problems(docs) == []
    mutate, expected = BROKEN[breakage]
    mutate(Manifests(docs))
    found = problems(docs)
    assert any(expected in p for p in found), found


def test_a_kustomize_error_fails_the_render(tmp_path):
    shutil.copytree(K8S, tmp_path / "k8s")
    base = tmp_path / "k8s/base/kustomization.yaml"
    base.write_text(base.read_text().replace("servicemonitor.yaml", "servicemonitors.yaml"))
    with pytest.raises(AssertionError, match="servicemonitors.yaml"):
        render(tmp_path / "k8s/overlays/cpu")


# ---- the Secrets, as docs/OPERATIONS.md makes them, and the server with the pod's flags ----


def documented_block() -> List[str]:
    """The commands of docs/OPERATIONS.md's block that makes the namespace and the Secrets,
    continuation lines joined, comments left out."""
    text = (REPO / "docs/OPERATIONS.md").read_text()
    block = re.search(r"^ *kubectl create namespace lmhead\n(.*?)\n\n", text,
                      re.MULTILINE | re.DOTALL)
    assert block, "docs/OPERATIONS.md: no block starting with `kubectl create namespace lmhead`"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if not line.strip().startswith("#")]


def documented_secrets(directory: Path) -> Dict[str, dict]:
    """The Secrets that docs/OPERATIONS.md's `kubectl -n lmhead create secret` commands make
    (up to a pipe), run in DIRECTORY (server.pem, server.key and tokens there) with
    --dry-run=client; the same Secret made twice (created, then replaced) must come out the
    same."""
    text = (REPO / "docs/OPERATIONS.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"^ *(kubectl -n lmhead create secret [^|\n]*)", text, re.MULTILINE)
    assert len(commands) >= 2, commands
    secrets = {}
    for command in commands:
        words = shlex.split(command)
        result = subprocess.run([kubectl(), *words[1:], "--dry-run=client", "-o", "yaml"],
                                cwd=directory, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{command}: {result.stderr}"
        secret = yaml.safe_load(result.stdout)
        secret["metadata"].pop("creationTimestamp", None)  # null in a dry run
        name = secret["metadata"]["name"]
        assert secrets.setdefault(name, secret) == secret, f"{command}: not the first {name}"
    assert sorted(secrets) == ["lmhead-tls", "lmhead-tokens"], sorted(secrets)
    return secrets


@pytest.fixture(scope="module")
def secret_files(tmp_path_factory):
    """The files docs/OPERATIONS.md's commands make: ca.pem, server.pem, server.key, tokens."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    directory = tmp_path_factory.mktemp("secrets")
    for command in documented_block():
        if not command.startswith("kubectl "):
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=directory,
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, f"{command}: {result.stderr}"
    return directory


def test_the_documented_secret_commands_make_what_the_pods_mount(secret_files):
    secrets = documented_secrets(secret_files)
    found = schema_problems(list(secrets.values()))
    assert not found, "\n".join(found)
    assert secrets["lmhead-tls"]["type"] == "kubernetes.io/tls"
    assert sorted(secrets["lmhead-tls"]["data"]) == ["tls.crt", "tls.key"]
    assert sorted(secrets["lmhead-tokens"]["data"]) == ["tokens"]
    for secret in secrets.values():
        assert secret["metadata"].get("namespace") == "lmhead"


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_server_starts_with_the_pods_command_line(name, secret_files, tmp_path):
    """The Deployment's command and args, as the container would run them: the Secrets'
    files where the pod mounts them, a small head where the claim is mounted. Changed only:
    ports to free ones (0), mount paths to a folder here, and --device=cuda:N to cpu on this
    machine without a GPU. Then: the health port answers SERVING in plaintext, the main port
    needs TLS and a token, /metrics has the HPA's gauge."""
    if not SERVER.exists():
        if "LMHEAD_SERVER" in os.environ:
            pytest.fail(f"LMHEAD_SERVER={SERVER} does not exist")
        pytest.skip(f"{SERVER} is missing: run `bazel build //server:lmhead_server`")
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from safetensors.numpy import save_file
    import numpy as np

    m = Manifests(render(K8S / "overlays" / name))
    secrets = documented_secrets(secret_files)
    volumes = {v["name"]: v for v in m.pod["spec"]["volumes"]}
    moved = {}  # mount path in the pod -> folder here
    for mount in m.container["volumeMounts"]:
        here = tmp_path / mount["name"]
        here.mkdir()
        moved[mount["mountPath"]] = here
        source = volumes[mount["name"]].get("secret")
        if source:
            data = secrets[source["secretName"]]["data"]
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                (here / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))

    def local(path: str) -> Path:
        for inside, here in moved.items():
            if path.startswith(inside + "/"):
                return here / path[len(inside) + 1:]
        raise AssertionError(f"{path} is on no volume the pod mounts")

    args = []
    for arg in m.container["args"]:
        flag, _, value = arg.partition("=")
        if flag in ("--port", "--health_port", "--metrics_port"):
            value = "0"
        elif flag in ("--tls_cert", "--tls_key", "--tls_client_ca", "--auth_token_file"):
            value = str(local(value))
        elif flag == "--model":
            model, _, path = value.partition("=")
            weights = local(path)
            rng = np.random.default_rng(0)
            save_file({"w_out.weight": rng.standard_normal((100, 16), dtype=np.float32),
                       "norm.weight": np.ones(16, dtype=np.float32)}, str(weights))
            weights.with_suffix(".json").write_text(json.dumps(
                {"name": "default", "layer_norm": {"name": "rms", "bias": False}, "bias": False}))
            value = f"{model}={weights}"
        elif flag == "--device":
            value = re.sub(r"cuda(:\d+)?", "cpu", value)
        args.append(f"{flag}={value}" if value else flag)
    port_file = tmp_path / "port"
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([*m.container["command"], *args, f"--port_file={port_file}"],
                                   executable=str(SERVER), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert process.poll() is None, f"the server exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the server did not start in 120 s"
            time.sleep(0.05)
        log = log_path.read_text()
        health = re.search(r"health checks \(plaintext\) on [^:]+:(\d+)", log).group(1)
        metrics = re.search(r"metrics at http://[^:]+:(\d+)/metrics", log).group(1)
        with grpc.insecure_channel(f"127.0.0.1:{health}") as channel:  # the startup probe
            check = health_pb2_grpc.HealthStub(channel).Check
            while check(health_pb2.HealthCheckRequest(), timeout=10).status != \
                    health_pb2.HealthCheckResponse.SERVING:
                assert process.poll() is None, f"the server exited:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, "not SERVING after 120 s"
                time.sleep(0.1)
        address = f"127.0.0.1:{int(port_file.read_text())}"
        roots = grpc.ssl_channel_credentials((secret_files / "ca.pem").read_bytes())
        token = (secret_files / "tokens").read_text().split()[0]
        list_models = "/lmhead.v1.LMHeadService/ListModels"
        # The certificate holds the Services' names, not 127.0.0.1: check it for the one
        # clients dial for client-side balancing.
        name = [("grpc.ssl_target_name_override", HEADLESS_DNS)]
        with grpc.secure_channel(address, roots, options=name) as channel:
            call = channel.unary_unary(list_models)
            with pytest.raises(grpc.RpcError) as error:
                call(b"", timeout=10)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answer = call(b"", timeout=10, metadata=[("authorization", f"Bearer {token}")])
            assert b"olmo" in answer
        with grpc.insecure_channel(address) as channel:  # plaintext to the TLS port
            with pytest.raises(grpc.RpcError) as error:
                channel.unary_unary(list_models)(b"", timeout=10)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as page:
            assert re.search(r"^lmhead_queue_tokens \d+", page.read().decode(), re.MULTILINE)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()[-3000:]
