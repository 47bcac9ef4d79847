"""The traits: per-kernel sandbox settings and the administrator's policy.

Layer: Jupyter (traitlets). Two configurables:

* ``SandboxProvisioner`` (provisioner.py) carries the per-kernel settings declared here in
  ``SandboxSettings``. They come, lowest priority first, from the trait defaults, from the
  Jupyter config files (``c.SandboxProvisioner.memory = "2G"``), and from the kernelspec's
  ``metadata.kernel_provisioner.config`` (the provisioner factory passes them as keyword
  arguments).
* ``SandboxPolicy`` holds the administrator's ceilings, set only in the server's config
  (``c.SandboxPolicy.max_memory = "4G"`` in ``jupyter_server_config.py``). No kernelspec can
  go above them: a value above a ceiling fails the kernel start with a message naming the
  kernelspec, the field, the value and the ceiling. The host's policy file
  (``sandbox_kernel.policy``, root's, per user and group) adds to them: the tighter wins.
  Without any ceiling a live change can never go above the kernelspec's value.

``resolve.resolve_settings`` validates the values at once and returns a ``KernelSettings``
(plain data); ``docs`` generates docs/configuration.md from the traits' help.
"""

from __future__ import annotations

import os
import stat

from traitlets import Bool, Dict, Float, Int, List, Unicode, Union
from traitlets.config import Config, Configurable, LoggingConfigurable

from ..limits import PIDS_FORMS
from ..network import DEFAULT_SUBNET
from ..network.config import ALLOW_FORMS, SUBNET_FORMS
from ..runtime.spec import BYTES_PER_INODE, VOLUME_FORMS
from ..units import CPUS_FORMS, RATE_FORMS, SIZE_FORMS

USER_FORMS = (
    "'auto' (the owner of the notebook's directory), a uid, 'uid:gid' or a user name, "
    "e.g. 1000 or '1000:100'"
)
#: The accepted values of ``notebook_folder``, and how a message names them.
NOTEBOOK_FOLDER_MODES = ("rw", "ro")
NOTEBOOK_FOLDER_FORMS = "'rw' (read-write) or 'ro' (read-only)"
IMAGE_FORMS = "an image name of the store (see: sandbox-kernel image ls), e.g. 'python3'"
#: The accepted values of ``network``, and how a message names them.
NETWORK_FORMS = "'none' (loopback only) or 'nat' (what network_allow lists, through the host)"
DNS_FORMS = (
    "a list of IPv4 addresses of resolvers, e.g. ['198.18.0.53'], [] for none, or null "
    "(the host's own non-loopback resolvers)"
)


class SandboxSettings(LoggingConfigurable):
    """Per-kernel sandbox settings (config=True traits shared by the provisioner).

    ``SandboxProvisioner`` inherits them; its ``resolve`` reads them at each kernel start and
    ``resolve.resolve_settings`` validates them.
    """

    image = Unicode(
        "",
        config=True,
        help="""Image the kernel runs in: a name of the image store, optionally with a tag
        ('python3', 'python2.7:latest'). List them with `sandbox-kernel image ls`.
        Default: '' (the kernelspec must name one).""",
    )
    memory = Union(
        [Unicode(), Int()],
        default_value="1G",
        config=True,
        help="""Memory cap of the whole sandbox (kernel and its children), swap off.
        Unit: bytes, or a number with K, M, G or T (binary units), e.g. 512M, 1.5G.
        Default: 1G. The kernel is killed by the OOM killer above it.""",
    )
    cpus = Union(
        [Float(), Int(), Unicode()],
        default_value=1.0,
        config=True,
        help="""CPU cap, in CPUs (fractions allowed: 0.5 = half a CPU over each 100 ms).
        Applied once the kernel answered its first kernel_info (start is not slowed down).
        Default: 1.""",
    )
    pids = Union(
        [Int(), Unicode()],
        default_value=256,
        config=True,
        help="""Maximum number of processes and threads in the sandbox (a fork beyond it
        fails with EAGAIN; the kernel stays usable). Unit: tasks. Default: 256.""",
    )
    tmp_size = Union(
        [Unicode(), Int()],
        default_value="256M",
        config=True,
        help="""Size of the sandbox's /tmp and of its home directory (tmpfs, counted in the
        memory cap). Unit: bytes or K/M/G/T. Default: 256M.""",
    )
    writable_size = Union(
        [Unicode(), Int()],
        default_value="256M",
        config=True,
        help="""Size of the writable layer on top of the image (pip install --user, files
        written outside /tmp and the notebook folder; tmpfs, counted in the memory cap).
        Unit: bytes or K/M/G/T. Default: 256M.""",
    )
    notebook_folder = Unicode(
        "rw",
        config=True,
        help="""How the kernel sees its notebook's folder (mounted at the same path, the
        working directory). 'rw': read-write, files the kernel writes stay there. 'ro':
        read-only, the kernel writes only to /tmp and its home (both emptied when it ends):
        for autograding (sandbox_kernel.grading sets it), where whatever a submission wrote
        in the folder, links included, must not reach the grader. Default: 'rw'.""",
    )
    extra_mounts = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""Host paths made visible in the sandbox besides the notebook's directory,
        each 'SRC:DST[:ro|rw]' (absolute paths; read-only unless ':rw'). Every SRC must be
        under one of SandboxPolicy.allowed_mount_sources. Default: [] (none).""",
    )
    env = Dict(
        value_trait=Unicode(),
        default_value={},
        config=True,
        help="""Extra environment variables of the kernel ({"NAME": "value"}), on top of the
        image's and the kernelspec's env. The server's own environment never enters the
        sandbox. Default: {}.""",
    )
    network = Unicode(
        "none",
        config=True,
        help="""Network of the sandbox. 'none': a private network namespace with only
        loopback (Jupyter talks to the kernel over unix sockets). 'nat': also a link out
        through the host (masqueraded) to what network_allow lists, everything else
        refused and counted, capped at bandwidth; only where the administrator allows it
        (SandboxPolicy.allowed_networks) and for a root server. Default: 'none'.""",
    )
    network_allow = List(
        Unicode(),
        default_value=[],
        config=True,
        help=f"""With network 'nat': what the kernel may connect to, each {ALLOW_FORMS}
        (a name is resolved when the kernel starts). Each entry must lie inside one of the
        administrator's (SandboxPolicy.network_allow: a network inside a network, the same
        port or a narrower one; a host name only where the administrator lists that name).
        The host itself and other kernels are never reachable. Default: [] (the
        administrator's whole SandboxPolicy.network_allow).""",
    )
    bandwidth = Unicode(
        "",
        config=True,
        help=f"""With network 'nat': the kernel's bandwidth cap in each direction. Unit:
        {RATE_FORMS}. Changeable live with `%sandbox bandwidth=8mbit`, up to
        SandboxPolicy.max_bandwidth. Default: '' (SandboxPolicy.max_bandwidth, or no cap
        when it has none).""",
    )
    network_subnet = Unicode(
        DEFAULT_SUBNET,
        config=True,
        help=f"""With network 'nat': the network kernel addresses come from, {SUBNET_FORMS}
        (its first address is the host's side of every kernel's link). It must lie inside
        one of SandboxPolicy.allowed_subnets. Default: {DEFAULT_SUBNET!r}.""",
    )
    network_dns = List(
        Unicode(),
        default_value=None,
        allow_none=True,
        config=True,
        help=f"""With network 'nat': the resolvers written into the kernel's
        /etc/resolv.conf and reachable on port 53, {DNS_FORMS}. A resolver given here
        must be allowed on port 53 by SandboxPolicy.network_allow. Default: null (the
        host's non-loopback resolvers that SandboxPolicy.network_allow allows on port 53;
        none when it allows none).""",
    )
    user = Union(
        [Unicode(), Int()],
        default_value="auto",
        config=True,
        help="""Who the kernel runs as. 'auto': when the server runs as root, the owner of
        the notebook's directory (65534 'nobody' if that owner is root, unless
        SandboxPolicy.allow_root); otherwise the server's own uid. Or a uid, 'uid:gid' or a
        user name of the host. Never root unless SandboxPolicy.allow_root. A kernel whose
        user cannot write the notebook's directory is told so at start (the server log, the
        first execution, %sandbox). Default: 'auto'.""",
    )
    magics = Bool(
        True,
        config=True,
        help="""Load the %sandbox magics into ipykernel-based kernels (limits and usage,
        live limit changes within SandboxPolicy, why the previous kernel died). The
        extension is mounted read-only; images are not modified. Default: True.""",
    )
    ipykernel_layer = Unicode(
        "",
        config=True,
        help="""The product's ipykernel layer for an image whose Python has no ipykernel
        (an image of the store named 'sandbox-kernel-ipykernel:TAG', written here by
        `sandbox-kernel kernelspec add --image`): put read-only on top of the image's
        layers, its packages on PYTHONPATH; the image is not modified. Default: '' (the
        image's own ipykernel).""",
    )
    cpu_defer_timeout = Float(
        60.0,
        config=True,
        help="""Seconds to wait for the kernel's first kernel_info reply before the CPU cap
        is applied anyway. Unit: seconds. Default: 60.""",
    )
    max_message_size = Union(
        [Unicode(), Int()],
        default_value="16M",
        config=True,
        help="""Largest message the kernel may send to Jupyter (output, replies). A larger one
        is dropped and the notebook shows "output dropped: ... exceeds the 16 MiB limit" in
        the cell. Enforced by the server's relay between the kernel's sockets and Jupyter's,
        outside the sandbox. Unit: bytes or K/M/G/T, at least 64K. Default: 16M.""",
    )
    iopub_msg_rate_limit = Float(
        1000.0,
        config=True,
        help="""Most messages per second the kernel may send to Jupyter, averaged over
        rate_limit_window (output and protocol messages are counted apart, so that a flood
        of output never drops the status that ends a cell). Beyond it messages are dropped
        and the cell shows "output throttled", then "output resumed" with what was dropped.
        Unit: messages per second; 0 turns it off. Default: 1000.""",
    )
    iopub_data_rate_limit = Union(
        [Unicode(), Int()],
        default_value="8M",
        config=True,
        help="""Most bytes per second the kernel may send to Jupyter, averaged over
        rate_limit_window (see iopub_msg_rate_limit): with max_message_size, what bounds
        the memory an unread client holds for one kernel. Unit: bytes (per second) or
        K/M/G/T; 0 turns it off. Default: 8M.""",
    )
    rate_limit_window = Float(
        3.0,
        config=True,
        help="""Seconds the rate limits are averaged over (a burst of that many seconds of
        output passes at once). Unit: seconds. Default: 3.""",
    )
    pool_size = Int(
        0,
        config=True,
        help="""Sandboxes of this kernelspec kept started and idle, their kernel initialised,
        for the next kernels to claim within milliseconds (the warm pool, see
        docs/pool.md). Members are made for each notebook folder a kernel of this
        kernelspec started in, one at a time in the background; they count against the
        user's caps and kernel count. Set it per kernelspec (metadata.kernel_provisioner
        .config) or for all of them (c.SandboxProvisioner.pool_size). Unit: sandboxes,
        0..SandboxPolicy.max_pool_size. Default: 0 (no pool).""",
    )
    bytes_per_inode = Int(
        BYTES_PER_INODE,
        config=True,
        help="""Inode cap of every tmpfs of the sandbox (writable layer, /tmp, home,
        /dev/shm): one file per this many bytes of its size, at least 1024 files (256M of
        /tmp: 16384 files). A flood of tiny files then fails with "No space left on device"
        instead of filling the memory cap with inodes. Unit: bytes, 1024..1073741824.
        Default: 16384.""",
    )


#: The settings a kernelspec may set in metadata.kernel_provisioner.config.
SETTING_NAMES: tuple[str, ...] = (
    "image",
    "memory",
    "cpus",
    "pids",
    "tmp_size",
    "writable_size",
    "notebook_folder",
    "extra_mounts",
    "env",
    "network",
    "network_allow",
    "bandwidth",
    "network_subnet",
    "network_dns",
    "user",
    "magics",
    "ipykernel_layer",
    "cpu_defer_timeout",
    "max_message_size",
    "iopub_msg_rate_limit",
    "iopub_data_rate_limit",
    "rate_limit_window",
    "bytes_per_inode",
    "pool_size",
)


class SandboxPolicy(Configurable):
    """Administrator's ceilings for every sandbox kernel of this server.

    Set in jupyter_server_config.py, e.g. ``c.SandboxPolicy.max_memory = "4G"``.
    A kernelspec (or the provisioner's config) asking for more fails to start, naming the
    kernelspec, the field, the value and the ceiling. The provisioner makes one (with itself
    as parent, so the server's config applies) and parses it with ``resolve.read_policy`` at
    each start and each live ``%sandbox`` request.
    """

    max_memory = Unicode(
        "",
        config=True,
        help="""Largest memory cap a kernel may ask for. Unit: bytes or K/M/G/T, e.g. 4G.
        Default: '' (no ceiling).""",
    )
    max_cpus = Float(
        0.0,
        config=True,
        help="""Largest CPU cap a kernel may ask for, in CPUs. Default: 0 (no ceiling).""",
    )
    max_pids = Int(
        0,
        config=True,
        help="""Largest process cap a kernel may ask for. Default: 0 (no ceiling).""",
    )
    max_tmp_size = Unicode(
        "",
        config=True,
        help="""Largest /tmp (and home) size. Unit: bytes or K/M/G/T. Default: '' (no ceiling).""",
    )
    max_writable_size = Unicode(
        "",
        config=True,
        help="""Largest writable layer. Unit: bytes or K/M/G/T. Default: '' (no ceiling).""",
    )
    allowed_images = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""Image names kernels may use (without tag: 'python3' allows every tag of it).
        Default: [] (every image of the store).""",
    )
    allowed_mount_sources = List(
        Unicode(),
        default_value=[],
        config=True,
        help="""Host directories under which a kernelspec's extra_mounts may take their
        source, e.g. ['/srv/datasets']. Default: [] (no extra mounts; the notebook's
        directory is always mounted).""",
    )
    max_kernels = Int(
        0,
        config=True,
        help="""Most kernels one user may run at once on this host (all of the user's
        servers that share a run directory, the default; as root, the kernels running as
        that user). One more is refused,
        naming the limit and the running kernels. The policy file's max_kernels, when lower,
        wins. Default: 0 (no limit).""",
    )
    allow_unenforced_limits = Bool(
        False,
        config=True,
        help="""Let a rootless server (Jupyter running as an ordinary user) start kernels
        when no cgroup is delegated to its user, so that their memory, CPU and process caps
        cannot be enforced. `%sandbox` and `sandbox-kernel ps` then say "limits not
        enforced". Default: False (such a kernel does not start; the error names the fix:
        `sandbox-kernel delegate USER` as root, or systemd's Delegate=yes).""",
    )
    user_memory = Unicode(
        "",
        config=True,
        help="""Aggregate memory cap of all the kernels of one user of a rootless server,
        written by `sandbox-kernel delegate USER` (as root) when it is given no --memory,
        --cpus or --pids. Unit: bytes or K/M/G/T, e.g. 8G. Default: '' (no aggregate cap).""",
    )
    user_cpus = Float(
        0.0,
        config=True,
        help="""Aggregate CPU cap of one user's kernels, in CPUs (see user_memory).
        Default: 0 (no aggregate cap).""",
    )
    user_pids = Int(
        0,
        config=True,
        help="""Aggregate process cap of one user's kernels (see user_memory).
        Default: 0 (no aggregate cap).""",
    )
    notebook_quota = Unicode(
        "",
        config=True,
        help="""Disk quota of each kernel's notebook folder and everything below it: a
        project quota of the host's filesystem (XFS mounted with prjquota, or ext4 with the
        project and quota features), which the kernel cannot lift; a write beyond it fails
        with "Disk quota exceeded" and %sandbox shows the use. A root server sets it at each
        kernel start (a folder keeps its project id once it has one, so its kernels share
        it). A rootless server cannot: root sets it with `sandbox-kernel quota set FOLDER
        SIZE` (for instance in the hub's spawn hook), and a kernel whose folder has no quota
        of at most this size does not start. A filesystem without project quotas: the
        kernel does not start, the error says how to enable them. Unit: bytes or K/M/G/T,
        e.g. 2G. Default: '' (no quota).""",
    )
    notebook_quota_files = Int(
        0,
        config=True,
        help="""Most files and folders in the notebook folder's quota (with notebook_quota;
        set by a root server). Unit: files. Default: 0 (no file limit).""",
    )
    max_pool_size = Int(
        4,
        config=True,
        help="""Most idle sandboxes a kernelspec's warm pool may keep (pool_size above it
        fails the kernel start, naming both). Unit: sandboxes, 0..64. Default: 4; 0
        turns pools off.""",
    )
    allowed_networks = List(
        Unicode(),
        default_value=["none"],
        config=True,
        help="""Network modes kernels may use ('none', 'nat'; see the kernel setting
        network). A kernelspec asking for another fails to start, naming this setting.
        Default: ['none'] (no kernel reaches any network; add 'nat' to allow it, with
        network_allow saying what may be reached).""",
    )
    network_allow = List(
        Unicode(),
        default_value=[],
        config=True,
        help=f"""The most a kernel with network 'nat' may reach: each entry {ALLOW_FORMS}.
        A kernelspec's network_allow must lie inside it (a network inside one of these
        networks, with the same port or any when the entry has none; a host name only if
        listed here as that name) and is this whole list when it sets none. '0.0.0.0/0'
        allows every IPv4 address. Default: [] (nothing: a 'nat' kernel does not start).""",
    )
    max_bandwidth = Unicode(
        "",
        config=True,
        help=f"""Largest bandwidth cap a 'nat' kernel may have, in each direction, and the
        cap of one whose kernelspec sets none. Unit: {RATE_FORMS}. Default: '' (no
        ceiling: a kernelspec without bandwidth is not capped).""",
    )
    allowed_subnets = List(
        Unicode(),
        default_value=[DEFAULT_SUBNET],
        config=True,
        help=f"""Networks a kernelspec's network_subnet must lie inside (the host routes
        kernel addresses of it to the kernels' links: keep it clear of the host's own
        networks), each {SUBNET_FORMS}. Default: [{DEFAULT_SUBNET!r}].""",
    )
    allow_root = Bool(
        False,
        config=True,
        help="""Allow kernels to run as root (uid 0) inside the sandbox, when asked with
        user=0 or when 'auto' finds a root-owned notebook directory. Default: False
        (such kernels run as 65534).""",
    )


def setting_forms(name: str) -> str:
    """The accepted forms of setting ``name``, for a message about a value of the wrong type
    (the provisioner calls it when traitlets refuses a kernelspec value)."""
    return {
        "image": f"use {IMAGE_FORMS}",
        "memory": f"use {SIZE_FORMS}",
        "tmp_size": f"use {SIZE_FORMS}",
        "writable_size": f"use {SIZE_FORMS}",
        "cpus": f"use {CPUS_FORMS}",
        "pids": f"use {PIDS_FORMS}",
        "notebook_folder": f"use {NOTEBOOK_FOLDER_FORMS}",
        "extra_mounts": f"use a list of {VOLUME_FORMS}",
        "env": 'use {"NAME": "value"} with string values',
        "network": f"use {NETWORK_FORMS}",
        "network_allow": f"use a list of entries, each {ALLOW_FORMS}",
        "bandwidth": f"use {RATE_FORMS}, or '' (no cap of the kernelspec's)",
        "network_subnet": f"use {SUBNET_FORMS}",
        "network_dns": f"use {DNS_FORMS}",
        "user": f"use {USER_FORMS}",
        "cpu_defer_timeout": "use a number of seconds, e.g. 60",
        "bytes_per_inode": "use a number of bytes in 1024..1073741824, e.g. 16384",
        "magics": "use true or false",
        "max_message_size": f"use {SIZE_FORMS}",
        "iopub_data_rate_limit": f"use {SIZE_FORMS} (per second), or 0 (off)",
        "iopub_msg_rate_limit": "use a number of messages per second, or 0 (off)",
        "rate_limit_window": "use a number of seconds, e.g. 3",
        "pool_size": "use a whole number of sandboxes, e.g. 2, or 0 (no pool)",
    }.get(name, "see docs/configuration.md")


def server_config() -> Config:
    """The Jupyter server's configuration as the server would read it: every
    ``jupyter_server_config.json`` and ``.py`` of the Jupyter config path, the highest
    priority merged last. Called by ``sandbox-kernel delegate`` for the per-user caps of
    ``SandboxPolicy`` (``SandboxPolicy(config=server_config())``)."""
    from jupyter_core.paths import jupyter_config_path
    from traitlets.config.loader import JSONFileConfigLoader, PyFileConfigLoader

    config = Config()
    for directory in reversed(jupyter_config_path()):
        for loader in (JSONFileConfigLoader, PyFileConfigLoader):
            name = "jupyter_server_config" + (".json" if loader is JSONFileConfigLoader else ".py")
            if _trusted(os.path.join(directory, name)):
                config.merge(loader(name, path=directory).load_config())
    return config


def _trusted(path: str) -> bool:
    """Is ``path`` a config file this process may load? A regular file; as root, also
    root's own and writable by nobody else (root runs Python config files: under ``sudo -E``
    the config path may name the invoking user's)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    return os.geteuid() != 0 or (st.st_uid == 0 and not st.st_mode & 0o022)
