#!/usr/bin/env bash
# Sets up opencryptoki's soft token (Debian package `opencryptoki`, slot 3) as a second
# PKCS#11 implementation for the integration suite. It differs from SoftHSM where real HSMs
# differ: no CKM_SHA256_RSA_PKCS (only CKM_RSA_PKCS), fixed slot numbers, a token clock
# in a form cryptoki cannot parse, a slot daemon, and PINs that must be changed after
# initialisation.
#
# It initialises slot 3 as "grant-agent-test" when the token there is new, and writes
# $GRANT_AGENT_OCK_DIR (default /var/lib/grant-agent-test/opencryptoki)/config.toml and pin;
# later runs reuse it. A token initialised by someone else is left alone and the script
# stops.
set -euo pipefail
trap 'echo "opencryptoki.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
state=${GRANT_AGENT_OCK_DIR:-/var/lib/grant-agent-test/opencryptoki}
slot=3
label=grant-agent-test
default_so_pin=87654321

if ! command -v pkcsslotd >/dev/null && [ ! -x /usr/sbin/pkcsslotd ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends opencryptoki >/dev/null
fi
module=$(ls /usr/lib/*/pkcs11/libopencryptoki.so 2>/dev/null | head -n1)
[ -n "$module" ] || { echo "opencryptoki: libopencryptoki.so not found" >&2; exit 1; }

# The daemon needs its run and lock folders (systemd's tmpfiles makes them on a booted host).
# The soft token keeps its objects in swtok/TOK_OBJ, which it does not create by itself.
$sudo mkdir -p /run/opencryptoki /var/lock/opencryptoki /var/lib/opencryptoki/swtok/TOK_OBJ "$state"
$sudo chgrp pkcs11 /run/opencryptoki /var/lock/opencryptoki /var/lib/opencryptoki/swtok /var/lib/opencryptoki/swtok/TOK_OBJ
$sudo chmod 770 /run/opencryptoki /var/lock/opencryptoki /var/lib/opencryptoki/swtok /var/lib/opencryptoki/swtok/TOK_OBJ
$sudo chmod 700 "$state"

token_info() { $sudo /usr/sbin/pkcsconf -t -c $slot 2>/dev/null || true; }
# Start the slot daemon (again, if a stopping one was still shutting down), then wait
# until the token answers.
for _ in $(seq 1 50); do
  pgrep -x pkcsslotd >/dev/null || $sudo /usr/sbin/pkcsslotd || true
  token_info | grep -q "Flags:" && break
  sleep 0.2
done
if ! token_info | grep -q "Flags:"; then
  echo "opencryptoki: pkcsslotd does not answer; see 'pkcsconf -t -c $slot'" >&2
  exit 1
fi
current=$(token_info | sed -n 's/^\s*Label: *//p' | sed 's/ *$//')
flags=$(token_info | sed -n 's/^\s*Flags: *//p')
if [ "$current" = "$label" ] && [ -f "$state/pin" ] && [ -f "$state/config.toml" ]; then
  echo "opencryptoki: token \"$label\" ready in slot $slot ($module); config in $state/config.toml"
  exit 0
fi
if [[ "$flags" == *TOKEN_INITIALIZED* ]]; then
  echo "opencryptoki: slot $slot holds token \"$current\", not this suite's; leaving it alone." >&2
  echo "  (re-initialise it yourself, or set GRANT_AGENT_OCK_DIR to where its PIN files are)" >&2
  exit 1
fi

# A new token: label it, change the default SO PIN, set the user PIN and change it once,
# as opencryptoki requires before the user may log in. Tests use their own key labels,
# so the token is reused across runs.
user_pin=$(printf '%08d' $(( RANDOM * RANDOM % 100000000 )))
new_so_pin=$(printf '%08d' $(( RANDOM * RANDOM % 100000000 )))
echo "$label" | $sudo /usr/sbin/pkcsconf -c $slot -I -S "$default_so_pin" >/dev/null
$sudo /usr/sbin/pkcsconf -c $slot -P -S "$default_so_pin" -n "$new_so_pin" >/dev/null
$sudo /usr/sbin/pkcsconf -c $slot -u -S "$new_so_pin" -n 87650000 >/dev/null
$sudo /usr/sbin/pkcsconf -c $slot -p -U 87650000 -n "$user_pin" >/dev/null
printf '%s' "$new_so_pin" | $sudo tee "$state/so-pin" >/dev/null
printf '%s' "$user_pin" | $sudo tee "$state/pin" >/dev/null
$sudo chmod 600 "$state/so-pin" "$state/pin"
$sudo tee "$state/config.toml" >/dev/null <<TOML
# Written by softhsm/opencryptoki.sh: opencryptoki's soft token, for tests.
unix_socket = "agent.sock"
default_environment = "test"

[pkcs11]
module = "$module"
token_label = "$label"
pin_file = "pin"
TOML
echo "opencryptoki: token \"$label\" ready in slot $slot ($module); config in $state/config.toml"
