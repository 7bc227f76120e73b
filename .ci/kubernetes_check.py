"""Validates what `kubectl kustomize` rendered from config/kubernetes/ (called by
.ci/kubernetes.sh with the rendered files, inside its venv: needs kubernetes-validate, PyYAML and
jsonschema).

1. Every document, against Kubernetes 1.29 (the first release with native sidecars on by
   default) and the newest release the installed kubernetes-validate knows, with
   `kubernetes-validate --strict` (unknown fields are errors). That tool has no schema for custom
   resources and only *warns* about them, exiting 0: a warning is accepted only for the two
   Prometheus Operator kinds below, and every document must be reported on for both versions.
2. PodMonitor and PrometheusRule, against a strict schema of the operator's fields that these
   manifests use (additionalProperties false at every level, so a misspelt key fails). The
   packaged models found (npm @kubernetes-models/prometheus-operator, PyPI
   cloudcoil-models-prometheus-operator) accept unknown fields, so they would not catch that.
3. What no schema sees: the PodMonitor selects the app's pods and names a port they have; the
   PrometheusRule's groups are the shipped rules file's, save the recording rule patched to the
   ConfigMap's token.max_entries; each overlay names exactly one provider; the sidecar's config
   volume is the rendered ConfigMap; a [shared] config's Redis is a rendered Service, its key
   file is mounted from a Secret, and the NetworkPolicy admits exactly the app's pods to Redis on
   6379; overlays/fleet's token-sidecar.toml is the base's plus its [shared] table.

Usage: kubernetes_check.py RENDERED.yaml...  (each named after its kustomization, e.g.
overlays-fleet.yaml, overlays-fleet+observability.yaml). Exits 1 listing every failure.
"""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config/observability/token-sidecar-alerts.yml"
BASE_TOML = ROOT / "config/kubernetes/base/token-sidecar.toml"
FLEET_TOML = ROOT / "config/kubernetes/overlays/fleet/token-sidecar.toml"
MIN_VERSION = "1.29.0"
CUSTOM = {("monitoring.coreos.com/v1", kind) for kind in ("PodMonitor", "PrometheusRule")}
SIDECAR = "token-sidecar"
PROVIDERS = ("TOKEN_SIDECAR_UPSTREAM", "TOKEN_SIDECAR_GENESYS_REGION")
# The venv's own command, beside the interpreter running this.
VALIDATE = str(Path(sys.executable).parent / "kubernetes-validate")

errors = []


def fail(where, message):
    errors.append(f"{where}: {message}")


# --- 1. kubernetes-validate ------------------------------------------------------------------
def newest_version():
    """The newest Kubernetes release the installed kubernetes-validate knows: its --help says
    what -k defaults to, which is that release."""
    out = subprocess.run([VALIDATE, "--help"], capture_output=True, text=True,
                         check=True).stdout
    found = re.search(r"Defaults\s+to\s+(\d+\.\d+\.\d+)", out)
    if not found:
        sys.exit(f"kubernetes-validate --help no longer says its default version:\n{out}")
    return found.group(1)


def validate_file(path, docs, versions):
    versions_args = [arg for v in versions for arg in ("-k", v)]
    run = subprocess.run([VALIDATE, "--strict", *versions_args, str(path)],
                         capture_output=True, text=True)
    seen = {}  # (kind, version) -> count of INFO passed / accepted WARN lines
    for line in run.stdout.splitlines():
        if m := re.match(r"INFO .* passed for resource ([a-z0-9]+)/\S+ against version (\S+)$",
                         line):
            key = (m.group(1), m.group(2))
        elif m := re.match(r"WARN .* Couldn't find schema for kind (\w+) with api version (\S+) "
                           r"for kubernetes version (\S+)$", line):
            if (m.group(2), m.group(1)) not in CUSTOM:
                fail(path.name, f"no schema for {m.group(2)} {m.group(1)}: {line}")
                continue
            key = (m.group(1).lower(), m.group(3))
        else:
            fail(path.name, line or "(empty line)")
            continue
        seen[key] = seen.get(key, 0) + 1
    if run.returncode != 0 or run.stderr.strip():
        fail(path.name, f"kubernetes-validate exited {run.returncode}: {run.stderr.strip()}")
    for version in versions:
        short = ".".join(version.split(".")[:2])
        for kind in {d["kind"].lower() for d in docs}:
            want = sum(1 for d in docs if d["kind"].lower() == kind)
            if seen.get((kind, short), 0) != want:
                fail(path.name, f"{want} {kind} document(s), kubernetes-validate reported "
                                f"{seen.get((kind, short), 0)} against {short}")


def validator_rejects_unknown_fields(versions):
    """The check means something only if --strict still rejects a misspelt field."""
    bad = ROOT / "target/kubernetes/strict-selftest.yaml"
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndatta: {}\n")
    for version in versions:
        run = subprocess.run([VALIDATE, "--strict", "-k", version, str(bad)],
                             capture_output=True, text=True)
        if run.returncode == 0:
            fail("kubernetes-validate", f"--strict -k {version} accepted an unknown field")


# --- 2. the Prometheus Operator's custom resources ---------------------------------------------
def obj(properties, required=()):
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                          r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
METADATA = obj({"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                "namespace": {"type": "string"}, "labels": STRING_MAP,
                "annotations": STRING_MAP}, ["name"])
SELECTOR = obj({"matchLabels": STRING_MAP, "matchExpressions": {"type": "array", "items": obj(
    {"key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
     "values": {"type": "array", "items": {"type": "string"}}}, ["key", "operator"])}})


def resource(kind, spec):
    return obj({"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                "metadata": METADATA, "spec": spec}, ["apiVersion", "kind", "metadata", "spec"])


SCHEMAS = {
    "PodMonitor": resource("PodMonitor", obj({
        "selector": SELECTOR,
        "namespaceSelector": obj({"any": {"type": "boolean"},
                                  "matchNames": {"type": "array", "items": {"type": "string"}}}),
        "jobLabel": {"type": "string"},
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": obj({
            "port": {"type": "string"}, "portNumber": {"type": "integer"},
            "path": {"type": "string", "pattern": "^/"}, "scheme": {"enum": ["http", "https"]},
            "interval": DURATION, "scrapeTimeout": DURATION, "honorLabels": {"type": "boolean"},
            "honorTimestamps": {"type": "boolean"}})},
    }, ["selector"])),
    "PrometheusRule": resource("PrometheusRule", obj({"groups": {"type": "array", "items": obj({
        "name": {"type": "string", "minLength": 1}, "interval": DURATION,
        "query_offset": DURATION, "limit": {"type": "integer"}, "labels": STRING_MAP,
        "partial_response_strategy": {"type": "string"},
        "rules": {"type": "array", "items": {**obj({
            "record": {"type": "string"}, "alert": {"type": "string"},
            "expr": {"type": ["string", "integer"]}, "for": DURATION,
            "keep_firing_for": DURATION, "labels": STRING_MAP, "annotations": STRING_MAP,
        }, ["expr"]), "oneOf": [{"required": ["record"]}, {"required": ["alert"]}]}},
    }, ["name", "rules"])}})),
}


def check_custom(where, doc):
    for e in jsonschema.Draft202012Validator(SCHEMAS[doc["kind"]]).iter_errors(doc):
        fail(where, f"{doc['kind']} {'.'.join(map(str, e.absolute_path))}: {e.message}")


# --- 3. what the schemas cannot see ----------------------------------------------------------
def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def sidecar_of(deployment):
    spec = deployment["spec"]["template"]["spec"]
    return next((c for c in spec.get("initContainers", []) if c["name"] == SIDECAR), None)


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def check_render(path, docs):
    where = path.name
    kinds = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    apps = [d for d in kinds.get("Deployment", []) if sidecar_of(d)]
    if len(apps) != 1:
        fail(where, f"want one Deployment with the {SIDECAR} init container, found {len(apps)}")
        return
    app = apps[0]
    pod = app["spec"]["template"]
    sidecar = sidecar_of(app)
    env = env_of(sidecar)

    named = [p for p in PROVIDERS if env.get(p)]
    want = 0 if path.stem == "base" else 1
    if len(named) != want:
        fail(where, f"the sidecar names {named or 'no provider'}; want {want} of {PROVIDERS}")

    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    maps = {d["metadata"]["name"]: d for d in kinds.get("ConfigMap", [])}
    mounts = {m["mountPath"]: m["name"] for m in sidecar.get("volumeMounts", [])}
    config_path = Path(env.get("TOKEN_SIDECAR_CONFIG", ""))
    config_volume = volumes.get(mounts.get(str(config_path.parent), ""), {})
    config_map = maps.get(config_volume.get("configMap", {}).get("name"))
    if not config_map or config_path.name not in config_map.get("data", {}):
        fail(where, f"TOKEN_SIDECAR_CONFIG {config_path} is not a key of a rendered ConfigMap "
                    f"mounted at {config_path.parent}")
        return
    config = tomllib.loads(config_map["data"][config_path.name])

    for monitor in kinds.get("PodMonitor", []):
        if not selects(monitor["spec"]["selector"], pod["metadata"].get("labels", {})):
            fail(where, f"PodMonitor {monitor['metadata']['name']} does not select the app's pods")
        ports = {p.get("name") for c in pod["spec"].get("initContainers", []) +
                 pod["spec"]["containers"] for p in c.get("ports", [])}
        for endpoint in monitor["spec"].get("podMetricsEndpoints", []):
            if endpoint.get("port") not in ports:
                fail(where, f"PodMonitor port {endpoint.get('port')!r} is not a port of the pod")
    for rule in kinds.get("PrometheusRule", []):
        check_rules(where, rule, config)
    if "shared" in config:
        check_fleet(where, kinds, pod, sidecar, volumes, config["shared"])


def check_rules(where, rule, config):
    shipped = yaml.safe_load(RULES.read_text())["groups"]
    rendered = rule["spec"]["groups"]
    max_entries = config.get("token", {}).get("max_entries", 100000)
    recorded = rendered[0]["rules"][0] if rendered and rendered[0].get("rules") else {}
    if recorded.get("record") != "token_sidecar:cache_max_entries:config":
        fail(where, "the PrometheusRule's first rule is no longer the max_entries recording rule")
    else:
        if recorded.get("expr") != f"vector({max_entries})":
            fail(where, f"the PrometheusRule records {recorded.get('expr')!r}, but the "
                        f"ConfigMap's token.max_entries is {max_entries}")
        shipped[0]["rules"][0]["expr"] = recorded["expr"]
    if rendered != shipped:
        fail(where, f"the PrometheusRule's groups differ from {RULES.relative_to(ROOT)} (beyond "
                    "max_entries): run python3 scripts/prometheusrule.py")


def check_fleet(where, kinds, pod, sidecar, volumes, shared):
    host = re.match(r"rediss?://(?:[^@/]*@)?([^:/]+):?(\d*)", shared.get("redis", ""))
    port = int(host.group(2) or 6379) if host else None
    services = {s["metadata"]["name"]: s for s in kinds.get("Service", [])}
    service = services.get(host.group(1) if host else "")
    if not service or port not in [p["port"] for p in service["spec"]["ports"]]:
        fail(where, f"[shared] redis {shared.get('redis')!r} is not a rendered Service and port")
        return
    redis_pods = [d["spec"]["template"]["metadata"]["labels"] for d in kinds.get("Deployment", [])
                  if selects({"matchLabels": service["spec"]["selector"]},
                             d["spec"]["template"]["metadata"].get("labels", {}))]
    if len(redis_pods) != 1:
        fail(where, f"the Service {service['metadata']['name']} selects {len(redis_pods)} "
                    "Deployments' pods, want 1")
        return
    key_dir = str(Path(shared.get("key_file", "")).parent)
    mount = next((m for m in sidecar.get("volumeMounts", []) if m["mountPath"] == key_dir), None)
    if not mount or "secret" not in volumes.get(mount["name"], {}):
        fail(where, f"[shared] key_file's directory {key_dir} is not a Secret in the sidecar")
    policies = [p for p in kinds.get("NetworkPolicy", [])
                if selects(p["spec"]["podSelector"], redis_pods[0])]
    if len(policies) != 1:
        fail(where, f"want one NetworkPolicy for the Redis pods, found {len(policies)}")
        return
    spec = policies[0]["spec"]
    rules = spec.get("ingress", [])
    admitted = [f for r in rules for f in r.get("from", [])]
    ports = [p.get("port") for r in rules for p in r.get("ports", [])]
    if (spec.get("policyTypes") != ["Ingress"] or len(rules) != 1 or len(admitted) != 1
            or set(admitted[0]) != {"podSelector"} or ports != [6379]):
        fail(where, "the NetworkPolicy must admit exactly one podSelector, on 6379 only")
    elif not selects(admitted[0]["podSelector"], pod["metadata"].get("labels", {})):
        fail(where, "the NetworkPolicy's podSelector does not match the app's pods")
    elif not (admitted[0]["podSelector"].get("matchLabels")):
        fail(where, "the NetworkPolicy's podSelector is empty (it would admit every pod)")


def main():
    newest = newest_version()
    versions = [MIN_VERSION] if newest == MIN_VERSION else [MIN_VERSION, newest]
    print(f"kubernetes-validate --strict against {', '.join(versions)}")
    validator_rejects_unknown_fields(versions)
    if not FLEET_TOML.read_text().startswith(BASE_TOML.read_text()):
        fail(FLEET_TOML.relative_to(ROOT), f"no longer starts with {BASE_TOML.relative_to(ROOT)}")
    for name in sys.argv[1:]:
        path = Path(name)
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if not docs:
            fail(path.name, "rendered nothing")
            continue
        validate_file(path, docs, versions)
        for doc in docs:
            if (doc.get("apiVersion"), doc.get("kind")) in CUSTOM:
                check_custom(path.name, doc)
        check_render(path, docs)
        print(f"{path.name}: {len(docs)} documents: "
              f"{', '.join(sorted(d['kind'] for d in docs))}")
    if errors:
        for e in errors:
            print(f"FAIL: {e}")
        sys.exit(1)
    print(f"{len(sys.argv) - 1} renders valid")


if __name__ == "__main__":
    main()
