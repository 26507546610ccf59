#!/usr/bin/env bash
# Installs what the cross-language tests (tests/other_languages.rs) need, and nothing when
# it is already installed:
#   - a Python venv in target/clients/venv with tests/clients/python/requirements.txt;
#   - tests/clients/node/node_modules from package-lock.json (npm ci).
# Each part keeps a stamp holding the hash of its pinned inputs and is redone only when
# that hash changes. Safe to run concurrently: a lock serialises runs.
# Needs python3 >= 3.11 with the venv module, and node >= 20 with npm.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
clients="$root/tests/clients"
work="$root/target/clients"
mkdir -p "$work"

if command -v flock >/dev/null; then
  exec 9>"$work/setup.lock"
  flock 9
fi

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# Python
python="${PYTHON:-python3}"
requirements="$clients/python/requirements.txt"
venv="$work/venv"
want="$(hash_of "$requirements") $("$python" -c 'import sys; print(sys.version.split()[0])')"
if [[ -x "$venv/bin/python" && "$(cat "$venv/.setup-stamp" 2>/dev/null)" == "$want" ]]; then
  echo "python: $venv is up to date"
else
  echo "python: creating $venv from $requirements"
  "$python" -c 'import sys; assert sys.version_info >= (3, 11), "python3 >= 3.11 needed"'
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    --requirement "$requirements"
  echo "$want" >"$venv/.setup-stamp"
fi

# Node
node_dir="$clients/node"
want="$(hash_of "$node_dir/package-lock.json") $(node --version)"
stamp="$node_dir/node_modules/.setup-stamp"
if [[ "$(cat "$stamp" 2>/dev/null)" == "$want" ]]; then
  echo "node: $node_dir/node_modules is up to date"
else
  echo "node: npm ci in $node_dir"
  node -e 'if (+process.versions.node.split(".")[0] < 20) { console.error("node >= 20 needed"); process.exit(1) }'
  (cd "$node_dir" && npm ci --ignore-scripts --no-audit --no-fund)
  echo "$want" >"$stamp"
fi
