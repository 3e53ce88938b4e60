"""What ships with a baked service, checked without a Docker engine: the Dockerfile's
shape and its exact install and run commands (executed here on a plain Python), the
Kubernetes manifests as `kubectl kustomize` builds them (kubectl comes with the template's
tools) and the compose stack, and that both name exactly the environment variables the
service's settings define."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import bake, run_ok, tool, tool_env

pytestmark = pytest.mark.slow  # bakes and installs whole services

BROKER_PORTS = {"kafka": {9092, 9093}, "rabbitmq": {5671, 5672}}
NAME_LABEL = "app.kubernetes.io/name"
SECRET_VARIABLES = {"BROKER_URL", "ETCD_PASSWORD", "KAFKA_SASL_PASSWORD"}


@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages and their instructions (continuation lines joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, arguments = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", arguments.strip(), re.IGNORECASE)
            assert match, line
            stages.append(Stage(match.group(2) or str(len(stages)), match.group(1)))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, arguments.strip()))
    return stages


def exec_form(arguments: str) -> list[str]:
    """["a", "b"] (JSON exec form) as a list; shell form is refused (no PID 1 signals)."""
    import json

    assert arguments.startswith("["), f"use the exec form: {arguments}"
    parsed: list[str] = json.loads(arguments)
    return parsed


def docker_copy(context: Path, workdir: Path, arguments: str) -> None:
    """COPY <sources...> <destination> from the build context into the working directory."""
    *sources, destination = arguments.split()
    target = workdir / destination
    for source in sources:
        origin = context / source
        if origin.is_dir():
            shutil.copytree(origin, target, dirs_exist_ok=True)
        else:
            copied = target / origin.name if destination.endswith("/") else target
            copied.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(origin, copied)


@dataclass
class Image:
    """A baked service and a folder standing for the image's /app after the build stage."""

    broker: str
    service: Path
    app: Path
    stages: dict[str, Stage]
    env: dict[str, str]

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def prefix(self) -> str:
        return self.name.replace("-", "_").upper() + "_"

    def run(self, command: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, cwd=self.app, env=self.env, capture_output=True, text=True, **options
        )


@pytest.fixture(scope="module", params=["kafka", "rabbitmq"])
def image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Image:
    broker: str = request.param
    service = bake(tmp_path_factory.mktemp(f"ship-{broker}"), broker=broker)
    env = tool_env()
    # The README's first step: lock the dependencies (the lock file is committed).
    subprocess.run(["uv", "lock", "--quiet"], cwd=service, env=env, check=True, timeout=600)
    stages = {stage.name: stage for stage in parse_dockerfile(service / "Dockerfile")}
    app = tmp_path_factory.mktemp(f"app-{broker}")
    build_env = dict(env)
    for instruction in stages["build"].instructions:
        arguments = instruction.arguments
        if instruction.keyword == "ENV":
            build_env.update(dict(pair.split("=", 1) for pair in shlex.split(arguments)))
        elif instruction.keyword == "COPY" and not arguments.startswith("--from"):
            docker_copy(service, app, arguments)
        elif instruction.keyword == "RUN":
            run_ok(["bash", "-c", arguments], cwd=app, env=build_env, timeout=900)
    runtime_env = dict(os.environ)
    runtime_env["PATH"] = f"{app / '.venv' / 'bin'}{os.pathsep}{runtime_env['PATH']}"
    return Image(broker, service, app, stages, runtime_env)


def test_dockerfile_builds_in_stages_as_non_root_with_no_port(image: Image) -> None:
    build, runtime = image.stages["build"], image.stages["runtime"]
    assert list(image.stages)[-1] == "runtime"
    steps = [f"{i.keyword} {i.arguments}" for i in build.instructions]
    lock_copy = steps.index("COPY pyproject.toml uv.lock ./")
    first_install = next(n for n, step in enumerate(steps) if step.startswith("RUN uv sync"))
    source_copy = steps.index("COPY src/ src/")
    assert lock_copy < first_install < source_copy, "dependencies must install before sources"
    assert "--frozen" in steps[first_install] and "--no-install-project" in steps[first_install]
    for stage in image.stages.values():
        assert stage.all("EXPOSE") == [], "the service listens on nothing"
    [user] = runtime.all("USER")
    assert user not in ("0", "root")
    assert runtime.base.endswith("-slim")
    copied = runtime.all("COPY")
    assert copied == ["--from=build /app/.venv /app/.venv"], "only the virtualenv is shipped"
    assert not any(
        re.search(r"apt-get|gcc|build-essential|pip install", r) for r in runtime.all("RUN")
    )
    [healthcheck] = runtime.all("HEALTHCHECK")
    assert exec_form(healthcheck.split("CMD", 1)[1].strip()) == [image.name, "healthcheck"]
    assert exec_form(runtime.all("CMD")[0]) == [image.name, "run"]
    ignored = (image.service / ".dockerignore").read_text().split()
    assert {".venv", ".git", "tests"} <= set(ignored)


def test_dockerfile_commands_install_a_service_that_runs_and_reports_health(
    image: Image,
) -> None:
    """The build stage's RUN lines ran in the fixture; now the runtime stage's commands."""
    [healthcheck] = image.stages["runtime"].all("HEALTHCHECK")
    probe = exec_form(healthcheck.split("CMD", 1)[1].strip())
    command = exec_form(image.stages["runtime"].all("CMD")[0])
    heartbeat = image.app / "heartbeat"
    image.env[f"{image.prefix}HEARTBEAT_FILE"] = str(heartbeat)
    not_yet = image.run(probe, timeout=60)
    assert not_yet.returncode == 1 and "unhealthy" in not_yet.stderr

    process = subprocess.Popen(
        command, cwd=image.app, env=image.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while image.run(probe, timeout=60).returncode != 0:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "never became healthy"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def setting_variables(image: Image) -> set[str]:
    listing = image.run([image.name, "config"], timeout=60, check=True).stdout
    return {line.split("=", 1)[0] for line in listing.splitlines() if not line.startswith("#")}


def _kind(document: dict[str, Any]) -> str:
    """A manifest's kind; the archiver's objects (archiver.yaml) as `Archiver<kind>`."""
    name = document.get("metadata", {}).get("name", "")
    return f"Archiver{document['kind']}" if name.endswith("-archiver") else document["kind"]


def k8s(image: Image) -> dict[str, dict[str, Any]]:
    """The objects `kubectl apply -k deploy/k8s` would apply, by kind: the kustomization
    built by kubectl (what a cluster gets, not the raw files), plus the example secret the
    kustomization leaves out. Every file under deploy/k8s is either listed or that secret."""
    folder = image.service / "deploy" / "k8s"
    built = run_ok([tool("kubectl"), "kustomize", str(folder)], timeout=120).stdout
    documents = {_kind(document): document for document in yaml.safe_load_all(built)}
    files: dict[str, str] = {}
    for path in sorted(folder.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            files[_kind(document)] = path.name
    assert set(documents) == set(files) - {"Kustomization", "Secret"}
    [secret] = yaml.safe_load_all((folder / files["Secret"]).read_text())
    documents["Secret"] = secret
    return documents


def test_k8s_manifests_set_every_setting_and_nothing_else(image: Image) -> None:
    manifests = k8s(image)
    [container] = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    configured = set(manifests["ConfigMap"]["data"])
    from_files = {item["name"] for item in container["env"] if "value" in item}
    assert all(name.endswith("_FILE") for name in from_files)
    # From the pod itself (downward API): only what must differ per replica.
    from_pod = {item["name"]: item["valueFrom"] for item in container["env"] if "valueFrom" in item}
    per_replica = {f"{image.prefix}KAFKA_GROUP_INSTANCE_ID"} if image.broker == "kafka" else set()
    assert set(from_pod) == per_replica
    assert all(
        source == {"fieldRef": {"fieldPath": "metadata.name"}} for source in from_pod.values()
    )
    named = {n for n in configured if n.startswith(image.prefix)} | set(from_pod)
    named |= {name.removesuffix("_FILE") for name in from_files}
    settings = setting_variables(image)
    assert sorted(settings - named) == [], "settings missing from deploy/k8s"
    assert sorted(named - settings) == [], "deploy/k8s sets variables the service ignores"
    secrets = {image.prefix + name for name in SECRET_VARIABLES} & settings
    assert not secrets & configured, "credentials belong in the secret, read as *_FILE"
    assert secrets <= {name.removesuffix("_FILE") for name in from_files}


def test_k8s_deployment_is_locked_down_and_drains_before_it_is_killed(image: Image) -> None:
    manifests = k8s(image)
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    drain_s = float(manifests["ConfigMap"]["data"][f"{image.prefix}DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > drain_s
    assert "ports" not in container
    assert container["readinessProbe"]["exec"]["command"] == [image.name, "healthcheck"]
    assert container["livenessProbe"]["exec"]["command"] == [image.name, "healthcheck", "--live"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= set(container["resources"])
    assert pod["automountServiceAccountToken"] is False
    secret_volume = next(v for v in pod["volumes"] if "secret" in v)
    assert secret_volume["secret"]["secretName"] == manifests["Secret"]["metadata"]["name"]
    heartbeat = Path(manifests["ConfigMap"]["data"][f"{image.prefix}HEARTBEAT_FILE"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(heartbeat.parent) in mounts, "the heartbeat needs a writable mount"
    assert manifests["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


def test_k8s_archiver_shares_the_image_and_settings_and_runs_archive(image: Image) -> None:
    """The platform's archiver: the same image and configuration in its `archive` run
    mode, its pods apart from the service's selectors, HTTPS out to the object store."""
    manifests = k8s(image)
    service, archiver = manifests["Deployment"], manifests["ArchiverDeployment"]
    [container] = archiver["spec"]["template"]["spec"]["containers"]
    [service_container] = service["spec"]["template"]["spec"]["containers"]
    assert container["image"] == service_container["image"]
    assert container["args"] == ["archive"]
    assert container["envFrom"] == service_container["envFrom"]
    assert f"{image.prefix}S3_SECRET_ACCESS_KEY_FILE" in {item["name"] for item in container["env"]}
    labels = archiver["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "archiver"
    budget = manifests["PodDisruptionBudget"]["spec"]["selector"]
    assert budget["matchExpressions"] == [
        {"key": "app.kubernetes.io/component", "operator": "NotIn", "values": ["archiver"]}
    ]
    policy = manifests["ArchiverNetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["egress"] == [{"ports": [{"protocol": "TCP", "port": 443}]}]


def egress_rule(peer: dict[str, Any], protocol_ports: set[tuple[str, int]]) -> dict[str, Any]:
    ports = [{"port": port, "protocol": protocol} for protocol, port in sorted(protocol_ports)]
    return {"to": [peer], "ports": ports}


def any_namespace(name: str) -> dict[str, Any]:
    """Pods labelled app.kubernetes.io/name=<name> in any namespace."""
    return {"namespaceSelector": {}, "podSelector": {"matchLabels": {NAME_LABEL: name}}}


def test_k8s_network_policy_selects_the_pods_and_lets_out_only_to_their_servers(
    image: Image,
) -> None:
    """As built by kustomize: its labels must not rewrite the egress peers' selectors."""
    manifests = k8s(image)
    deployment = manifests["Deployment"]["spec"]
    selected = deployment["selector"]["matchLabels"]
    # What the kustomization's includeSelectors gave every selector up to now: a
    # Deployment's selector is immutable, so it stays exactly this.
    assert selected == {NAME_LABEL: image.name, "app.kubernetes.io/part-of": "event-services"}
    pod_labels = deployment["template"]["metadata"]["labels"]
    assert selected.items() <= pod_labels.items(), "the Deployment would select no pod"
    assert manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selected

    policy = manifests["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == selected
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert policy.get("ingress", []) == [], "no inbound connections at all"
    tcp = {("TCP", port) for port in BROKER_PORTS[image.broker]}
    dns = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
    }
    normalised = [
        {"to": rule["to"], "ports": sorted(rule["ports"], key=lambda p: (p["protocol"], p["port"]))}
        for rule in policy["egress"]
    ]
    assert normalised == [
        egress_rule(any_namespace(image.broker), tcp),
        egress_rule(any_namespace("etcd"), {("TCP", 2379)}),
        egress_rule(any_namespace("opentelemetry-collector"), {("TCP", 4317), ("TCP", 4318)}),
        egress_rule(dns, {("UDP", 53), ("TCP", 53)}),
    ]


def test_compose_stack_runs_the_service_against_its_servers(image: Image) -> None:
    compose = yaml.safe_load((image.service / "docker-compose.yml").read_text())
    services = compose["services"]
    broker_service = {"kafka": "kafka", "rabbitmq": "rabbitmq"}[image.broker]
    assert {broker_service, "etcd", "jaeger", "service"} <= set(services)
    service = services["service"]
    assert service["build"] == "."
    environment: dict[str, str] = service["environment"]
    named = {n.removesuffix("_FILE") for n in environment if n.startswith(image.prefix)}
    assert named <= setting_variables(image)
    hosts = {
        re.sub(r"^\w+://(?:[^@/]*@)?([^:/]+).*$", r"\1", environment[name])
        for name in (f"{image.prefix}BROKER_URL", f"{image.prefix}STATE_URL")
    }
    hosts.add(re.sub(r"^\w+://([^:/]+).*$", r"\1", environment["OTEL_EXPORTER_OTLP_ENDPOINT"]))
    assert hosts == {broker_service, "etcd", "jaeger"}
    assert set(service["depends_on"]) == {broker_service, "etcd", "jaeger"}
    assert "ports" not in service
