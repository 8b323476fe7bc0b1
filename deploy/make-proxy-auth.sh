#!/usr/bin/env bash
# Give proxy users a random password and print the kubectl command that installs them as the
# Secret tunnel-cloud-proxy-auth, which deploy/tunnel-cloud.yaml reads as proxy.auth.basic_file.
# Nothing is sent to the cluster: review the command, then run it.
#
#   deploy/make-proxy-auth.sh USER...
#
# AUTH_DIR/basic holds one "user:password" line per user (mode 0600). A user already in it keeps
# their password, so running the script again with a new user adds that user only. The command
# also takes AUTH_DIR/authz.yaml when it exists (proxy.authz_file, README "Per-user
# authorization"). It creates or updates the Secret; the kubelet refreshes the mounted files and
# the cloud re-reads them, so no restart is needed.
#
# Environment: AUTH_DIR (default ./proxy-auth), NAMESPACE (default kube-system), PYTHON (default
# python3: makes the passwords with its `secrets` module).
set -euo pipefail

usage() { echo "usage: $0 USER..." >&2; exit 2; }

[ $# -ge 1 ] || usage
auth_dir=${AUTH_DIR:-proxy-auth}
namespace=${NAMESPACE:-kube-system}
python=${PYTHON:-python3}

# User names end up in a proxy URL (http://user:password@host:port) and in audit log lines.
for user in "$@"; do
  [[ $user =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]] || { echo "$0: bad user name: $user (letters, digits, '.', '_', '-')" >&2; exit 1; }
done

umask 077
mkdir -p "$auth_dir"
basic=$auth_dir/basic
touch "$basic"
chmod 600 "$basic"

added=()
for user in "$@"; do
  if awk -F: -v u="$user" '$1 == u { found = 1 } END { exit !found }' "$basic"; then
    echo "$0: $user is already in $basic: password kept" >&2
    continue
  fi
  # URL-safe characters only: the password goes into proxy URLs without percent-encoding.
  password=$("$python" -c 'import secrets; print(secrets.token_urlsafe(24))')
  printf '%s:%s\n' "$user" "$password" >> "$basic"
  added+=("$user")
done
[ ${#added[@]} -eq 0 ] || echo "$0: wrote a password for ${added[*]} to $basic (share it with that user only)" >&2

files=(--from-file="basic=$basic")
[ ! -f "$auth_dir/authz.yaml" ] || files+=(--from-file="authz.yaml=$auth_dir/authz.yaml")
echo "kubectl -n $namespace create secret generic tunnel-cloud-proxy-auth ${files[*]} --dry-run=client -o yaml | kubectl apply -f -"
