# Sourced by .ci/demo and .ci/test: make ./.venv (or $APERSIST_VENV) with apersist and its
# test tools installed, reinstalling only when pyproject.toml changed. Needs only python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${APERSIST_VENV:-.venv}
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  echo "setting up $VENV (first run only)..."
  python3 -m venv "$VENV"
fi
want=$(sha256sum pyproject.toml | cut -c1-64)
stamp="$VENV/.apersist-installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log="$VENV/pip-install.log"
  echo "installing apersist and its test tools into $VENV (log: $log)..."
  if ! { "$PY" -m pip install --disable-pip-version-check --upgrade pip &&
         "$PY" -m pip install --disable-pip-version-check -e ".[test,bench]"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "pip install failed; the whole log is in $log" >&2
    exit 1
  fi
  echo "$want" >"$stamp"
fi
