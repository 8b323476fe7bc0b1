"""The Kubernetes manifests, the Dockerfile and the edge-secret script agree with each other and
with the configs they embed: ports, probe paths, certificate paths, names.

No cluster is needed: the manifests are checked structurally (and rendered with `kubectl kustomize`
when kubectl is installed, which works offline).
"""

import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from kins_tunnel.tokens import TOKEN_RE
from tests.clients import needs_kubectl

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DRAIN_MARGIN = 10  # seconds between the drain deadline and SIGKILL


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc is not None]


def one(name: str, kind: str, object_name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in load(name)
        if d["kind"] == kind and (object_name is None or d["metadata"]["name"] == object_name)
    ]
    assert len(found) == 1, f"{name}: expected one {kind} {object_name or ''}, found {len(found)}"
    return found[0]


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def embedded(name: str, kind_file: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(one(kind_file, "ConfigMap")["data"][name])
    return doc


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(c)


def resolve_port(c: dict[str, Any], port: int | str) -> int:
    """A probe or targetPort given by number or by container port name -> the number."""
    if isinstance(port, int):
        return port
    (match,) = [int(p["containerPort"]) for p in c["ports"] if p["name"] == port]
    return match


def mounted_file(workload: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The volume and the key inside it that appear at `path` in the container."""
    pod = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    target = PurePosixPath(path)
    for m in container(workload)["volumeMounts"]:
        mount = PurePosixPath(m["mountPath"])
        if mount == target and ("subPath" in m or "subPathExpr" in m):
            return volumes[m["name"]], m.get("subPath") or m["subPathExpr"]
        if mount == target.parent and "subPath" not in m and "subPathExpr" not in m:
            return volumes[m["name"]], target.name
    raise AssertionError(f"nothing is mounted at {path}")


CLOUD = embedded("cloud.yaml", "tunnel-cloud.yaml")
EDGE = embedded("edge.yaml", "tunnel-edge.yaml")
DEPLOYMENT = one("tunnel-cloud.yaml", "Deployment")
DAEMONSET = one("tunnel-edge.yaml", "DaemonSet")
ENROLLING = one("tunnel-edge-enroll.yaml", "DaemonSet")
EDGE_ENROLL = embedded("edge.yaml", "tunnel-edge-enroll.yaml")
WORKLOADS = [
    pytest.param(DEPLOYMENT, id="tunnel-cloud"),
    pytest.param(DAEMONSET, id="tunnel-edge"),
    pytest.param(ENROLLING, id="tunnel-edge-enroll"),
]


# --- every manifest --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_every_document_parses_and_is_named(path: Path) -> None:
    docs = load(path.name)
    assert docs
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc
        assert doc.get("metadata", {}).get("name"), doc


def test_kustomization_lists_the_manifests_in_one_namespace() -> None:
    kustomization = load("kustomization.yaml")[0]
    namespace = kustomization["namespace"]
    assert namespace == "kube-system"  # where the Kins docs look for tunnel-cloud
    assert namespace == one("namespace.yaml", "Namespace")["metadata"]["name"]
    resources = kustomization["resources"]
    assert sorted(resources) == ["tunnel-cloud.yaml", "tunnel-edge.yaml"]
    for name in resources:
        for doc in load(name):
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]
    images = {image["name"] for image in kustomization["images"]}
    for workload in (DEPLOYMENT, DAEMONSET):
        assert container(workload)["image"].split(":")[0] in images


@needs_kubectl
def test_kustomize_renders_offline() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out) if d)
    assert kinds == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "DaemonSet",
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
            "Service",
        ]
    )


# --- tunnel-cloud ----------------------------------------------------------------------------------


def test_cloud_deployment_runs_several_replicas_spread_over_nodes() -> None:
    spec = DEPLOYMENT["spec"]
    assert spec["replicas"] >= 2
    anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"]
    term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert one("tunnel-cloud.yaml", "PodDisruptionBudget")["spec"]["minAvailable"] >= 1


def test_cloud_container_ports_match_cloud_yaml() -> None:
    c = container(DEPLOYMENT)
    assert c["args"] == ["cloud", "--config", "/etc/kins-tunnel/cloud.yaml"]
    assert resolve_port(c, "proxy") == port_of(CLOUD["proxy"]["listen"]) == 8080
    assert resolve_port(c, "proxy-tls") == port_of(CLOUD["proxy"]["tls"]["listen"]) == 8443
    assert resolve_port(c, "tunnel") == port_of(CLOUD["tunnel"]["listen"]) == 9000
    assert resolve_port(c, "admin") == port_of(CLOUD["admin"]["listen"]) == 9090
    # The kubelet and Prometheus come from outside the pod.
    for section in ("proxy", "tunnel", "admin"):
        assert CLOUD[section]["listen"].startswith("0.0.0.0:")
    assert CLOUD["proxy"]["tls"]["listen"].startswith("0.0.0.0:")


@pytest.mark.parametrize(
    "workload, config",
    [
        pytest.param(DEPLOYMENT, CLOUD, id="tunnel-cloud"),
        pytest.param(DAEMONSET, EDGE, id="tunnel-edge"),
    ],
)
def test_probes_and_scrape_annotations_use_the_admin_port(
    workload: dict[str, Any], config: dict[str, Any]
) -> None:
    c = container(workload)
    admin = port_of(config["admin"]["listen"])
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert resolve_port(c, c[probe]["httpGet"]["port"]) == admin
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(admin)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_tunnel_cloud_service_is_the_documented_node_port() -> None:
    svc = one("tunnel-cloud.yaml", "Service", "tunnel-cloud")
    c = container(DEPLOYMENT)
    assert svc["spec"]["type"] == "NodePort"
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["proxy"]["port"] == 8080
    assert ports["proxy"]["nodePort"] == 31469
    assert resolve_port(c, ports["proxy"]["targetPort"]) == port_of(CLOUD["proxy"]["listen"])
    assert ports["proxy-tls"]["port"] == 8443
    assert ports["proxy-tls"]["nodePort"] == 31470
    assert resolve_port(c, ports["proxy-tls"]["targetPort"]) == port_of(
        CLOUD["proxy"]["tls"]["listen"]
    )
    assert ports["tunnel"]["port"] == 9000
    assert resolve_port(c, ports["tunnel"]["targetPort"]) == port_of(CLOUD["tunnel"]["listen"])
    assert svc["spec"]["selector"] == DEPLOYMENT["spec"]["template"]["metadata"]["labels"]


def test_headless_service_is_what_edges_dial() -> None:
    svc = one("tunnel-cloud.yaml", "Service", "tunnel-cloud-headless")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is False
    assert svc["spec"]["selector"] == DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    (port,) = svc["spec"]["ports"]
    assert resolve_port(container(DEPLOYMENT), port["targetPort"]) == 9000
    name = svc["metadata"]["name"]
    namespace = svc["metadata"]["namespace"]
    assert EDGE["cloud"] == [f"{name}.{namespace}.svc.cluster.local:{port['port']}"]


def test_replica_name_comes_from_the_pod() -> None:
    env = {e["name"]: e for e in container(DEPLOYMENT)["env"]}
    assert env["KINS_REPLICA"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "replica" not in CLOUD  # shared by every replica: must not pin one name


def test_cloud_stays_off_edge_nodes() -> None:
    node_affinity = DEPLOYMENT["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    terms = node_affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (edge_label,) = DAEMONSET["spec"]["template"]["spec"]["nodeSelector"]
    assert {"key": edge_label, "operator": "DoesNotExist"} in terms[0]["matchExpressions"]


# --- tunnel-edge -----------------------------------------------------------------------------------


def test_edge_daemonset_runs_on_edge_nodes_in_the_host_network() -> None:
    pod = DAEMONSET["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"superedge.io/node-edge": "enable"}
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"  # to resolve the headless Service
    c = container(DAEMONSET)
    assert c["args"] == ["edge", "--config", "/etc/kins-tunnel/edge.yaml"]
    assert port_of(EDGE["admin"]["listen"]) == 9091
    # hostNetwork: 0.0.0.0 would be every address of the node, open to the whole site network
    assert EDGE["admin"]["listen"].startswith("127.0.0.1:")
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["host"] == "127.0.0.1"


def test_shared_edge_config_only_serves_unit_names() -> None:
    # Node names ("edge1:22") in a file shared by every node would be refused for all but one.
    assert EDGE["services"]
    for name in EDGE["services"]:
        assert re.fullmatch(r"[a-z0-9-]+-svc-kins\.kins-system:\d+", name), name


# --- both workloads --------------------------------------------------------------------------------


@pytest.mark.parametrize("workload", WORKLOADS)
def test_hardened_security_context(workload: dict[str, Any]) -> None:
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["automountServiceAccountToken"] is False
    sc = container(workload)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    resources = container(workload)["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}


@pytest.mark.parametrize("workload", WORKLOADS)
def test_grace_period_covers_the_drain(workload: dict[str, Any]) -> None:
    grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 30 + DRAIN_MARGIN


@pytest.mark.parametrize(
    "workload, config, config_file",
    [
        pytest.param(DEPLOYMENT, CLOUD, "cloud.yaml", id="tunnel-cloud"),
        pytest.param(DAEMONSET, EDGE, "edge.yaml", id="tunnel-edge"),
    ],
)
def test_config_and_certificates_are_mounted_where_the_config_says(
    workload: dict[str, Any], config: dict[str, Any], config_file: str
) -> None:
    volume, key = mounted_file(workload, f"/etc/kins-tunnel/{config_file}")
    assert volume["configMap"]["name"] == workload["metadata"]["name"]
    assert key == config_file
    for role in ("ca", "cert", "key"):
        volume, key = mounted_file(workload, config["tls"][role])
        assert "secret" in volume, f"tls.{role} is not mounted from a Secret"
        items = volume["secret"].get("items")
        if items is not None:
            assert key in {item["path"] for item in items}


def test_edge_picks_its_own_pair_out_of_the_shared_secret() -> None:
    for role, suffix in (("cert", "crt"), ("key", "key")):
        volume, key = mounted_file(DAEMONSET, EDGE["tls"][role])
        assert volume["secret"]["secretName"] == "tunnel-edge-certs"
        assert key == f"edge-$(NODE_NAME).{suffix}"  # the names `certs edge --node` writes
    env = {e["name"]: e for e in container(DAEMONSET)["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_embedded_configs_pass_the_config_loader() -> None:
    from kins_tunnel.config import cloud_config_from_dict, edge_config_from_dict

    cloud = cloud_config_from_dict(
        CLOUD, base_dir=Path("/etc/kins-tunnel"), source="deploy/tunnel-cloud.yaml: cloud.yaml"
    )
    assert cloud.proxy.listen is not None and cloud.proxy.listen.port == 8080
    assert cloud.proxy.tls is not None and cloud.proxy.tls.listen.port == 8443
    assert cloud.proxy.tls.cert is None  # the cloud's own certificate, mounted from the Secret
    assert cloud.alias_discovery.enabled and cloud.alias_discovery.cluster_domain == "cluster.local"
    assert cloud.tunnel.listen.port == 9000
    assert cloud.admin.listen.port == 9090
    assert str(cloud.tls.cert) == "/etc/kins-tunnel/certs/cloud.crt"
    grace = DEPLOYMENT["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= cloud.tunnel.drain_timeout + DRAIN_MARGIN

    edge = edge_config_from_dict(
        EDGE, base_dir=Path("/etc/kins-tunnel"), source="deploy/tunnel-edge.yaml: edge.yaml"
    )
    assert edge.admin is not None and edge.admin.listen.port == 9091
    assert edge.cloud == ("tunnel-cloud-headless.kube-system.svc.cluster.local:9000",)
    assert "test-svc-kins.kins-system:443" in edge.services
    grace = DAEMONSET["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= edge.drain_timeout + DRAIN_MARGIN


# --- make-edge-secrets.sh --------------------------------------------------------------------------


@pytest.fixture
def script_env(tmp_path: Path) -> dict[str, str]:
    """A certs dir from `certs init`, and a stand-in `kins-tunnel` that writes edge pairs."""
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_text("ca\n")
    (certs / "ca.key").write_text("ca key\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "kins-tunnel"
    stub.write_text(
        "#!/bin/sh\n"
        '[ "$1 $2 $3 $5 $7" = "certs edge --dir --unit --node" ] || exit 3\n'
        'touch "$4/edge-$8.crt" "$4/edge-$8.key"\n'
    )
    stub.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "CERTS_DIR": str(certs),
        "PYTHON": sys.executable,
    }


def run_script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(DEPLOY / "make-edge-secrets.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_script_makes_one_secret_and_one_daemonset_per_node(script_env: dict[str, str]) -> None:
    certs = Path(script_env["CERTS_DIR"])
    result = run_script(script_env, "prod", "edge1", "edge2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [
        f"kubectl -n kube-system create secret generic kins-tunnel-edge-edge1"
        f" --from-file=ca.crt={certs}/ca.crt --from-file=edge.crt={certs}/edge-edge1.crt"
        f" --from-file=edge.key={certs}/edge-edge1.key",
        f"kubectl apply -f {certs}/tunnel-edge-edge1.yaml",
        f"kubectl -n kube-system create secret generic kins-tunnel-edge-edge2"
        f" --from-file=ca.crt={certs}/ca.crt --from-file=edge.crt={certs}/edge-edge2.crt"
        f" --from-file=edge.key={certs}/edge-edge2.key",
        f"kubectl apply -f {certs}/tunnel-edge-edge2.yaml",
    ]
    selectors = []
    for node in ("edge1", "edge2"):
        docs = {
            d["kind"]: d
            for d in yaml.safe_load_all((certs / f"tunnel-edge-{node}.yaml").read_text())
        }
        ds, cm = docs["DaemonSet"], docs["ConfigMap"]
        assert ds["metadata"]["name"] == cm["metadata"]["name"] == f"tunnel-edge-{node}"
        pod = ds["spec"]["template"]
        assert pod["spec"]["nodeSelector"]["kubernetes.io/hostname"] == node
        assert ds["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        selectors.append(ds["spec"]["selector"]["matchLabels"])
        edge = yaml.safe_load(cm["data"]["edge.yaml"])
        assert edge["services"] == {
            "prod-svc-kins.kins-system:443": "127.0.0.1:6443",
            f"{node}:22": "127.0.0.1:22",
        }
        volume, _ = mounted_file(ds, "/etc/kins-tunnel/edge.yaml")
        assert volume["configMap"]["name"] == cm["metadata"]["name"]
        for role, key in (("ca", "ca.crt"), ("cert", "edge.crt"), ("key", "edge.key")):
            volume, mounted_key = mounted_file(ds, edge["tls"][role])
            assert volume["secret"]["secretName"] == f"kins-tunnel-edge-{node}"
            assert mounted_key == key  # the keys the printed `create secret` gives it
    # Each DaemonSet owns only its own pods, and none the shared DaemonSet's.
    assert selectors[0] != selectors[1]
    assert DAEMONSET["spec"]["selector"]["matchLabels"] not in selectors


def test_script_shared_secret_for_the_shipped_daemonset(script_env: dict[str, str]) -> None:
    certs = Path(script_env["CERTS_DIR"])
    result = run_script(script_env, "--shared", "test", "edge1", "edge2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"kubectl -n kube-system create secret generic tunnel-edge-certs"
        f" --from-file=ca.crt={certs}/ca.crt"
        f" --from-file={certs}/edge-edge1.crt --from-file={certs}/edge-edge1.key"
        f" --from-file={certs}/edge-edge2.crt --from-file={certs}/edge-edge2.key"
    ]
    assert (certs / "edge-edge2.key").exists()


@pytest.mark.parametrize("args", [("test",), ("test", "Edge_1")])
def test_script_refuses_bad_arguments(script_env: dict[str, str], args: tuple[str, ...]) -> None:
    result = run_script(script_env, *args)
    assert result.returncode != 0
    assert result.stdout == ""


def test_proxy_auth_script_keeps_passwords_and_prints_the_secret(tmp_path: Path) -> None:
    env = {**os.environ, "AUTH_DIR": str(tmp_path / "auth"), "PYTHON": sys.executable}

    def run(*users: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(DEPLOY / "make-proxy-auth.sh"), *users],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    basic = tmp_path / "auth" / "basic"
    first = run("alice", "bob.ops")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "kubectl -n kube-system create secret generic tunnel-cloud-proxy-auth"
        f" --from-file=basic={basic} --dry-run=client -o yaml | kubectl apply -f -"
    ]
    assert basic.stat().st_mode & 0o777 == 0o600
    lines = basic.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["alice", "bob.ops"]
    passwords = [line.split(":", 1)[1] for line in lines]
    assert len(set(passwords)) == 2 and all(
        re.fullmatch(r"[A-Za-z0-9_-]{32}", p) for p in passwords
    )
    assert not any(p in first.stdout + first.stderr for p in passwords)  # only in the file

    (tmp_path / "auth" / "authz.yaml").write_text("rules: []\n")
    second = run("alice", "carol")
    assert second.returncode == 0, second.stderr
    assert basic.read_text().splitlines()[:2] == lines  # alice keeps her password
    assert [line.split(":")[0] for line in basic.read_text().splitlines()] == [
        "alice",
        "bob.ops",
        "carol",
    ]
    assert f"--from-file=authz.yaml={tmp_path / 'auth' / 'authz.yaml'}" in second.stdout

    for bad in ("a:b", "-x", "a b", ""):
        result = run(bad)
        assert result.returncode != 0 and result.stdout == "", bad
    assert run().returncode == 2


def test_script_needs_the_ca(script_env: dict[str, str], tmp_path: Path) -> None:
    result = run_script({**script_env, "CERTS_DIR": str(tmp_path / "nowhere")}, "test", "edge1")
    assert result.returncode == 1
    assert "certs init" in result.stderr


# --- image -----------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (op, arg)
        for op, _, arg in (
            line.partition(" ") for line in lines if line and not line.startswith("#")
        )
    ]


def test_dockerfile_runs_the_console_script_as_non_root() -> None:
    instructions = dockerfile_instructions()
    final_stage = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM") :]
    assert final_stage[0] == ("FROM", "python:3.11-slim")
    users = [arg for op, arg in final_stage if op == "USER"]
    assert users and users[-1].split(":")[0] == "65532"
    entrypoint = [arg for op, arg in instructions if op == "ENTRYPOINT"]
    assert entrypoint == ['["kins-tunnel"]']
    exposed = {int(p) for op, arg in instructions if op == "EXPOSE" for p in arg.split()}
    assert exposed == {8080, 8443, 9000, 9090}
    assert any(op == "RUN" and "pip install --no-cache-dir" in arg for op, arg in instructions)


def test_dockerfile_copies_only_what_dockerignore_lets_through() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"certs", "*.key", ".git"} <= ignored  # no key material or history in the image
    copied = [
        arg.split()[:-1]
        for op, arg in dockerfile_instructions()
        if op == "COPY" and not arg.startswith("--from")
    ]
    for sources in copied:
        for source in sources:
            assert source.split("/")[0] not in ignored, source
    # What setuptools needs to build the package, including the readme pyproject names.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied_sources = {s for group in copied for s in group}
    assert {"pyproject.toml", pyproject["project"]["readme"], "kins_tunnel"} <= copied_sources


def test_pyproject_defines_the_console_script() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["kins-tunnel"] == "kins_tunnel.cli:main"


# --- files the commented keys of cloud.yaml point at ----------------------------------------------


def test_optional_files_named_in_comments_are_mounted() -> None:
    text = one("tunnel-cloud.yaml", "ConfigMap")["data"]["cloud.yaml"]
    found = dict(re.findall(r"#\s*(authz_file|revoked_file|auth): (.+)", text))
    assert set(found) == {"authz_file", "revoked_file"}
    for path, source, optional in (
        (found["authz_file"], "tunnel-cloud-proxy-auth", False),  # the Secret of proxy.auth
        (found["revoked_file"], "tunnel-cloud-revoked", True),  # pods start without it
    ):
        volume, _ = mounted_file(DEPLOYMENT, path.strip())
        ref = volume.get("secret", {}).get("secretName") or volume.get("configMap", {}).get("name")
        assert ref == source, path
        source_of = volume.get("secret") or volume.get("configMap")
        assert source_of is not None and source_of["optional"] is optional


def test_proxy_ships_with_basic_auth_from_a_required_secret() -> None:
    assert "anonymous" not in CLOUD["proxy"]
    volume, key = mounted_file(DEPLOYMENT, CLOUD["proxy"]["auth"]["basic_file"])
    assert volume["secret"]["secretName"] == "tunnel-cloud-proxy-auth"
    assert volume["secret"]["optional"] is False  # no Secret, no pod: never an open proxy
    assert key == "basic"  # the key make-proxy-auth.sh gives it


def test_session_ticket_key_ships_from_its_own_required_secret() -> None:
    """The replicas share a dedicated ticket key (never the cloud's TLS key), from a Secret of its
    own that the pods cannot start without, mounted as a directory so a rotation reaches them."""
    path = CLOUD["tunnel"]["session_ticket_key_file"]
    volume, key = mounted_file(DEPLOYMENT, path)
    assert volume["secret"]["secretName"] == "tunnel-cloud-ticket-key"
    assert volume["secret"]["optional"] is False
    assert key == "ticket.key"
    assert volume["secret"]["defaultMode"] & 0o007 == 0  # not world-readable in the pod
    assert "items" not in volume["secret"]
    certs_volume, _ = mounted_file(DEPLOYMENT, CLOUD["tls"]["key"])
    assert certs_volume["secret"]["secretName"] != "tunnel-cloud-ticket-key"


def test_admin_port_is_on_no_service_and_only_open_to_prometheus() -> None:
    c = container(DEPLOYMENT)
    admin = port_of(CLOUD["admin"]["listen"])
    pod = DEPLOYMENT["spec"]["template"]["spec"]
    assert not pod.get("hostNetwork")  # 0.0.0.0 in the pod's own network: the pod IP
    assert all("hostPort" not in p for p in c["ports"])
    for svc in load("tunnel-cloud.yaml"):
        if svc["kind"] == "Service":
            targets = {resolve_port(c, p["targetPort"]) for p in svc["spec"]["ports"]}
            assert admin not in targets, svc["metadata"]["name"]
    policy = one("tunnel-cloud.yaml", "NetworkPolicy")
    assert policy["spec"]["podSelector"] == DEPLOYMENT["spec"]["selector"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    open_to_all, admin_rules = set(), []
    for rule in policy["spec"]["ingress"]:
        ports = {resolve_port(c, p["port"]) for p in rule["ports"]}
        if "from" not in rule:
            open_to_all |= ports
        elif admin in ports:
            admin_rules.append(rule)
    assert open_to_all == {8080, 8443, 9000}  # the proxy's NodePorts and the edges' port
    (rule,) = admin_rules
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


def test_shipped_cloud_config_passes_the_start_up_check(tmp_path: Path) -> None:
    """`load_cloud_config` (what `kins-tunnel cloud` runs) accepts the shipped file as it is, and
    refuses it once its proxy.auth is removed."""
    from kins_tunnel.config import load_cloud_config
    from kins_tunnel.errors import UserError

    text = one("tunnel-cloud.yaml", "ConfigMap")["data"]["cloud.yaml"]
    path = tmp_path / "cloud.yaml"
    path.write_text(text)
    cfg = load_cloud_config(path)
    assert cfg.proxy.auth is not None
    assert str(cfg.proxy.auth.basic_file) == "/etc/kins-tunnel/auth/basic"
    assert not cfg.proxy.anonymous
    without = {**CLOUD, "proxy": {k: v for k, v in CLOUD["proxy"].items() if k != "auth"}}
    path.write_text(yaml.safe_dump(without))
    with pytest.raises(UserError, match=r"proxy\.listen: 0\.0\.0\.0:8080 .*proxy\.anonymous"):
        load_cloud_config(path)


async def test_shipped_cloud_config_starts_and_asks_for_credentials(tmp_path: Path) -> None:
    """The shipped cloud.yaml with its /etc/kins-tunnel files made real (certificates, the
    Secret make-proxy-auth.sh writes, the ticket key `certs ticket-key` writes) and its listeners
    moved to 127.0.0.1 port 0: the cloud starts with session tickets on, and its proxy answers 407
    without credentials and routes with them. Without the ticket key it does not start."""
    import base64

    import trio

    from kins_tunnel.certs.directory import init_ca
    from kins_tunnel.cloud.server import Cloud
    from kins_tunnel.config import load_cloud_config
    from kins_tunnel.errors import UserError
    from tests.e2e.harness import connect

    etc = tmp_path / "etc"
    init_ca(etc / "certs")
    auth_env = {**os.environ, "AUTH_DIR": str(etc / "auth"), "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", str(DEPLOY / "make-proxy-auth.sh"), "ops"],
        env=auth_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    user, password = (etc / "auth" / "basic").read_text().strip().split(":")
    ticket_key = etc / "tickets" / "ticket.key"
    ticket_key.parent.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "kins_tunnel", "certs", "ticket-key", "--out", str(ticket_key)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert ticket_key.stat().st_mode & 0o777 == 0o600
    text = one("tunnel-cloud.yaml", "ConfigMap")["data"]["cloud.yaml"]
    text = text.replace("/etc/kins-tunnel/", f"{etc}/")
    text = re.sub(r'"0\.0\.0\.0:\d+"', '"127.0.0.1:0"', text)
    text = text.replace("alias_discovery: {enabled: true", "alias_discovery: {enabled: false")
    path = tmp_path / "cloud.yaml"
    path.write_text(text)
    cloud = Cloud(load_cloud_config(path))
    assert cloud.tls.context.num_tickets == 1  # tickets on, keyed from the shipped key file
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(cloud.run)
        status, head, stream = await connect(ports.proxy, "test-svc-kins.kins-system:443")
        await stream.aclose()
        assert status == 407, head
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        status, head, stream = await connect(
            ports.proxy,
            "test-svc-kins.kins-system:443",
            f"Proxy-Authorization: Basic {token}\r\n",
        )
        await stream.aclose()
        assert status == 503, head  # authenticated; no edge is connected
        nursery.cancel_scope.cancel()
    ticket_key.unlink()
    with pytest.raises(UserError, match=r"^tunnel\.session_ticket_key_file: cannot read"):
        Cloud(load_cloud_config(path))


def test_image_build_recipe_leaves_the_test_doubles_out(tmp_path: Path) -> None:
    """Run the build stage's RUN line on a copy of the build context (real pip, into a temp
    prefix): the installed package has no kins_tunnel/testing, and its `demo` says why it cannot run."""
    instructions = dockerfile_instructions()
    build_stage = instructions[: max(i for i, (op, _) in enumerate(instructions) if op == "FROM")]
    runs = [arg for op, arg in build_stage if op == "RUN" and "pip install" in arg]
    assert len(runs) == 1
    context = tmp_path / "src"
    context.mkdir()
    for op, arg in build_stage:
        if op == "COPY":
            *sources, _dest = arg.split()
            for source in sources:
                src = ROOT / source
                if src.is_dir():
                    shutil.copytree(
                        src, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                    )
                else:
                    shutil.copy(src, context / source)
    assert (
        context / "kins_tunnel" / "testing"
    ).is_dir()  # it is in the context, so the RUN must drop it
    prefix = tmp_path / "install"
    command = (
        runs[0]
        .replace("/install", str(prefix))
        # --ignore-installed: never touch the package installed in this environment (pip
        # would otherwise uninstall it to "upgrade" it into the temp prefix)
        .replace("pip install", f"{sys.executable} -m pip install --no-deps --ignore-installed -q")
    )
    proc = subprocess.run(
        ["bash", "-c", command], cwd=context, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed = [p for p in prefix.rglob("kins_tunnel") if p.is_dir() and (p / "cli.py").exists()]
    assert len(installed) == 1
    assert not (installed[0] / "testing").exists()
    assert (installed[0] / "demo.py").exists()
    # -S: no .pth files, so the editable install of this checkout cannot shadow the one under test;
    # site-packages stays on the path (after it) for the dependencies.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(installed[0].parent), *site.getsitepackages()]),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            "import kins_tunnel.cli, sys; "
            "print(kins_tunnel.cli.__file__); sys.exit(kins_tunnel.cli.main(['demo']))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.stdout.startswith(str(installed[0])), proc.stdout
    assert proc.returncode == 2, proc.stderr
    assert "kins_tunnel.testing" in proc.stderr and "make demo" in proc.stderr


# --- tunnel-edge-enroll.yaml: edges that enrol with a token ----------------------------------------


def test_enrolling_edge_keeps_its_key_on_the_node_and_reads_the_token_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kins_tunnel.config import edge_config_from_dict

    monkeypatch.setenv("NODE_NAME", "edge7")
    edge = edge_config_from_dict(
        EDGE_ENROLL,
        base_dir=Path("/etc/kins-tunnel"),
        source="deploy/tunnel-edge-enroll.yaml: edge.yaml",
    )
    assert edge.enroll is not None and edge.enroll.node == "edge7"  # from spec.nodeName
    assert edge.enroll.node_env == "NODE_NAME"
    env = {e["name"]: e for e in container(ENROLLING)["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # the token: a directory mount of the Secret (updates reach the pod)
    volume, key = mounted_file(ENROLLING, str(edge.enroll.token_file))
    assert volume["secret"]["secretName"] == "tunnel-edge-token" and key == "token"
    secret = one("tunnel-edge-token.yaml", "Secret")
    assert secret["metadata"]["name"] == "tunnel-edge-token" and set(secret["stringData"]) == {key}
    assert not TOKEN_RE.fullmatch(secret["stringData"][key])  # a placeholder, never a token
    # key, certificate and pinned CA: written to a hostPath directory of the node itself
    pod = ENROLLING["spec"]["template"]["spec"]
    for path in (edge.tls.ca, edge.tls.cert, edge.tls.key):
        volume, _key = mounted_file(ENROLLING, str(path))
        assert volume["hostPath"] == {"path": "/var/lib/kins-tunnel", "type": "DirectoryOrCreate"}
    mount = [m for m in container(ENROLLING)["volumeMounts"] if m["name"] == "state"]
    assert mount and not mount[0].get("readOnly")
    # made the tunnel user's (0700) by an init container that may only chown
    (init,) = pod["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert init["securityContext"]["allowPrivilegeEscalation"] is False
    assert "chmod 0700" in init["command"][-1] and "chown 65532:65532" in init["command"][-1]
    # the shipped hash is a placeholder to replace (README): it can never match a real CA
    assert edge.enroll.ca_hash == "sha256:" + "0" * 64
    assert "certs ca-hash" in (DEPLOY / "tunnel-edge-enroll.yaml").read_text()
    # the rest is the shipped DaemonSet's: same selector, network, probes and services
    assert pod["nodeSelector"] == DAEMONSET["spec"]["template"]["spec"]["nodeSelector"]
    assert pod["hostNetwork"] is True and EDGE_ENROLL["services"] == EDGE["services"]


def test_cloud_enrollment_block_loads_once_uncommented() -> None:
    from kins_tunnel.config import cloud_config_from_dict

    text = one("tunnel-cloud.yaml", "ConfigMap")["data"]["cloud.yaml"]
    lines = text.splitlines()
    start = lines.index("# enrollment:")
    block = [ln.replace("# ", "", 1) for ln in lines[start : start + 4]]
    assert block[0] == "enrollment:" and all(ln.startswith("  ") for ln in block[1:])
    doc = yaml.safe_load("\n".join(block))
    cloud = cloud_config_from_dict(
        {**CLOUD, **doc}, base_dir=Path("/etc/kins-tunnel"), source="cloud.yaml"
    )
    assert cloud.enrollment is not None and cloud.enrollment.ca is not None
    for path in (cloud.enrollment.tokens_file, cloud.enrollment.ca.cert, cloud.enrollment.ca.key):
        volume, _key = mounted_file(DEPLOYMENT, str(path))
        assert volume["secret"]["secretName"] == "tunnel-cloud-enrollment"
        assert volume["secret"]["optional"] is True  # the cloud starts without it until enabled
