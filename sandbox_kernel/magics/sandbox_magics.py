# -*- coding: utf-8 -*-
"""%sandbox magics, loaded in every sandbox kernel (Python 2.7 and Python 3).

This file runs INSIDE the kernel's container and must stay Python 2.7 compatible
(IPython 5, ipykernel 4.10): no f-strings, no annotations. It is injected read-only
by the host; images are not modified.

* ``%sandbox``: limits and live usage (HTML in notebooks, text in terminals). Usage
  is read from the kernel's own cgroup, visible read-only at /sys/fs/cgroup.
* ``%sandbox memory=2G cpus=2 pids=512``: ask the host to change the limits live (and
  ``bandwidth=8mbit`` for a kernel with network ``nat``).
* ``%%sandbox timeout=10s memory=500M``: run one cell under a wall-clock budget and/or
  a memory budget; past it the cell is interrupted and says which budget it exceeded.
* On the first execution after a kernel was stopped by a cap, say why; and say when the
  kernel cannot write its notebook folder (the host's ``notebook_folder_problem``).
"""

from __future__ import division, print_function

import json
import os
import signal
import socket
import sys
import threading
import time

try:
    from html import escape as _escape
except ImportError:  # Python 2
    from cgi import escape as _escape

try:
    import _thread as _threadmod
except ImportError:  # Python 2
    import thread as _threadmod

CGROUP = "/sys/fs/cgroup"
CONTROL_ENV = "SANDBOX_KERNEL_CONTROL"
UNLIMITED = 1 << 60


# ---------------------------------------------------------------- units
def fmt_rate(bits):
    """A rate in bits per second as tc writes it (16000000 -> '16mbit'; None ->
    'unlimited'), for the network rows and the limit-change reply."""
    if bits is None:
        return "unlimited"
    n = float(bits)
    for unit in ("bit", "kbit", "mbit", "gbit"):
        if abs(n) < 1000 or unit == "gbit":
            return ("%.3f" % n).rstrip("0").rstrip(".") + unit
        n /= 1000.0


def network_rows(network, ceilings):
    """The report's network rows from the host's ``network`` figures (``{"mode": "none"}``
    or a ``nat`` kernel's address, allow-list, bandwidth, bytes and refused connections)
    and the administrator's ``ceilings`` (``bandwidth``: its human form, or None)."""
    network = network or {}
    if network.get("mode") != "nat":
        return [("network", "none (loopback only)")]
    rows = [("network", "nat, address %s" % (network.get("address") or "?"))]
    allow = network.get("allow") or []
    rows.append(("network allow", ", ".join(str(a) for a in allow) or "nothing"))
    bandwidth = "%s each way" % fmt_rate(network.get("bandwidth"))
    if ceilings.get("bandwidth"):
        bandwidth += " (server allows up to %s)" % ceilings.get("bandwidth")
    rows.append(("bandwidth", bandwidth))
    if network.get("bytes_in") is not None:
        rows.append(
            (
                "network traffic",
                "%s in, %s out"
                % (fmt_size(network.get("bytes_in")), fmt_size(network.get("bytes_out"))),
            )
        )
    refused = network.get("refused")
    if refused is not None:
        rows.append(
            (
                "network refused",
                "%d connection%s refused by policy" % (refused, "" if refused == 1 else "s"),
            )
        )
    return rows


def fmt_size(n):
    """Human form with binary units (536870912 -> '512 MiB'; None -> 'unlimited'), for the
    report, the limit-change reply and the previous-exit notice."""
    if n is None:
        return "unlimited"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return "%d B" % n
            return ("%.1f" % n).rstrip("0").rstrip(".") + " " + unit
        n /= 1024.0


def parse_duration(text):
    """Seconds of a ``timeout=`` budget (``500ms``, ``10s``, ``2m``, ``1h`` or a number);
    ValueError otherwise. Called by ``sandbox`` for ``%%sandbox``."""
    text = str(text).strip().lower()
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def parse_size(text):
    """Bytes of a ``memory=`` budget (``500M``, ``1.5G``, ``1024``; binary units); ValueError
    otherwise. Called by ``sandbox`` for ``%%sandbox``."""
    text = str(text).strip().upper().replace("IB", "").rstrip("B")
    factors = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1] in factors:
        return int(float(text[:-1]) * factors[text[-1]])
    return int(float(text))


# ---------------------------------------------------------------- cgroup reading
def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except (IOError, OSError):
        return None


def _int(path):
    text = _read(path)
    if text is None or text == "max":
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None


def _keyed(path, key):
    text = _read(path) or ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    return 0


def _v1_dir(controller):
    for name in os.listdir(CGROUP) if os.path.isdir(CGROUP) else ():
        if controller in name.split(","):
            return os.path.join(CGROUP, name)
    return None


def read_usage():
    """Limits and usage of this kernel's own cgroup (v1 or v2)."""
    u = {}
    if os.path.exists(os.path.join(CGROUP, "cgroup.controllers")):  # v2
        j = lambda name: os.path.join(CGROUP, name)  # noqa: E731
        u["version"] = 2
        u["memory_current"] = _int(j("memory.current"))
        u["memory_peak"] = _int(j("memory.peak"))
        u["memory_limit"] = _int(j("memory.max"))
        u["cpu_usage_us"] = _keyed(j("cpu.stat"), "usage_usec")
        cpu_max = (_read(j("cpu.max")) or "max 100000").split()
        u["cpus"] = None if cpu_max[0] == "max" else int(cpu_max[0]) / int(cpu_max[1])
        u["pids_current"] = _int(j("pids.current"))
        u["pids_limit"] = _int(j("pids.max"))
        u["oom_kills"] = _keyed(j("memory.events"), "oom_kill")
        u["pids_limit_hits"] = _keyed(j("pids.events"), "max")
    else:  # v1
        mem, cpu, acct, pids = (_v1_dir(c) for c in ("memory", "cpu", "cpuacct", "pids"))
        u["version"] = 1
        if mem:
            u["memory_current"] = _int(os.path.join(mem, "memory.usage_in_bytes"))
            u["memory_peak"] = _int(os.path.join(mem, "memory.max_usage_in_bytes"))
            limit = _int(os.path.join(mem, "memory.limit_in_bytes"))
            u["memory_limit"] = None if limit is None or limit >= UNLIMITED else limit
            u["oom_kills"] = _keyed(os.path.join(mem, "memory.oom_control"), "oom_kill")
        if acct:
            ns = _int(os.path.join(acct, "cpuacct.usage"))
            u["cpu_usage_us"] = None if ns is None else ns // 1000
        if cpu:
            quota = _int(os.path.join(cpu, "cpu.cfs_quota_us"))
            period = _int(os.path.join(cpu, "cpu.cfs_period_us")) or 100000
            u["cpus"] = None if quota is None or quota < 0 else quota / period
        if pids:
            u["pids_current"] = _int(os.path.join(pids, "pids.current"))
            u["pids_limit"] = _int(os.path.join(pids, "pids.max"))
            u["pids_limit_hits"] = _keyed(os.path.join(pids, "pids.events"), "max")
    return u


def _uptime():
    try:
        with open("/proc/1/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            now = float(f.read().split()[0])
        return now - start_ticks / float(os.sysconf("SC_CLK_TCK"))
    except (IOError, OSError, ValueError, IndexError):
        return None


def _unescape_mount(text):
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def mount_at(path, mountinfo="/proc/self/mountinfo"):
    """The mount on top at ``path`` (what ``path`` really is), as a dict, or None.

    Several mounts can be stacked on one mount point (the sandbox's /tmp tmpfs, then the
    notebook directory when Jupyter runs in /tmp): the top one is the one that no other
    mount at the same point has as its parent.
    """
    entries = []
    for line in (_read(mountinfo) or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        if _unescape_mount(fields[4]) != path:
            continue
        entries.append(
            {
                "id": fields[0],
                "parent": fields[1],
                "root": _unescape_mount(fields[3]),
                "fstype": tail[0],
                "source": _unescape_mount(tail[1]),
            }
        )
    parents = set(e["parent"] for e in entries)
    tops = [e for e in entries if e["id"] not in parents]
    return tops[-1] if tops else (entries[-1] if entries else None)


def tmp_info(path="/tmp", mountinfo="/proc/self/mountinfo"):
    """What /tmp is in this kernel's view, in one line for the report.

    The sandbox gives every kernel a private, size-capped tmpfs at /tmp. A bind mount at
    /tmp (the notebook directory when Jupyter was started in /tmp, or an extra mount) hides
    it: statvfs then measures the host's disk, which is not the sandbox's /tmp at all.
    """
    try:
        st = os.statvfs(path)
    except OSError:
        return "unknown"
    size = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    top = mount_at(path, mountinfo)
    used = fmt_size(size - st.f_bfree * st.f_frsize)
    if top is None:  # no mount table to tell what it is
        return "%s (%s used)" % (fmt_size(size), used)
    if top["fstype"] == "tmpfs":
        return "%s (private tmpfs, %s used)" % (fmt_size(size), used)
    return (
        "not the sandbox's private tmpfs: the host directory %s (%s) is mounted over it "
        "(the notebook directory or an extra mount); %s free of %s"
        % (top["root"], top["fstype"], fmt_size(free), fmt_size(size))
    )


def quota_text(quota):
    """The notebook folder's disk quota (the host's answer), in one line for the report;
    None when the folder has none."""
    if not quota or not quota.get("bytes_limit"):
        return None
    text = "%s used of %s (disk quota of the folder)" % (
        fmt_size(quota.get("bytes_used")),
        fmt_size(quota.get("bytes_limit")),
    )
    if quota.get("files_limit"):
        text += ", %s of %s files" % (quota.get("files_used"), quota.get("files_limit"))
    return text


# ---------------------------------------------------------------- host channel
def ask_host(request, timeout=5.0):
    """One request to the host over this kernel's control socket."""
    path = os.environ.get(CONTROL_ENV)
    if not path:
        return {"ok": False, "error": "no control channel (is this a sandbox kernel?)"}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(json.dumps(request).encode("utf-8") + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return json.loads(data.decode("utf-8"))
    except (socket.error, OSError, ValueError) as exc:
        return {"ok": False, "error": "the host did not answer: %s" % exc}
    finally:
        sock.close()


# ---------------------------------------------------------------- report
class Report(object):
    """Rendered as an HTML table in notebooks and as text in terminals."""

    def __init__(self, rows, note=None):
        self.rows = rows
        self.note = note

    def __repr__(self):
        width = max(len(k) for k, _ in self.rows)
        lines = ["%s  %s" % (k.ljust(width), v) for k, v in self.rows]
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def _repr_html_(self):
        body = "".join(
            "<tr><th style='text-align:left'>%s</th><td style='text-align:left'>%s</td></tr>"
            % (_escape(k), _escape(v))
            for k, v in self.rows
        )
        note = "<p>%s</p>" % _escape(self.note) if self.note else ""
        return "<table>%s</table>%s" % (body, note)


def build_report(info, usage, cpu_percent, host_error=None):
    """The ``%sandbox`` report: the host's answer to ``get`` (limits, ceilings, image) and the
    cgroup usage read here, as a Report (HTML in notebooks, text elsewhere). Called by
    ``sandbox`` with no arguments."""
    limits = info.get("limits", {}) if info else {}
    ceilings = info.get("ceilings", {}) if info else {}
    image = info.get("image", "?") if info else "?"
    digest = (info.get("image_digest") or "")[:19] if info else ""

    def ceiling(key, text):
        c = ceilings.get(key)
        unit = " CPUs" if key == "cpus" else ""
        return "%s (server allows up to %s%s)" % (text, c, unit) if c else text

    cpus = usage.get("cpus")
    enforced = info.get("limits_enforced", True) if info else True
    if enforced:
        mem_limit = fmt_size(usage.get("memory_limit"))
        cpu_limit = "unlimited" if cpus is None else "%g CPUs" % cpus
        pids_limit = str(usage.get("pids_limit") or "unlimited")
    else:  # no cgroup: what was asked for, which nothing enforces
        mem_limit = "%s (not enforced)" % fmt_size(limits.get("memory"))
        cpu_limit = "%s (not enforced)" % (limits.get("cpus") or "unlimited")
        pids_limit = "%s (not enforced)" % (limits.get("pids") or "unlimited")
    rows = [
        ("image", "%s %s" % (image, digest)),
        ("memory limit", ceiling("memory", mem_limit)),
        ("cpu limit", ceiling("cpus", cpu_limit)),
        ("process limit", ceiling("pids", pids_limit)),
        ("/tmp size", tmp_info()),
    ]
    rows += network_rows(info.get("network") if info else None, ceilings)
    rows += [
        (
            "memory used",
            "%s (peak %s)"
            % (fmt_size(usage.get("memory_current")), fmt_size(usage.get("memory_peak"))),
        ),
        (
            "cpu time",
            "%.2f s (%.0f%% of a CPU recently)"
            % ((usage.get("cpu_usage_us") or 0) / 1e6, cpu_percent),
        ),
        ("processes", str(usage.get("pids_current"))),
        ("out-of-memory kills", str(usage.get("oom_kills", 0))),
        ("process-limit hits", str(usage.get("pids_limit_hits", 0))),
    ]
    folder = quota_text(info.get("notebook_quota") if info else None)
    if folder:
        rows.insert(5, ("notebook folder", folder))
    access = folder_access_text(info)
    if access:
        rows.insert(5, ("folder access", access))
    up = _uptime()
    if up is not None:
        rows.append(("uptime", "%d s" % up))
    note = None
    if ceilings:
        note = "Change limits with %sandbox memory=SIZE cpus=N pids=N"
        if (info.get("network") or {}).get("mode") == "nat":
            note += " bandwidth=RATE (e.g. 8mbit)"
        note += ", up to what the server allows"
    if host_error:
        note = "Figures from the kernel's cgroup only; the host said: %s" % host_error
    if not enforced:
        note = (
            "Limits not enforced: no cgroup is delegated to this server's user, and the "
            "administrator allowed kernels without caps (SandboxPolicy.allow_unenforced_limits)."
        )
    return Report(rows, note)


# ---------------------------------------------------------------- budgets
class BudgetExceeded(KeyboardInterrupt):
    """Raised in the cell's thread when it runs past a budget."""


class CellStopped(Exception):
    """Ends a budget-stopped cell with an error status, so "Run All" stops there as it does
    after an interrupt. IPython shows only the line below, not a traceback."""

    def _render_traceback_(self):
        return ["Execution stopped here by a %%sandbox budget (later cells were not run)."]


def _transform(shell, cell):
    transform = getattr(shell, "transform_cell", None)
    if transform is None:  # IPython 5
        transform = shell.input_transformer_manager.transform_cell
    return transform(cell)


def run_with_budget(shell, cell, timeout=None, memory=None, interval=0.02):
    """Run ``cell`` in the user namespace; interrupt it past ``timeout`` s or ``memory`` bytes.

    The time budget uses SIGALRM; the memory budget samples the kernel's cgroup usage every
    ``interval`` s from a thread. Both interrupt Python code between bytecodes (a long C
    call finishes first); the container's memory cap still holds in any case.
    """
    state = {"exceeded": None}
    done = threading.Event()

    def on_alarm(signum, frame):
        state["exceeded"] = "time budget of %g s" % timeout
        raise BudgetExceeded()

    def watch_memory():
        while not done.wait(interval):
            current = read_usage().get("memory_current")
            if current is not None and current > memory:
                state["exceeded"] = "memory budget of %s (used %s)" % (
                    fmt_size(memory),
                    fmt_size(current),
                )
                _threadmod.interrupt_main()
                return

    old = None
    if timeout:
        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    watcher = None
    if memory:
        watcher = threading.Thread(target=watch_memory)
        watcher.daemon = True
        watcher.start()
    code = compile(_transform(shell, cell), "<sandbox cell>", "exec")
    try:
        exec(code, shell.user_ns)
    except KeyboardInterrupt:
        if state["exceeded"] is None:
            raise
    finally:
        done.set()
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        if watcher is not None:
            watcher.join(1.0)
    if state["exceeded"]:
        sys.stderr.write(
            "Cell stopped: it exceeded its %s. The kernel is still running.\n" % state["exceeded"]
        )
        return False
    return True


# ---------------------------------------------------------------- the magic
def _parse_args(line):
    args = {}
    for token in line.split():
        if "=" not in token:
            raise ValueError("expected key=value, got %r (e.g. memory=2G cpus=2 pids=512)" % token)
        key, value = token.split("=", 1)
        args[key.strip().lower()] = value.strip()
    return args


def _cpu_percent(sample_s=0.1):
    a = read_usage().get("cpu_usage_us") or 0
    time.sleep(sample_s)
    b = read_usage().get("cpu_usage_us") or 0
    return (b - a) / (sample_s * 1e6) * 100.0


def sandbox(line, cell=None, shell=None):
    """The magic: no arguments, the report; ``key=value`` arguments, a live limit change
    asked of the host; as a cell magic, the cell under a timeout and/or memory budget.
    Called by the magic registered in ``load_ipython_extension``."""
    try:
        args = _parse_args(line)
    except ValueError as exc:
        sys.stderr.write("%%sandbox: %s\n" % exc)
        return None
    if cell is not None:
        unknown = set(args) - {"timeout", "memory"}
        if unknown:
            sys.stderr.write(
                "%%%%sandbox: unknown budget(s) %s; use timeout=10s and/or memory=500M\n"
                % ", ".join(sorted(unknown))
            )
            return None
        try:
            timeout = parse_duration(args["timeout"]) if "timeout" in args else None
            memory = parse_size(args["memory"]) if "memory" in args else None
        except ValueError:
            sys.stderr.write(
                "%%sandbox: budgets are timeout=10s (ms, s, m, h) and memory=500M (K, M, G)\n"
            )
            return None
        if not run_with_budget(shell, cell, timeout=timeout, memory=memory):
            raise CellStopped()
        return None
    if not args:
        info = ask_host({"op": "get"})
        return build_report(
            info.get("info") if info.get("ok") else None,
            read_usage(),
            _cpu_percent(),
            host_error=None if info.get("ok") else info.get("error", "no answer"),
        )
    request = {"op": "set"}
    request.update(args)
    reply = ask_host(request)
    if not reply.get("ok"):
        sys.stderr.write("%s\n" % reply.get("error", "refused"))
        return None
    for warning in reply.get("warnings", []):
        sys.stderr.write("warning: %s\n" % warning)
    lim = reply.get("limits", {})
    text = "Limits now: memory %s, cpus %s, pids %s" % (
        fmt_size(lim.get("memory")),
        lim.get("cpus") or "unlimited",
        lim.get("pids") or "unlimited",
    )
    if "bandwidth" in lim:
        text += ", bandwidth %s each way" % fmt_rate(lim.get("bandwidth"))
    print(text)
    return None


# ---------------------------------------------------------------- why the last kernel died
_first_execution = {"asked": False}  # the first execution asked the host (once per kernel)


def _size_arg(n):
    """``n`` bytes as a %sandbox memory= value that never rounds up (1400 MiB stays 1400M,
    not 1.4G, which would be more): whole GiB as G, else whole MiB."""
    if not n:
        return "more"
    if n % (1 << 30) == 0:
        return "%dG" % (n >> 30)
    return "%dM" % (n >> 20)


def explain_previous_exit(info):
    """One notice of why the previous kernel was stopped (OOM, pids cap), with what to ask
    for instead (or the limit it has now, when that was raised since), or None. Called at
    the first execution with the host's ``get`` answer of that moment."""
    prev = (info or {}).get("previous_exit")
    if not prev:
        return None
    reason = prev.get("reason") or "it stopped"
    text = "The previous kernel was stopped: %s." % reason
    ceilings = (info or {}).get("ceilings", {})
    tops = (info or {}).get("ceiling_values", {})
    now = (info or {}).get("limits", {})
    if prev.get("oom_killed"):
        limit = now.get("memory") or prev.get("memory_limit") or 0
        top = tops.get("memory")
        if limit and prev.get("memory_limit") and limit > prev["memory_limit"]:
            # raised since the death (the death dialog's "Restart with ..."): nothing to ask
            text += " The memory limit is now %s." % fmt_size(limit)
        elif top and limit and limit >= top:
            text += (
                " The memory limit is already the most this kernel may have (%s): "
                "use less memory, or ask your teacher or administrator for more." % fmt_size(top)
            )
        else:
            want = min(limit * 2, top) if (limit and top) else limit * 2
            text += " Raise it with %%sandbox memory=%s" % _size_arg(want)
            if ceilings.get("memory"):
                text += " (this server allows up to %s)" % ceilings.get("memory")
            text += " or use less memory."
    elif prev.get("pids_limit_hit"):
        limit = now.get("pids") or 0
        top = tops.get("pids")
        if limit and prev.get("pids_limit") and limit > prev["pids_limit"]:
            text += " The process limit is now %d." % limit
        elif top and limit and limit >= top:
            text += (
                " The process limit is already the most this kernel may have (%d): start "
                "fewer processes or threads." % top
            )
        else:
            text += " Raise the process limit with %sandbox pids=N"
            if ceilings.get("pids"):
                text += " (this server allows up to %s)" % ceilings.get("pids")
            text += " or start fewer processes or threads."
    return text


def folder_access_text(info):
    """The ``folder access`` row of the report: whether this kernel can write its notebook
    folder, with the host's fix when it cannot; None when the host did not say."""
    writable = (info or {}).get("notebook_folder_writable")
    if writable is None:
        return None
    if writable:
        return "read-write"
    problem = (info or {}).get("notebook_folder_problem")
    if problem:
        return "not writable by this kernel: %s" % problem
    return "read-only (mounted so: notebook_folder='ro')"


def explain_folder(info):
    """One notice that this kernel cannot write its notebook folder, with the fix, or None.
    Called at the first execution with the host's ``get`` answer."""
    problem = (info or {}).get("notebook_folder_problem")
    if not problem or (info or {}).get("notebook_folder_writable") is not False:
        return None
    return "This kernel cannot write its notebook folder: %s." % problem


def first_notice(info):
    """What the first execution says (why the previous kernel stopped, an unwritable
    notebook folder), or None. Called by ``_on_first_execution`` with the host's ``get``
    answer of that moment."""
    lines = [t for t in (explain_previous_exit(info), explain_folder(info)) if t]
    return "\n".join(lines) if lines else None


def _on_first_execution(*args):
    """IPython's ``pre_run_cell`` hook: at the first execution only, ask the host then (not
    at load: the limits may have changed since, as after the death dialog's "Restart with
    ...", and the kernel's start is not held up) and write the notice, if any, to stderr."""
    if _first_execution["asked"]:
        return
    _first_execution["asked"] = True
    info = ask_host({"op": "get"}, timeout=2.0)
    text = first_notice(info.get("info")) if info.get("ok") else None
    if text:
        sys.stderr.write(text + "\n")


def load_ipython_extension(ipython):
    """Register ``%sandbox``/``%%sandbox`` and the first-cell notice. Called by IPython when
    the kernel starts with ``--ext=sandbox_magics`` (the provisioner adds it)."""
    from IPython.core.magic import register_line_cell_magic

    def sandbox_magic(line, cell=None):
        return sandbox(line, cell, shell=ipython)

    sandbox_magic.__doc__ = __doc__
    register_line_cell_magic(sandbox_magic)
    # rename: register_line_cell_magic uses the function name
    magics = ipython.magics_manager.magics
    for kind in ("line", "cell"):
        magics[kind]["sandbox"] = magics[kind].pop("sandbox_magic")
    ipython.events.register("pre_run_cell", _on_first_execution)
