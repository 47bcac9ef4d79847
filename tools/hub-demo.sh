#!/usr/bin/env bash
# `make hub-demo`: a teaching hub on this machine, as the README's "Teaching host" section
# sets one up: JupyterHub on 127.0.0.1:8000 (configurable-http-proxy, LocalProcessSpawner,
# the product's hooks), two students and an instructor (unix accounts sk-demo-alice,
# sk-demo-bob, sk-demo-teacher in group sk-demo-instructors), each of whom can open Python
# 2.7 and Python 3 sandbox kernels under a demo policy file. Ctrl-C stops the hub (and the
# servers, whose kernels go with them); `make hub-demo-clean` removes the accounts, their
# delegations and the demo folder.
#
# As root. What it needs and lacks it makes once: the system-wide install with jupyterhub
# in it (PREFIX, default /opt/sandbox-kernel), configurable-http-proxy (npm, into
# PREFIX/proxy), the two images in the system store.
#
# Usage: tools/hub-demo.sh [--clean]      (PORT=8000 PREFIX=/opt/sandbox-kernel)
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/opt/sandbox-kernel}
PORT=${PORT:-8000}
DEMO=/var/lib/sandbox-kernel/hub-demo
STUDENTS=(sk-demo-alice sk-demo-bob)
TEACHER=sk-demo-teacher
GROUP=sk-demo-instructors
PASSWORD=sandbox-demo
if [ "$(id -u)" -ne 0 ]; then
  echo "hub-demo: run as root (it makes the demo accounts and runs the hub)" >&2
  exit 1
fi

if [ "${1:-}" = --clean ]; then
  for u in "${STUDENTS[@]}" "$TEACHER"; do
    if id "$u" >/dev/null 2>&1; then
      uid=$(id -u "$u")
      [ -x "$PREFIX/bin/sandbox-kernel" ] && "$PREFIX/bin/sandbox-kernel" delegate --remove "$u" >/dev/null || true
      pkill -KILL -u "$u" 2>/dev/null || true
      userdel -r "$u" >/dev/null 2>&1 || true
      sed -i "/^$u:/d" /etc/subuid /etc/subgid
      # what the account's servers left in the shared temp dirs (its run root /tmp/sk-UID)
      find /tmp /var/tmp /dev/shm -xdev -mindepth 1 -maxdepth 1 -uid "$uid" -exec rm -rf -- {} + 2>/dev/null || true
    fi
  done
  getent group "$GROUP" >/dev/null && groupdel "$GROUP"
  rm -rf "$DEMO"
  echo "hub-demo: removed the demo accounts, their delegations and $DEMO"
  exit 0
fi

bash tools/install-deps.sh uidmap
command -v npm >/dev/null || bash tools/install-deps.sh nodejs npm
if [ ! -x "$PREFIX/bin/jupyterhub-singleuser" ]; then
  bash tools/install-system.sh "$PREFIX"
  "$PREFIX/bin/python" -m pip install -q jupyterhub
  chmod -R a+rX "$PREFIX"
fi
if [ ! -x "$PREFIX/proxy/node_modules/.bin/configurable-http-proxy" ]; then
  npm install --no-audit --no-fund --loglevel=error --prefix "$PREFIX/proxy" configurable-http-proxy@4
  chmod -R a+rX "$PREFIX/proxy"
fi
for image in python3-plot python2.7-plot; do
  "$PREFIX/bin/sandbox-kernel" image inspect "$image" >/dev/null 2>&1 \
    || "$PREFIX/bin/sandbox-kernel" image build "$image"
done

getent group "$GROUP" >/dev/null || groupadd "$GROUP"
for u in "${STUDENTS[@]}" "$TEACHER"; do
  id "$u" >/dev/null 2>&1 || useradd -m -s /bin/sh "$u"
done
usermod -a -G "$GROUP" "$TEACHER"

umask 022
mkdir -p "$DEMO"
chmod 755 "$DEMO"
cat >"$DEMO/policy.toml" <<EOF
# the demo's policy (a real host keeps it at /etc/sandbox-kernel/policy.toml)
max_memory = "1G"
max_cpus = 1
max_pids = 256
max_kernels = 2
sandboxed_only = true
allowed_images = ["python3-plot", "python2.7-plot"]
user_memory = "1536M"
user_cpus = 1
user_pids = 600

[reserve]
memory = "2G"
cpus = 0.25

[groups.$GROUP]
max_kernels = 4
user_memory = "3G"
user_cpus = 1.5
sandboxed_only = false
EOF
cat >"$DEMO/jupyterhub_config.py" <<EOF
import sandbox_kernel.hub
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = $PORT
c.JupyterHub.hub_ip = "127.0.0.1"
c.ConfigurableHTTPProxy.command = ["$PREFIX/proxy/node_modules/.bin/configurable-http-proxy"]
c.JupyterHub.db_url = "sqlite:///$DEMO/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "$DEMO/cookie_secret"
c.JupyterHub.pid_file = "$DEMO/jupyterhub.pid"
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = "$PASSWORD"
c.Authenticator.allowed_users = {"${STUDENTS[0]}", "${STUDENTS[1]}", "$TEACHER"}
c.Authenticator.admin_users = {"$TEACHER"}
c.Spawner.cmd = ["$PREFIX/bin/jupyterhub-singleuser"]
c.Spawner.default_url = "/lab"
c.Spawner.pre_spawn_hook = sandbox_kernel.hub.pre_spawn_hook
c.Spawner.post_stop_hook = sandbox_kernel.hub.post_stop_hook
EOF
"$PREFIX/bin/sandbox-kernel" policy "${STUDENTS[0]}" | sed 's/^/  /'
cat <<EOF
hub-demo: JupyterHub on http://127.0.0.1:$PORT/ (Ctrl-C stops it; make hub-demo-clean removes the accounts)
  students:   ${STUDENTS[*]}   instructor: $TEACHER   password: $PASSWORD
  each opens "Python 3 (sandbox)" or "Python 2.7 (sandbox)" in JupyterLab's launcher
EOF
cd "$DEMO"
exec env SANDBOX_KERNEL_POLICY="$DEMO/policy.toml" PATH="$PREFIX/bin:/usr/bin:/bin" \
  "$PREFIX/bin/jupyterhub" -f "$DEMO/jupyterhub_config.py"
