"""The Helm chart, rendered and linted by Helm's own engine, for default, sidecar and full values."""

from __future__ import annotations

import base64

import copy
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from gateway.config import Settings, load_settings

from .conftest import Render
from .support import (
    CHART_DIR,
    DASHBOARD,
    Manifest,
    Stage,
    find,
    find_named,
    image_default_config,
    kinds_and_names,
    load_values,
)

RELEASE = "ehr"
FULL = f"{RELEASE}-consent-gateway"
AUDIT_DIR = "/var/lib/consent-gateway"


def _workload(manifests: list[Manifest]) -> Manifest:
    (workload,) = [m for m in manifests if m["kind"] in ("StatefulSet", "Deployment")]
    return workload


def _pod_spec(manifests: list[Manifest]) -> dict[str, Any]:
    spec: dict[str, Any] = _workload(manifests)["spec"]["template"]["spec"]
    return spec


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod["containers"] if c["name"] == "consent-gateway"]
    assert isinstance(container, dict)
    return container


def _port(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


def _settings(manifests: list[Manifest], container: dict[str, Any], tmp_path: Path) -> Settings:
    """What the gateway in that container would load: the ConfigMap file plus its env."""
    config_map = find_named(manifests, "ConfigMap", f"{FULL}-config")
    path = tmp_path / "gateway.yaml"
    path.write_text(config_map["data"]["gateway.yaml"], encoding="utf-8")
    pod_name = f"{FULL}-7d9c-x2x4q"
    environ = {
        e["name"]: e["value"].replace("$(POD_NAME)", pod_name) for e in container["env"] if "value" in e
    }
    return load_settings(path, environ)


@pytest.mark.parametrize("values", ["default", "sidecar", "full"])
def test_helm_lint_strict_is_clean(helm: ModuleType, values: str) -> None:
    report = helm.lint(str(CHART_DIR), None if values == "default" else load_values(values), strict=True)
    assert report["errors"] == []
    warnings = [m for m in report["messages"] if m["severity"] >= 2]
    assert warnings == []


def test_default_values_render_a_standalone_release(render: Render) -> None:
    assert kinds_and_names(render()) == {
        ("ConfigMap", f"{FULL}-config"),
        ("ConfigMap", f"{FULL}-dashboard"),
        ("StatefulSet", FULL),
        ("Service", FULL),
        ("Service", f"{FULL}-pods"),
        ("NetworkPolicy", FULL),
        ("PodDisruptionBudget", FULL),
        ("Secret", f"{FULL}-paging-key"),
    }


def test_deployment_workload_renders_one_shared_claim(render: Render) -> None:
    assert kinds_and_names(render({"workload": "deployment"})) == {
        ("ConfigMap", f"{FULL}-config"),
        ("ConfigMap", f"{FULL}-dashboard"),
        ("Deployment", FULL),
        ("Service", FULL),
        ("NetworkPolicy", FULL),
        ("PodDisruptionBudget", FULL),
        ("PersistentVolumeClaim", f"{FULL}-audit"),
        ("Secret", f"{FULL}-paging-key"),
    }


def test_probes_hit_healthz_and_readyz_on_the_admin_port(render: Render, tmp_path: Path) -> None:
    manifests = render()
    container = _container(_pod_spec(manifests))
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "gateway-admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "gateway-admin"}
    settings = _settings(manifests, container, tmp_path)
    # kubelet probes the pod IP: the admin listener must not be on loopback.
    assert settings.admin.host == "0.0.0.0"
    assert settings.admin.port == _port(container, "gateway-admin") == 9090
    assert settings.listen.port == _port(container, "gateway") == 8080


def test_pod_runs_non_root_with_the_image_uid(render: Render, final_stage: Stage) -> None:
    pod = _pod_spec(render())
    context = _container(pod)["securityContext"]
    uid, gid = (int(part) for part in final_stage.last("USER").args.split(":"))
    assert context["runAsNonRoot"] is True
    assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid)
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["fsGroup"] == gid


def test_pod_gets_no_service_links_and_no_api_token(render: Render) -> None:
    pod = _pod_spec(render())
    # A Service named gateway-* would otherwise inject GATEWAY_* variables the loader rejects.
    assert pod["enableServiceLinks"] is False
    assert pod["automountServiceAccountToken"] is False


def test_audit_log_goes_to_a_per_pod_file_on_the_pods_own_claim(
    render: Render, final_stage: Stage, tmp_path: Path
) -> None:
    manifests = render()
    statefulset = find(manifests, "StatefulSet")
    pod = _pod_spec(manifests)
    container = _container(pod)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == AUDIT_DIR]
    # The claim comes from the StatefulSet's template: one ReadWriteOnce volume per pod name.
    assert not [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (template,) = statefulset["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["name"] == mount["name"]
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert statefulset["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert statefulset["spec"]["serviceName"] == find_named(manifests, "Service", f"{FULL}-pods")["metadata"]["name"]
    assert not [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    assert final_stage.last("VOLUME").exec_form() == [AUDIT_DIR]
    # A stable pod name: after a restart the pod appends to (and delivers) the same file.
    pod_name = f"{FULL}-1"
    config_map = find_named(manifests, "ConfigMap", f"{FULL}-config")
    path = tmp_path / "gateway.yaml"
    path.write_text(config_map["data"]["gateway.yaml"], encoding="utf-8")
    environ = {e["name"]: e["value"].replace("$(POD_NAME)", pod_name) for e in container["env"] if "value" in e}
    assert load_settings(path, environ).audit.path == Path(f"{AUDIT_DIR}/audit-{pod_name}.jsonl")


def test_deployment_workload_shares_a_kept_claim(render: Render, tmp_path: Path) -> None:
    manifests = render({"workload": "deployment"})
    pod = _pod_spec(manifests)
    container = _container(pod)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == AUDIT_DIR]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = find(manifests, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    audit_path = _settings(manifests, container, tmp_path).audit.path
    assert audit_path == Path(f"{AUDIT_DIR}/audit-{FULL}-7d9c-x2x4q.jsonl")


def test_config_map_is_mounted_where_the_image_reads_it(render: Render, final_stage: Stage) -> None:
    manifests = render()
    pod = _pod_spec(manifests)
    container = _container(pod)
    assert container["args"] == final_stage.last("CMD").exec_form()
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/consent-gateway"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == f"{FULL}-config"
    # The mounted file replaces the image's default one whole, so it must keep its listeners.
    image_admin = image_default_config(final_stage)["admin"]
    config = yaml.safe_load(find_named(manifests, "ConfigMap", f"{FULL}-config")["data"]["gateway.yaml"])
    assert config["admin"]["host"] == image_admin["host"]


def test_service_routes_to_the_named_container_ports(render: Render) -> None:
    manifests = render()
    container = _container(_pod_spec(manifests))
    service = find_named(manifests, "Service", FULL)
    assert service["spec"]["selector"] == _workload(manifests)["spec"]["selector"]["matchLabels"]
    targets = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert targets == {"http": "gateway", "admin": "gateway-admin"}
    assert {p["name"] for p in container["ports"]} == set(targets.values())


def test_resources_have_requests_and_limits(render: Render) -> None:
    resources = _container(_pod_spec(render()))["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"cpu", "memory"}


def test_pod_disruption_budget_selects_the_pods(render: Render) -> None:
    manifests = render()
    pdb = find(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == _workload(manifests)["spec"]["selector"]["matchLabels"]


def test_full_values_add_secrets_autoscaler_and_service_monitor(render: Render) -> None:
    manifests = render(load_values("full"))
    assert kinds_and_names(manifests) >= {
        ("Secret", f"{FULL}-env"),
        ("Secret", f"{FULL}-files"),
        ("HorizontalPodAutoscaler", FULL),
        ("ServiceMonitor", FULL),
    }
    workload = _workload(manifests)
    # The autoscaler owns the replica count; a fixed one would fight it on every upgrade.
    assert "replicas" not in workload["spec"]
    hpa = find(manifests, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": FULL}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    monitor = find(manifests, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = monitor["spec"]["endpoints"]
    service_ports = {p["name"] for p in find_named(manifests, "Service", FULL)["spec"]["ports"]}
    assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"


def test_vendor_api_key_reaches_the_env_var_the_config_names(render: Render, tmp_path: Path) -> None:
    manifests = render(load_values("full"))
    container = _container(_pod_spec(manifests))
    assert container["envFrom"] == [{"secretRef": {"name": f"{FULL}-env"}}]
    settings = _settings(manifests, container, tmp_path)
    assert settings.consent.source_api_key_env in find_named(manifests, "Secret", f"{FULL}-env")["stringData"]
    # Secrets never land in the ConfigMap.
    assert "test-key-not-secret" not in find_named(manifests, "ConfigMap", f"{FULL}-config")["data"]["gateway.yaml"]


def test_secret_files_are_mounted_read_only(render: Render) -> None:
    pod = _pod_spec(render(load_values("full")))
    (mount,) = [m for m in _container(pod)["volumeMounts"] if m["mountPath"] == "/var/run/secrets/consent-gateway"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] is True
    assert volume["secret"]["secretName"] == f"{FULL}-files"


def test_existing_secrets_are_used_and_none_created(render: Render) -> None:
    values = load_values("full")
    values["secret"].update(existingEnvSecret="vendor-keys", existingFilesSecret="jwt-keys")
    values["pagingKey"] = {"existingSecret": "paging-keys"}
    manifests = render(values)
    assert not [m for m in manifests if m["kind"] == "Secret"]
    pod = _pod_spec(manifests)
    assert _container(pod)["envFrom"] == [{"secretRef": {"name": "vendor-keys"}}]
    assert {"name": "consent-gateway-secrets", "secret": {"secretName": "jwt-keys"}} in pod["volumes"]


def test_no_secret_values_means_no_secret_wiring(render: Render) -> None:
    manifests = render()
    container = _container(_pod_spec(manifests))
    assert [m["metadata"]["name"] for m in manifests if m["kind"] == "Secret"] == [f"{FULL}-paging-key"]
    assert "envFrom" not in container


@pytest.mark.parametrize("existing", ["", "paging-keys"])
def test_every_pod_seals_paging_links_with_one_kept_key(render: Render, tmp_path: Path, existing: str) -> None:
    """The chart's Secret (a random key, kept on uninstall; read back on upgrade) or the one
    named, mounted read-only in every pod and named by enforcement.paging_key_file."""
    manifests = render({"pagingKey": {"existingSecret": existing}})
    name = existing or f"{FULL}-paging-key"
    pod = _pod_spec(manifests)
    container = _container(pod)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "consent-gateway-paging-key"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] is True
    assert volume["secret"] == {"secretName": name, "items": [{"key": "paging.key", "path": "paging.key"}]}
    settings = _settings(manifests, container, tmp_path)
    assert str(settings.enforcement.paging_key_file) == mount["mountPath"] + "/paging.key"
    made = [m for m in manifests if m["kind"] == "Secret"]
    if existing:
        assert made == []
        return
    (secret,) = made
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    key = base64.b64decode(secret["data"]["paging.key"])
    assert len(key) >= 32
    assert base64.b64decode(find_named(render(), "Secret", name)["data"]["paging.key"]) != key, "random per install"


@pytest.mark.parametrize("workload", ["statefulset", "deployment"])
def test_existing_claim_is_used_and_none_created(render: Render, workload: str) -> None:
    manifests = render({"workload": workload, "persistence": {"existingClaim": "audit-evidence"}})
    assert not [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    volumes = _pod_spec(manifests)["volumes"]
    assert {"name": "consent-gateway-audit", "persistentVolumeClaim": {"claimName": "audit-evidence"}} in volumes


def test_persistence_off_falls_back_to_an_empty_dir(render: Render) -> None:
    manifests = render({"persistence": {"enabled": False}})
    assert not [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    assert {"name": "consent-gateway-audit", "emptyDir": {}} in _pod_spec(manifests)["volumes"]


def test_config_change_rolls_the_pods(render: Render) -> None:
    def checksum(values: dict[str, Any]) -> str:
        annotations = _workload(render(values))["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/config"])

    assert checksum({}) != checksum({"config": {"consent": {"cache_ttl_s": 5}}})


def _sidecar(manifests: list[Manifest]) -> dict[str, Any]:
    data = find_named(manifests, "ConfigMap", f"{FULL}-sidecar")["data"]
    return {key: yaml.safe_load(text) for key, text in data.items()}


def test_sidecar_values_render_no_workload(render: Render) -> None:
    assert kinds_and_names(render(load_values("sidecar"))) == {
        ("ConfigMap", f"{FULL}-config"),
        ("ConfigMap", f"{FULL}-sidecar"),
        ("ConfigMap", f"{FULL}-dashboard"),
        ("PersistentVolumeClaim", f"{FULL}-audit"),
        ("Secret", f"{FULL}-paging-key"),
    }


def test_sidecar_forwards_to_the_fhir_server_on_loopback(render: Render, tmp_path: Path) -> None:
    manifests = render(load_values("sidecar"))
    (container,) = _sidecar(manifests)["container.yaml"]
    settings = _settings(manifests, container, tmp_path)
    assert settings.upstream.url == "http://127.0.0.1:8080/fhir"
    assert settings.listen.port == _port(container, "gateway") == 8081
    assert settings.admin.port == _port(container, "gateway-admin") == 9090


@pytest.mark.parametrize("workers", [None, 4])
def test_workers_value_reaches_listen_workers(render: Render, tmp_path: Path, workers: int | None) -> None:
    manifests = render({} if workers is None else {"workers": workers})
    settings = _settings(manifests, _container(_pod_spec(manifests)), tmp_path)
    assert settings.listen.workers == (workers or 1)
    assert settings.listen.port == 8080


def test_sidecar_patch_carries_the_same_container_and_volumes(render: Render) -> None:
    snippet = _sidecar(render(load_values("sidecar")))
    pod = snippet["patch.yaml"]["spec"]["template"]["spec"]
    assert pod["containers"] == snippet["container.yaml"]
    assert pod["volumes"] == snippet["volumes.yaml"]
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"] == {"fsGroup": 10001, "fsGroupChangePolicy": "OnRootMismatch"}
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The FHIR pod's own securityContext is not ours: the container must carry non-root itself.
    assert container["securityContext"]["runAsNonRoot"] is True
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [f"{FULL}-audit"]


def test_sidecar_leaves_an_existing_fs_group_alone(render: Render) -> None:
    values = load_values("sidecar")
    values["sidecar"]["fsGroup"] = None
    pod = _sidecar(render(values))["patch.yaml"]["spec"]["template"]["spec"]
    assert "securityContext" not in pod


def test_sidecar_and_standalone_run_the_same_container(render: Render) -> None:
    standalone = _container(_pod_spec(render({"ports": {"proxy": 8081}})))
    (sidecar,) = _sidecar(render(load_values("sidecar")))["container.yaml"]
    assert sidecar == standalone


def test_dashboard_ships_in_a_grafana_config_map(render: Render) -> None:
    config_map = find_named(render(), "ConfigMap", f"{FULL}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(config_map["data"]["consent-gateway.json"])
    assert shipped == json.loads(DASHBOARD.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mode": "daemonset"}, "at '/mode': value must be one of 'standalone', 'sidecar'"),
        ({"config": {"listen": {"port": 80}}}, "config.listen is set by the chart: use ports.proxy and workers"),
        ({"config": {"admin": {"host": "127.0.0.1"}}}, "config.admin is set by the chart: use ports.admin"),
        ({"config": {"audit": {"path": "/tmp/audit.jsonl"}}}, "config.audit.path is set by the chart"),
        ({"config": {"upstream": {"url": ""}}}, "config.upstream.url is required in standalone mode"),
        ({"mode": "sidecar"}, "sidecar.fhirPort 8080 collides with ports.proxy or ports.admin"),
        ({"terminationGracePeriodSeconds": 15}, "terminationGracePeriodSeconds 15 must exceed preStopSleepSeconds 10"),
        ({"networkPolicy": {"ingressFrom": []}}, "networkPolicy.ingressFrom must name the ingress"),
    ],
)
def test_contradictory_values_stop_rendering_with_one_line(
    helm: ModuleType, render: Render, values: dict[str, Any], message: str
) -> None:
    with pytest.raises((helm.HelmRenderError, helm.HelmValuesError)) as failure:
        render(copy.deepcopy(values))
    assert message in str(failure.value)


def _values_lines() -> list[str]:
    return (CHART_DIR / "values.yaml").read_text(encoding="utf-8").splitlines()


def test_every_top_level_value_is_documented() -> None:
    lines = _values_lines()
    undocumented = [
        line.split(":")[0]
        for number, line in enumerate(lines)
        if line[:1].isalpha() and not lines[number - 1].startswith("# ")
    ]
    assert undocumented == []


def test_every_top_level_value_is_used_by_a_template() -> None:
    templates = " ".join(path.read_text(encoding="utf-8") for path in (CHART_DIR / "templates").iterdir())
    keys = [line.split(":")[0] for line in _values_lines() if line[:1].isalpha()]
    assert keys and [key for key in keys if f".Values.{key}" not in templates] == []


# --- many replicas: network policy, graceful endpoint removal, alerts, values schema ----------


def test_network_policy_admits_the_ingress_to_the_proxy_port_and_monitoring_to_admin(render: Render) -> None:
    manifests = render()
    policy = find(manifests, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == _workload(manifests)["spec"]["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress"]
    proxy, admin = policy["ingress"]
    container = _container(_pod_spec(manifests))
    assert [p["port"] for p in proxy["ports"]] == ["gateway"] and _port(container, "gateway")
    assert proxy["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    assert [p["port"] for p in admin["ports"]] == ["gateway-admin"] and _port(container, "gateway-admin")
    assert admin["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def test_network_policy_follows_the_configured_peers(render: Render) -> None:
    ingress = [{"namespaceSelector": {"matchLabels": {"team": "edge"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "traefik"}}}]
    policy = find(render({"networkPolicy": {"ingressFrom": ingress, "monitoringFrom": []}}), "NetworkPolicy")["spec"]
    (only,) = policy["ingress"]  # no monitoring peers: the admin port admits nobody
    assert only["from"] == ingress


def test_pre_stop_outlasts_endpoint_removal_within_the_grace_period(render: Render, tmp_path: Path) -> None:
    manifests = render()
    pod = _pod_spec(manifests)
    container = _container(pod)
    assert container["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "10"]}}
    shutdown = _settings(manifests, container, tmp_path).listen.shutdown_timeout_s
    assert 10 + shutdown < pod["terminationGracePeriodSeconds"]


def test_prometheus_rule_alerts_on_metrics_the_gateway_exports(render: Render) -> None:
    from prometheus_client import CollectorRegistry

    from gateway.metrics import Metrics

    rule = find(render(load_values("full")), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    alerts = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {
        "ConsentGatewayLookupErrors", "ConsentGatewayBreakGlassSpike",
        "ConsentGatewayAuditBacklog", "ConsentGatewayChangePollStale",
    }
    exported = {s.name for m in Metrics(CollectorRegistry()).registry.collect() for s in m.samples}
    exported |= {m.name + "_total" for m in Metrics(CollectorRegistry()).registry.collect() if m.type == "counter"}
    for alert, expr in alerts.items():
        names = set(re.findall(r"consent_gateway_[a-z_]+", expr))
        assert names and names <= exported, (alert, names - exported)


@pytest.mark.parametrize(
    "values",
    [
        {"workload": "daemonset"},
        {"persistence": {"accessModes": ["RWX"]}},
        {"preStopSleepSeconds": "ten"},
        {"networkPolicy": {"enabled": True, "ingresFrom": []}},
        {"replicaCuont": 3},
        {"workers": 0},
        {"workers": "two"},
    ],
)
def test_values_schema_refuses_bad_values(helm: ModuleType, render: Render, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError, match="schema"):
        render(copy.deepcopy(values))
    report = helm.lint(str(CHART_DIR), copy.deepcopy(values), strict=True)
    assert report["errors"] or [m for m in report["messages"] if m["severity"] >= 3], report


K8S_VERSION = "1.30.0"  # the oldest Kubernetes the chart supports (NetworkPolicy, StatefulSet retention)


@pytest.mark.parametrize("values", ["default", "deployment", "sidecar", "full"])
def test_manifests_validate_against_the_kubernetes_schemas(render: Render, values: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    chosen = {"default": {}, "deployment": {"workload": "deployment"}}.get(values)
    manifests = render(chosen if chosen is not None else load_values(values))
    checked = 0
    for manifest in manifests:
        if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # Prometheus Operator CRDs: not part of Kubernetes' own schemas
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 4


def test_default_max_response_bytes_fits_the_memory_limit(render: Render, tmp_path: Path) -> None:
    """Measured (README, Limits): many small resources peak at ~9 x N + 55 MiB; keep 10 x N + 64 MiB
    under the limit, so the largest answer accepted cannot get the pod OOM-killed."""
    manifests = render()
    container = _container(_pod_spec(manifests))
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    cap = _settings(manifests, container, tmp_path).upstream.max_response_bytes
    assert 10 * cap + 64 * 2**20 <= int(limit[:-2]) * 2**20


@pytest.mark.parametrize("mode", ["standalone", "sidecar"])
def test_the_chart_keeps_the_officers_pages_to_loopback(render: Render, tmp_path: Path, mode: str) -> None:
    """The chart opens the admin port to monitoring on the pod IP; the officer's pages (who saw
    which sensitive records) answer only loopback there (kubectl port-forward), unless told."""
    from gateway.web.review import is_officer_peer

    def settings_of(values: dict[str, Any]) -> Settings:
        manifests = render(values)
        if mode == "sidecar":
            (container,) = _sidecar(manifests)["container.yaml"]
        else:
            container = _container(_pod_spec(manifests))
        return _settings(manifests, container, tmp_path)

    base = load_values("sidecar") if mode == "sidecar" else {}
    settings = settings_of(base)
    assert settings.admin.host == "0.0.0.0"
    assert is_officer_peer("127.0.0.1", settings.admin.officer_from)
    assert not is_officer_peer("10.42.0.17", settings.admin.officer_from)
    assert is_officer_peer("10.42.0.17", settings_of({**base, "officerFrom": ["10.42.0.0/16"]}).admin.officer_from)


def test_the_product_default_answers_the_officers_pages_to_any_peer_of_the_admin_port() -> None:
    """Outside the chart the admin port is bound to loopback unless configured (CONTRACT §2):
    whoever may reach it may read §10's pages, as before ``admin.officer_from``."""
    from gateway.web.review import is_officer_peer
    from tests.conftest import gateway_settings
    settings = gateway_settings("http://127.0.0.1:1/fhir")
    assert settings.admin.host == "127.0.0.1"
    assert is_officer_peer("192.0.2.7", settings.admin.officer_from)
