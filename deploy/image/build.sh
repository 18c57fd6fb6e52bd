#!/usr/bin/env bash
# Builds the OCI images from this checkout with buildah, without a container daemon and
# without a registry of base images: each image is assembled from this machine's files.
#
#   target/image/grant-agent-runtime.oci.tar  the release binary, the glibc libraries it
#       and a typical vendor PKCS#11 module need (C++, zlib, OpenSSL), CA roots, a
#       non-root user; no shell, no package manager.
#       ENTRYPOINT grant-agent, CMD serve --config /etc/grant-agent/config.toml
#   target/image/grant-agent-dev.oci.tar      the runtime plus SoftHSM2 and the local
#       Maskinporten (mock-maskinporten), for development and CI.
#       CMD dev --listen 0.0.0.0:50051 --state-dir /var/lib/grant-agent (a volume)
#
# Needs buildah (Debian: apt-get install buildah), Rust, and SoftHSM2 for the dev image
# (softhsm/setup.sh installs it). docs/deployment.md shows how to run and extend them.
#
#   IMAGE_SOURCE    org.opencontainers.image.source (default: git remote origin's URL)
#   IMAGE_REQUIRED  1: fail instead of skipping when buildah cannot run here
set -euo pipefail
cd "$(dirname "$0")/../.."
script=deploy/image/build.sh
. deploy/image/common.sh
start_buildah

# As softhsm/demo.sh and the benchmark build them, so that CI finds them built.
cargo build --release --locked --quiet
cargo build --release --locked --quiet -p mock-maskinporten
agent=target/release/grant-agent
mock=target/release/mock-maskinporten

# The agent's uid and gid: those of deploy/kubernetes (10001 is the service beside it).
uid=10002
version=$("$agent" --version | sed -n '1s/^grant-agent //p')
revision=$(git rev-parse HEAD)
[ -z "$(git --no-optional-locks status --porcelain --untracked-files=no)" ] || echo "$script: the checkout has uncommitted changes; revision $revision does not describe them" >&2
source_url=${IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null || echo "unknown: set IMAGE_SOURCE")}
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
epoch=$(git log -1 --format=%ct)

# ldd's answer for each file: the libraries' paths and the dynamic loader's.
libraries_of() {
  local f
  for f; do ldd "$f"; done | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $2 ~ /^\(/ { print $1 }' | sort -u
}

# The files of a layer, staged in a folder and written as a tar (owned by root, but the
# folders `owned` names belong to the agent's user), so buildah needs no chown of its own.
stage_tar() {
  local dir=$1 tar=$2 owned=$3
  local common=(-C "$dir" --sort=name --mtime="@$epoch" --numeric-owner)
  tar "${common[@]}" --owner=0 --group=0 --exclude="./$owned" -cf "$tar" .
  tar "${common[@]}" --owner="$uid" --group="$uid" --no-recursion -rf "$tar" "./$owned"
}

# Copies the libraries among the files, and every library the files need, with theirs,
# into the stage's multiarch folder; puts the dynamic loader where binaries look for it.
stage_libraries() {
  local stage=$1 lib name loader=""
  shift
  local todo
  todo=$({ printf '%s\n' "$@" | grep '\.so'; libraries_of "$@"; } | sort -u)
  while [ -n "$todo" ]; do
    local next=()
    for lib in $todo; do
      name=$(basename "$lib")
      if [[ $name == ld-linux* ]]; then loader=$lib; fi
      [ -e "$stage/usr/lib/$triplet/$name" ] && continue
      cp -L "$lib" "$stage/usr/lib/$triplet/$name"
      next+=("$lib")
    done
    todo=""
    [ ${#next[@]} -eq 0 ] || todo=$(libraries_of "${next[@]}" | while read -r l; do
      [ -e "$stage/usr/lib/$triplet/$(basename "$l")" ] || echo "$l"
    done)
  done
  # /lib64/ld-linux-x86-64.so.2 (in binaries) is usr/lib64/... here: lib and lib64 are
  # links into usr, as on Debian since 12.
  if [ -n "$loader" ] && [ "$loader" != "/lib/$triplet/$(basename "$loader")" ]; then
    local at=usr${loader#/usr}
    mkdir -p "$stage/$(dirname "$at")"
    ln -sfn "/usr/lib/$triplet/$(basename "$loader")" "$stage/$at"
  fi
}

libc=$(libraries_of "$agent" | grep '/libc\.so\.6$')
triplet=$(basename "$(dirname "$libc")")
# What vendor PKCS#11 modules link besides libc: most are C++, many use zlib and
# OpenSSL 3, older ones still name libdl, libpthread and librt.
vendor=()
for name in libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 libgcc_s.so.1 libstdc++.so.6 \
  libz.so.1 libssl.so.3 libcrypto.so.3; do
  found=""
  for dir in "/lib/$triplet" "/usr/lib/$triplet"; do
    [ -e "$dir/$name" ] && found="$dir/$name" && break
  done
  [ -n "$found" ] || { echo "$script: $name is not on this machine (Debian: libstdc++6, zlib1g, libssl3)" >&2; exit 1; }
  vendor+=("$found")
done

work=$(mktemp -d "$storage/stage.XXXXXX")

# --- runtime ---------------------------------------------------------------------------
rt=$work/runtime
mkdir -p "$rt/usr/bin" "$rt/usr/lib/$triplet" "$rt/etc/ssl/certs" "$rt/etc/grant-agent" \
  "$rt/run/grant-agent" "$rt/tmp"
ln -s usr/lib "$rt/lib"
ln -s usr/lib64 "$rt/lib64"
install -m 0755 "$agent" "$rt/usr/bin/grant-agent"
stage_libraries "$rt" "$agent" "${vendor[@]}"
[ -s /etc/ssl/certs/ca-certificates.crt ] || { echo "$script: no CA roots in /etc/ssl/certs/ca-certificates.crt (apt-get install ca-certificates)" >&2; exit 1; }
cp -L /etc/ssl/certs/ca-certificates.crt "$rt/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\ngrant-agent:x:%s:%s:grant-agent:/var/lib/grant-agent:/usr/sbin/nologin\n' "$uid" "$uid" >"$rt/etc/passwd"
printf 'root:x:0:\ngrant-agent:x:%s:\n' "$uid" >"$rt/etc/group"
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$rt/etc/nsswitch.conf"
chmod 1777 "$rt/tmp"
chmod 0750 "$rt/run/grant-agent"
stage_tar "$rt" "$work/runtime.tar" run/grant-agent

labels() {
  local title=$1 description=$2
  printf -- '--label\0%s\0' \
    "org.opencontainers.image.title=$title" \
    "org.opencontainers.image.description=$description" \
    "org.opencontainers.image.source=$source_url" \
    "org.opencontainers.image.revision=$revision" \
    "org.opencontainers.image.version=$version" \
    "org.opencontainers.image.created=$created" \
    "org.opencontainers.image.licenses=Apache-2.0"
}

c=$(bh from scratch)
bh add "$c" "$work/runtime.tar" / >/dev/null
mapfile -d '' runtime_labels < <(labels grant-agent-runtime \
  "Signs Maskinporten JWT grants with a key kept in a PKCS#11 token; mount or derive to add the HSM vendor's module")
bh config --user "$uid:$uid" --workingdir / \
  --env PATH=/usr/bin --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --entrypoint '["/usr/bin/grant-agent"]' --cmd '["serve", "--config", "/etc/grant-agent/config.toml"]' \
  --port 50051 --stop-signal SIGTERM "${runtime_labels[@]}" "$c"
bh commit --quiet --format oci --rm "$c" "localhost/grant-agent-runtime:$version" >/dev/null
rm -f "$out/grant-agent-runtime.oci.tar"
bh push --quiet "localhost/grant-agent-runtime:$version" \
  "oci-archive:$out/grant-agent-runtime.oci.tar:grant-agent-runtime:$version"
echo "$script: $out/grant-agent-runtime.oci.tar ($(du -h "$out/grant-agent-runtime.oci.tar" | cut -f1), grant-agent $version, $revision)"

# --- dev: the runtime plus SoftHSM2 and the local Maskinporten --------------------------
softhsm=""
for f in /usr/lib/softhsm/libsofthsm2.so "/usr/lib/$triplet/softhsm/libsofthsm2.so"; do
  [ -e "$f" ] && softhsm=$f && break
done
[ -n "$softhsm" ] || { echo "$script: SoftHSM2 is not installed (bash softhsm/setup.sh)" >&2; exit 1; }
dv=$work/dev
mkdir -p "$dv/usr/bin" "$dv/usr/lib/softhsm" "$dv/usr/lib/$triplet" "$dv/var/lib/grant-agent"
install -m 0755 "$mock" "$dv/usr/bin/mock-maskinporten"
# Where `grant-agent dev` looks first, whichever folder this machine keeps it in.
cp -L "$softhsm" "$dv/usr/lib/softhsm/libsofthsm2.so"
stage_libraries "$dv" "$mock" "$softhsm"
rm "$dv/usr/lib/$triplet/libsofthsm2.so"
# Only what the runtime does not have already.
for f in "$dv/usr/lib/$triplet"/*; do
  [ ! -e "$rt/usr/lib/$triplet/$(basename "$f")" ] || rm "$f"
done
rm -f "$dv/usr/lib64"/* && rmdir "$dv/usr/lib64" 2>/dev/null || true
chmod 0750 "$dv/var/lib/grant-agent"
stage_tar "$dv" "$work/dev.tar" var/lib/grant-agent

c=$(bh from --pull-never "localhost/grant-agent-runtime:$version")
bh add "$c" "$work/dev.tar" / >/dev/null
mapfile -d '' dev_labels < <(labels grant-agent-dev \
  "grant-agent on a throwaway SoftHSM2 token, with the local Maskinporten (mock-maskinporten): for development and CI, never production")
bh config --workingdir /var/lib/grant-agent --volume /var/lib/grant-agent \
  --cmd '["dev", "--listen", "0.0.0.0:50051", "--state-dir", "/var/lib/grant-agent"]' \
  "${dev_labels[@]}" "$c"
bh commit --quiet --format oci --rm "$c" "localhost/grant-agent-dev:$version" >/dev/null
rm -f "$out/grant-agent-dev.oci.tar"
bh push --quiet "localhost/grant-agent-dev:$version" \
  "oci-archive:$out/grant-agent-dev.oci.tar:grant-agent-dev:$version"
echo "$script: $out/grant-agent-dev.oci.tar ($(du -h "$out/grant-agent-dev.oci.tar" | cut -f1), with SoftHSM2 and mock-maskinporten)"
