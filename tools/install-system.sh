#!/usr/bin/env bash
# A system-wide install every user's Jupyter can use (`make install`).
#
# As root: a virtualenv at PREFIX (default /opt/sandbox-kernel) made from /usr/bin/python3
# (world-readable, unlike an interpreter under a private home), with sandbox-kernel, its
# executor and JupyterLab installed from this checkout; the sandbox kernelspecs installed
# into it (PREFIX/share/jupyter/kernels, found by PREFIX/bin/jupyter); everything readable
# by all; PREFIX/bin/sandbox-kernel linked into BINDIR (default /usr/local/bin).
#
# Usage: tools/install-system.sh [--editable] [--no-lab] [PREFIX [BINDIR [PIP-SPEC]]]
#   --editable   install the checkout in place (pip -e), for tests of this tree
#   --no-lab     do not install JupyterLab into PREFIX (an existing server imports it elsewhere)
#   BINDIR ""    link nothing
#   PIP-SPEC     what pip installs (default: this checkout)
# Undo: rm -rf PREFIX BINDIR/sandbox-kernel (images stay in /var/lib/sandbox-kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
editable=() lab=(jupyterlab)
while [ $# -gt 0 ]; do
  case "$1" in
    --editable) editable=(-e); shift ;;
    --no-lab) lab=(); shift ;;
    *) break ;;
  esac
done
PREFIX=${1:-/opt/sandbox-kernel}
BINDIR=${2-/usr/local/bin}
SPEC=${3:-$(pwd)}
if [ "$(id -u)" -ne 0 ]; then
  echo "install: run as root (it writes $PREFIX${BINDIR:+ and $BINDIR})" >&2
  exit 1
fi
case "$PREFIX" in
  /root/*|/home/*) echo "install: $PREFIX is under a private home; pick a world-readable prefix" >&2; exit 1 ;;
esac
umask 022
[ -x "$PREFIX/bin/python" ] || /usr/bin/python3 -m venv "$PREFIX"
"$PREFIX/bin/python" -m pip install -q --upgrade pip
"$PREFIX/bin/python" -m pip install -q "${editable[@]}" "$SPEC" "${lab[@]}"
"$PREFIX/bin/sandbox-kernel" kernelspec install --sys-prefix >/dev/null
chmod -R a+rX "$PREFIX"
if [ -n "$BINDIR" ]; then
  mkdir -p "$BINDIR"
  ln -sfn "$PREFIX/bin/sandbox-kernel" "$BINDIR/sandbox-kernel"
fi
echo "installed sandbox-kernel in $PREFIX${BINDIR:+ (sandbox-kernel linked in $BINDIR)}"
echo "  every user: $PREFIX/bin/jupyter lab   (kernels: Python 2.7 (sandbox), Python 3 (sandbox))"
echo "  images for everyone, as root: sandbox-kernel image build python3-plot; sandbox-kernel image build python2.7-plot"
echo "  each user of a rootless server, as root: sandbox-kernel delegate USER"
