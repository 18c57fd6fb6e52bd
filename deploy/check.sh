#!/usr/bin/env bash
# Checks what can be checked here of the deployment files: the systemd unit with
# `systemd-analyze verify`, the Kubernetes manifests against the API schemas
# (kubernetes-validate, from PyPI, carries them), and the configs embedded in the
# manifests with the agent's own validation.
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

if ! command -v kubernetes-validate >/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate >/dev/null 2>&1 \
    || python3 -m pip install --quiet --break-system-packages kubernetes-validate >/dev/null
fi
kubernetes-validate --strict --kubernetes-version 1.31 deploy/kubernetes/*.yaml
echo "deploy/check: Kubernetes manifests valid against the 1.31 API schemas"

# The agent's own validation of the configs embedded in the manifests.
python3 - "$work" deploy/kubernetes/*.yaml <<'PY'
import re, sys, pathlib
work = pathlib.Path(sys.argv[1])
for i, f in enumerate(sys.argv[2:]):
    text = pathlib.Path(f).read_text()
    m = re.search(r"config\.toml: \|\n((?:    .*\n|\n)+)", text)
    body = "\n".join(l[4:] for l in m.group(1).splitlines())
    (work / f"config{i}.toml").write_text(body)
PY
for config in "$work"/config*.toml; do
  "$bin" check --config "$config"
done
echo "deploy/check: embedded configs are valid"
