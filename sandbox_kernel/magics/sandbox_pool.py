# -*- coding: utf-8 -*-
"""The kernel of a warm pool member: started and initialised before anyone asks for it.

This file runs INSIDE the kernel's container and must stay Python 2.7 compatible
(IPython 5, ipykernel 4.10): no f-strings, no annotations. It is injected read-only by the
host with the magics; images are not modified. The host's side is
``sandbox_kernel/jupyter/pool.py``.

The pool starts the container with ``PYTHON /opt/sandbox-kernel/magics/sandbox_pool.py
-f FILE ARGS...`` in place of ``PYTHON -m ipykernel_launcher -f FILE ARGS...``, and with
the container's standard input a unix socket whose other end only the pool holds. FILE, the
connection file the plan wrote, has the kernel's socket paths and a placeholder key that
nobody is ever given. This program:

1. initialises the kernel (``IPKernelApp.initialize``: the imports, the sockets, the
   shell, the extensions) as ``ipykernel_launcher`` would, and says ``ready`` on the socket;
2. waits there for the claim, one JSON line: the connection file of the session (the same
   transport, paths and ports; the session's key);
3. takes the session's key (nothing reached the kernel before, as its sockets are in its
   own folder which only the host can reach, and the host connects only after this), writes
   the connection file anew, answers ``ok`` and points standard input at /dev/null, so that
   nothing the kernel runs later can read or write that socket.

The kernel runs its event loop (``IPKernelApp.start``) from step 1 on; a claim is applied
on a thread of this program. End of input without a claim (the pool let the member go)
ends the process.
"""

from __future__ import print_function

import json
import os
import sys
import threading

#: The claim's size bound (a connection file is a few hundred bytes).
MAX_CLAIM = 64 * 1024
#: Text as json.loads gives it (unicode on Python 2, str on 3).
TEXT = type(b"".decode("ascii"))
#: What must be the same in the claimed connection file as in the one the kernel listens on.
FIXED = ("transport", "ip", "shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


def read_line(sock, limit=MAX_CLAIM):
    """One line from ``sock`` (without its newline), or None at end of input; at most
    ``limit`` bytes (ValueError beyond)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
        if len(data) > limit:
            raise ValueError("claim larger than %d bytes" % limit)
    return data[:-1].decode("utf-8")


def check_claim(current, claim):
    """The problem with ``claim`` (the session's connection info) for a kernel listening as
    ``current`` says, or None: the key must be given and the sockets the same."""
    key = claim.get("key")
    if not isinstance(key, TEXT) or not key:
        return "no key"
    for name in FIXED:
        if claim.get(name) != current.get(name):
            return "%s differs" % name
    return None


def write_connection(path, info):
    """Write ``info`` as the connection file ``path`` (readable by the kernel's user only;
    replaced in one step, so that ``%connect_info`` never reads half a file)."""
    tmp = path + ".claim"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.rename(tmp, path)


def serve_claim(app, sock, path):
    """Thread: say ``ready``, wait for the claim, apply it (the key, the connection file),
    answer, and let go of the socket. End of input: end the process."""
    import socket

    try:
        sock.sendall(b"ready\n")
        line = read_line(sock)
        if line is None:
            os._exit(0)
        claim = json.loads(line)
        with open(path) as f:
            current = json.load(f)
        problem = check_claim(current, claim) if isinstance(claim, dict) else "not an object"
        if problem:
            sock.sendall(("refused: %s\n" % problem).encode("utf-8"))
            os._exit(3)
        app.session.key = claim["key"].encode("ascii")
        write_connection(path, claim)
        sock.sendall(b"ok\n")
    except (socket.error, EnvironmentError, ValueError) as exc:  # IOError on Python 2
        sys.__stderr__.write("sandbox pool member: the claim failed: %s\n" % exc)
        os._exit(3)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    sock.close()


def as_launcher_path():
    """``sys.path`` and ``sys.argv[0]`` as ``python -m ipykernel_launcher`` has them while
    ipykernel loads: not this file's folder first (Python ran a script), but the working
    directory on Python 3.7 and later; nothing on older ones, where ``-m`` puts "" there
    and ipykernel_launcher deletes it (IPython adds "" later, as for a cold kernel). An
    interpreter that put no script folder there (safe-path) keeps its path."""
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and sys.path[0] == here:
        if sys.version_info >= (3, 7):
            sys.path[0] = os.getcwd()
        else:
            del sys.path[0]
    try:
        import ipykernel_launcher

        path = ipykernel_launcher.__file__
        sys.argv[0] = path[:-1] if path.endswith(".pyc") else path
    except ImportError:
        pass


def main(argv):
    """``sandbox_pool.py -f FILE ARGS...``: the kernel with ipykernel_launcher's arguments."""
    import socket

    if len(argv) < 2 or argv[0] != "-f":
        sys.stderr.write("usage: sandbox_pool.py -f CONNECTION_FILE [KERNEL ARGS...]\n")
        return 2
    path = argv[1]
    # standard input is the pool's socket: take it off fd 0 before anything reads it
    fd = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sock = socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)
    os.close(fd)
    as_launcher_path()
    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance()
    app.initialize(list(argv))
    thread = threading.Thread(target=serve_claim, args=(app, sock, path), name="pool-claim")
    thread.daemon = True
    thread.start()
    app.start()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
