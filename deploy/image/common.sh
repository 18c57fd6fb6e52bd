# Sourced by build.sh and check.sh, not run: buildah on storage of its own (vfs, under
# target/image/, removed on exit), so no container daemon, no system storage and no
# overlay support are needed.
#
#   IMAGE_REQUIRED=1   fail instead of skipping when buildah cannot run here (CI sets it)

out=target/image

# buildah on this storage. A command whose start fails because the kernel would not seal
# buildah's copy of itself ("sealing memfd copy: Device or resource busy", a transient
# EBUSY of F_ADD_SEALS in containers/storage's re-exec, seen once in CI) runs again, up
# to three times; any other failure is the command's own and is passed on at once.
bh() {
  local err status try
  err=$(mktemp "${TMPDIR:-/tmp}/buildah-stderr.XXXXXX")
  for try in 1 2 3; do
    status=0
    buildah "${storage_options[@]}" "$@" 2>"$err" || status=$?
    if [ "$status" -eq 0 ] || [ "$try" -eq 3 ] || ! reexec_refused "$err"; then
      cat "$err" >&2
      rm -f "$err"
      return "$status"
    fi
    echo "$script: buildah $1: $(head -n1 "$err"); trying again" >&2
    sleep 1
  done
}

# Whether the buildah whose stderr is in $1 failed in its re-exec, before its command ran.
reexec_refused() {
  grep -q "sealing memfd copy" "$1"
}

# Says why and exits: 0 (skipped), or 1 with IMAGE_REQUIRED=1.
cannot_run() {
  if [ "${IMAGE_REQUIRED:-0}" = 1 ]; then
    echo "$script: $1" >&2
    exit 1
  fi
  echo "$script: SKIPPED: $1" >&2
  exit 0
}

# Sets up the storage and its removal, or skips when buildah cannot run here. As a user
# other than root, the script runs again inside buildah's user namespace, where the
# storage's files and the images' uids can be written (/etc/subuid and /etc/subgid).
start_buildah() {
  command -v buildah >/dev/null || cannot_run "buildah is not installed (sudo apt-get install -y buildah)"
  if [ "$(id -u)" -ne 0 ] && [ -z "${_CONTAINERS_USERNS_CONFIGURED:-}" ]; then
    buildah unshare true 2>/dev/null || cannot_run "buildah cannot enter a user namespace here (user namespaces off, or no /etc/subuid entry for $(id -un))"
    exec buildah unshare bash "$0"
  fi
  mkdir -p "$out"
  storage=$(mktemp -d "$PWD/$out/storage.XXXXXX")
  storage_options=(--root "$storage/root" --runroot "$storage/run" --storage-driver vfs)
  trap cleanup EXIT
  local probe
  if ! probe=$(bh from scratch 2>&1); then
    cannot_run "buildah cannot make a container here: $(printf '%s' "$probe" | tail -n1)"
  fi
  bh rm "$probe" >/dev/null
}

# Stops what the script started (its own stop_started), then removes the containers and
# the storage.
cleanup() {
  local status=$?
  stop_started 2>/dev/null || true
  bh rm --all >/dev/null 2>&1 || true
  rm -rf "$storage"
  exit "$status"
}
stop_started() { :; }
