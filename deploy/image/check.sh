#!/usr/bin/env bash
# Checks the images deploy/image/build.sh wrote, from their OCI archives, as a user would
# meet them:
#   runtime: its labels, user, entrypoint and command; no shell, no package manager;
#            `grant-agent --version` inside names the commit of its revision label.
#   dev:     `grant-agent --version` and `mock-maskinporten --version` inside; then the
#            agent inside (`dev --listen 0.0.0.0:0`, as its default command but on a free
#            port) serves a grant to the host's client, which OpenSSL verifies against the
#            x5c certificate; started again on the same state volume it signs with the
#            same token and certificate.
#   vendor:  a runtime image derived as docs/deployment.md shows, with SoftHSM as the
#            vendor's module, signs with that token.
#
# buildah's chroot isolation shares the host's network, so the host reaches the agent on
# 127.0.0.1. Needs openssl on the host.
#
#   IMAGE_REQUIRED  1: fail instead of skipping when buildah cannot run here
set -euo pipefail
cd "$(dirname "$0")/../.."
script=deploy/image/check.sh
. deploy/image/common.sh
start_buildah

client=${GRANT_AGENT_BIN:-target/release/grant-agent}
[ -x "$client" ] || cargo build --release --locked --quiet
for image in runtime dev; do
  [ -f "$out/grant-agent-$image.oci.tar" ] || { echo "$script: $out/grant-agent-$image.oci.tar is missing; run deploy/image/build.sh" >&2; exit 1; }
done
work=$(mktemp -d "$storage/check.XXXXXX")
fail() { echo "$script: FAILED: $*" >&2; exit 1; }
run() { bh run --isolation chroot "$@"; }

# --- runtime ---------------------------------------------------------------------------
c=$(bh from --quiet "oci-archive:$out/grant-agent-runtime.oci.tar")
label() { bh inspect --type container --format "{{index .OCIv1.Config.Labels \"org.opencontainers.image.$2\"}}" "$1"; }
for name in title description source revision version created licenses; do
  [ -n "$(label "$c" "$name")" ] || fail "runtime: label org.opencontainers.image.$name is missing"
done
revision=$(label "$c" revision)
config=$(bh inspect --type container --format '{{.OCIv1.Config.User}} {{.OCIv1.Config.Entrypoint}} {{.OCIv1.Config.Cmd}}' "$c")
[ "$config" = '10002:10002 [/usr/bin/grant-agent] [serve --config /etc/grant-agent/config.toml]' ] \
  || fail "runtime: user, entrypoint and command are $config"
root=$(bh mount "$c")
for f in bin/sh usr/bin/sh usr/bin/bash bin/busybox usr/bin/apt usr/bin/dpkg; do
  [ ! -e "$root/$f" ] || fail "runtime: /$f is in the image"
done
[ -d "$root/etc/grant-agent" ] && [ "$(stat -c %u "$root/run/grant-agent")" = 10002 ] \
  || fail "runtime: /etc/grant-agent or /run/grant-agent (owned by 10002) is missing"
# What a vendor's C++ module links besides libc (dev's SoftHSM, C++ too, loads with them).
for lib in libstdc++.so.6 libgcc_s.so.1 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 libz.so.1 libssl.so.3 libcrypto.so.3; do
  ls "$root"/usr/lib/*/"$lib" >/dev/null 2>&1 || fail "runtime: $lib is missing"
done
bh umount "$c" >/dev/null
version=$(run "$c" -- grant-agent --version)
echo "$version" | grep -q "^commit ${revision:0:12}" \
  || fail "runtime: grant-agent --version does not name commit ${revision:0:12}: $version"
echo "$script: runtime: labels, user 10002, no shell, vendor-module libraries; grant-agent --version: $(echo "$version" | tr '\n' ' ')"

# --- dev -------------------------------------------------------------------------------
d=$(bh from --quiet "oci-archive:$out/grant-agent-dev.oci.tar")
[ "$(label "$d" revision)" = "$revision" ] || fail "dev: its revision is not the runtime's"
run "$d" -- grant-agent --version | grep -q "^commit ${revision:0:12}" || fail "dev: grant-agent --version"
mock_version=$(run "$d" -- mock-maskinporten --version) || fail "dev: mock-maskinporten --version"
echo "$script: dev: grant-agent --version names ${revision:0:12}; $mock_version"

# The state volume, owned by the image's user as a fresh named volume would be.
state=$work/state
mkdir -m 0750 "$state"
chown 10002:10002 "$state"
agent=""
stop_started() {
  [ -z "$agent" ] || kill "$agent" 2>/dev/null || true
  [ -z "$agent" ] || wait "$agent" 2>/dev/null || true
  agent=""
}

b64url() { local s=${1//-/+}; s=${s//_//}; while [ $(( ${#s} % 4 )) -ne 0 ]; do s="$s="; done; printf '%s' "$s" | base64 -d; }

# Starts the dev agent in a new container of the dev image on the state volume, signs a
# grant from the host, verifies it with OpenSSL and leaves the x5c certificate in $1.
sign_through_dev() {
  local leaf=$1 container addr="" jws header
  container=$(bh from --quiet "oci-archive:$out/grant-agent-dev.oci.tar")
  for try in 1 2 3; do
    # buildah itself in the background (not a function's subshell, nor bh), so that $!
    # is its pid: it passes SIGTERM on to the agent.
    buildah "${storage_options[@]}" run --isolation chroot --volume "$state:/var/lib/grant-agent" "$container" -- \
      grant-agent dev --listen 0.0.0.0:0 --state-dir /var/lib/grant-agent >"$work/out" 2>"$work/log" &
    agent=$!
    for _ in $(seq 1 600); do
      addr=$(sed -n 's/^grant-agent dev: listening on //p' "$work/out")
      [ -n "$addr" ] && break
      kill -0 "$agent" 2>/dev/null || break
      sleep 0.1
    done
    [ -z "$addr" ] && ! kill -0 "$agent" 2>/dev/null && [ "$try" -lt 3 ] && reexec_refused "$work/log" || break
    echo "$script: dev: buildah run: $(head -n1 "$work/log"); trying again" >&2
    stop_started
  done
  [ -n "$addr" ] || kill -0 "$agent" 2>/dev/null || { cat "$work/log" >&2; fail "dev: the agent did not start"; }
  [ -n "$addr" ] || { cat "$work/log" >&2; fail "dev: the agent did not start within 60 s"; }
  grep -q "plain TCP beyond loopback, for development only" "$work/log" \
    || { cat "$work/log" >&2; fail "dev: no warning about plain TCP beyond loopback"; }
  jws=$("$client" client grant --addr "127.0.0.1:${addr##*:}" --client-id image-check --scope test:image --env test)
  header=$(b64url "${jws%%.*}")
  printf '%s' "$header" | sed -E 's/.*"x5c":\["([^"]+)".*/\1/' | base64 -d >"$leaf"
  openssl x509 -inform der -in "$leaf" -pubkey -noout >"$work/public.pem"
  printf '%s' "${jws%.*}" >"$work/input"
  b64url "${jws##*.}" >"$work/signature"
  openssl dgst -sha256 -verify "$work/public.pem" -signature "$work/signature" "$work/input" >/dev/null \
    || fail "dev: OpenSSL did not verify the grant against its x5c certificate"
  stop_started
  bh rm "$container" >/dev/null
}

sign_through_dev "$work/first.der"
echo "$script: dev: served on 0.0.0.0 inside the image, signed a grant from the host, OpenSSL verified it against x5c"
sign_through_dev "$work/second.der"
cmp -s "$work/first.der" "$work/second.der" || fail "dev: a restart on the same state volume made a new certificate"
echo "$script: dev: restarted on the same state volume: same token, same certificate"

# The recipe docs/deployment.md gives for a vendor module, with SoftHSM (C++, as most
# vendors' modules are) as the vendor's: a derived runtime image, nothing run inside to
# build it, signs with the dev token on the same volume.
v=$(bh from --quiet "oci-archive:$out/grant-agent-runtime.oci.tar")
softhsm=$(ls /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so 2>/dev/null | head -n1)
bh copy "$v" "$softhsm" /usr/lib/pkcs11/libvendorpkcs11.so >/dev/null
sed 's|^module = .*|module = "/usr/lib/pkcs11/libvendorpkcs11.so"|' "$state/config.toml" >"$state/vendor.toml"
jws=$(run --volume "$state:/var/lib/grant-agent" --env SOFTHSM2_CONF=/var/lib/grant-agent/softhsm2.conf "$v" -- \
  grant-agent sign --config /var/lib/grant-agent/vendor.toml --client-id image-check --scope test:vendor 2>"$work/vendor.log") \
  || { cat "$work/vendor.log" >&2; fail "runtime: a derived image with a C++ PKCS#11 module did not sign"; }
[ "$(printf '%s' "$jws" | tr -cd . | wc -c)" = 2 ] || fail "runtime: the derived image printed no grant: $jws"
echo "$script: runtime: a derived image with a C++ PKCS#11 module (SoftHSM standing in for a vendor's) signs"
