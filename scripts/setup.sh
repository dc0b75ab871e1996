#!/usr/bin/env bash
# Set up a fresh machine: system library for Triton's python backend stub, Orthanc with DICOMweb
# (PACS tests), a virtualenv in .venv with pinned packages, and the project's two packages
# (core/, clients/, export/, tools/) in editable mode.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# Prefer Debian's python3.11: the python backend stub embeds Debian's libpython3.11, and a venv
# from the same build gives it the matching standard library (a pyenv 3.11.x venv mostly works,
# but e.g. multiprocessing, which PyTriton's models use, breaks across patch releases).
if [ -z "${PYTHON:-}" ]; then
  if [ -x /usr/bin/python3.11 ]; then PYTHON=/usr/bin/python3.11; else PYTHON=python3.11; fi
fi
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
  echo "setup: Python 3.11 is required (Triton's python backend stub is built for it)" >&2; exit 1; }

# Debian packages: libpython3.11 (the python backend stub links it), Orthanc with its
# DICOMweb plugin (the PACS tests start their own Orthanc on free loopback ports) and
# dicom3tools (the PACS tests check every object the bridge writes with its dciodvfy), and
# qemu-user (tests/test_int8.py runs ONNX Runtime's int8 kernels on an emulated AVX2 CPU
# without VNNI, where they saturate).
missing=()
ldconfig -p | grep -q 'libpython3.11.so.1.0' || missing+=(libpython3.11)
"$PYTHON" -c 'import ensurepip' 2>/dev/null || missing+=(python3.11-venv)
for pkg in orthanc orthanc-dicomweb dicom3tools qemu-user; do
  [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ] \
    || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} (Debian)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  # Installing must not start Orthanc as a system service (it would take ports 8042/4242 and
  # outlive this script): a policy-rc.d that answers 101 ("action forbidden") keeps
  # invoke-rc.d/deb-systemd-invoke from starting it. Only a file this script created is
  # removed afterwards, so an existing one (e.g. Docker's) is left as it is.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    trap '$SUDO rm -f "$policy"' EXIT
    printf '#!/bin/sh\n# temporary, from scripts/setup.sh: start no services\nexit 101\n' \
      | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
  fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
  # ... nor at the next boot (systemd machines; containers have no running systemd)
  if [[ " ${missing[*]} " == *" orthanc "* ]] && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable orthanc >/dev/null 2>&1 || true
  fi
  if [ -e "$policy" ] && grep -q 'from scripts/setup.sh' "$policy"; then
    $SUDO rm -f "$policy"
    trap - EXIT
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(cat requirements.txt core/pyproject.toml clients/pyproject.toml export/pyproject.toml tools/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing pinned packages (first run: about a minute)"
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps -e core -e clients -e export -e tools
  echo "$want" > "$stamp"
fi
echo "setup: ready (.venv, $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
