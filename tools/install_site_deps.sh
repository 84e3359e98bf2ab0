#!/usr/bin/env bash
# Installs what the site check (tests/test_site.py, tools/site_preview.py) needs, when it is missing:
# Debian's pandoc and chromium (apt), and the playwright Python package that drives chromium (pip).
# No browser is downloaded: playwright uses /usr/bin/chromium. Quiet when everything is already there.
# usage: tools/install_site_deps.sh [python]   (default: .venv/bin/python)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
status=0

missing=()
command -v pandoc >/dev/null || missing+=(pandoc)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
  echo "installing ${missing[*]} with apt-get"
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"; } \
       >/tmp/install_site_deps.log 2>&1; then
    echo "could not install ${missing[*]} (see /tmp/install_site_deps.log)" >&2
    status=1
  fi
fi

if ! "$PY" -c "import playwright" 2>/dev/null; then
  echo "installing playwright with pip (the Python package only; it will drive /usr/bin/chromium)"
  "$PY" -m pip install --quiet playwright || { echo "could not install playwright" >&2; status=1; }
fi
exit $status
