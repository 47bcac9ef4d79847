"""Notebook-folder quotas for real.

On ext4 with project quotas (a loop file the test makes; the tests marked ``vmkernel`` need
a kernel with quota formats, Debian's stock kernel in the QEMU guest, ``make
test-cgroup-v2``): the tagging of existing files, a container writing past the quota (EDQUOT,
the limit as the folder's size, no way out of the project), the unprivileged check and the
``quota`` CLI. Everywhere: a kernel whose folder cannot get the quota the policy asks for
does not start, and says why.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

from sandbox_kernel import quota
from sandbox_kernel.errors import QuotaError
from sandbox_kernel.paths import new_container_id
from sandbox_kernel.runtime import hostimage, userns
from sandbox_kernel.runtime.container import Container
from sandbox_kernel.runtime.spec import Bind, ContainerSpec

pytestmark = [pytest.mark.privileged]

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
IN_VM = os.environ.get("SANDBOX_KERNEL_IN_VM") == "1"
OTHER_UID = 1000


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@contextlib.contextmanager
def _ext4(tmp_path: Path, options: str) -> Iterator[Path]:
    """A 96 MiB ext4 with the project and quota features, loop-mounted with ``options`` at
    a fresh folder of /tmp (which other users can reach, unlike tmp_path); unmounted after.
    Skipped on a kernel without quota formats (the CI host's), never in the guest."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    img = tmp_path / "prj.img"
    with open(img, "wb") as f:
        f.truncate(96 * MiB)
    made = _run("mkfs.ext4", "-q", "-F", "-O", "quota,project", "-E", "quotatype=prjquota",
                str(img))  # fmt: skip
    assert made.returncode == 0, made.stderr
    top = Path(tempfile.mkdtemp(prefix="skt-quota-", dir="/tmp"))
    top.chmod(0o755)
    mnt = top / "fs"
    mnt.mkdir()
    try:
        mounted = _run("mount", "-o", options, str(img), str(mnt))
        if mounted.returncode != 0:
            why = f"this kernel cannot mount ext4 with project quotas: {mounted.stderr.strip()}"
            if IN_VM:
                pytest.fail(why)
            pytest.skip(why + "; the test runs in the QEMU guest (make test-cgroup-v2)")
        try:
            yield mnt
        finally:
            _run("umount", str(mnt))
            assert not _mounted(mnt)
    finally:
        shutil.rmtree(top)
        img.unlink()


@pytest.fixture
def quota_fs(tmp_path: Path) -> Iterator[Path]:
    """ext4 with project quotas, enforced (prjquota: the feature counts use, the mount
    option enforces the limits)."""
    with _ext4(tmp_path, "loop,prjquota") as mnt:
        yield mnt


@pytest.fixture
def unenforced_fs(tmp_path: Path) -> Iterator[Path]:
    """ext4 with the quota features but mounted without prjquota: use is counted, limits
    are not enforced."""
    with _ext4(tmp_path, "loop") as mnt:
        yield mnt


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _projid(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return quota.get_project(fd)[0]
    finally:
        os.close(fd)


def _as_other(code: str, where: Path) -> subprocess.CompletedProcess[str]:
    """Python code run as an ordinary user (a rootless server's view of the quota), with a
    copy of the few modules it needs in ``where`` (the checkout may not be readable)."""
    pkg = where / "pkg" / "sandbox_kernel"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", "beneath.py", "errors.py", "paths.py", "units.py", "quota.py"):
        shutil.copy(ROOT / "sandbox_kernel" / name, pkg / name)
    for d in (where / "pkg", pkg):
        d.chmod(0o755)
    return subprocess.run(
        ["/usr/bin/python3", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        user=OTHER_UID,
        group=OTHER_UID,
        extra_groups=[],
        env={"PYTHONPATH": str(where / "pkg"), "PATH": "/usr/bin:/bin"},
        cwd="/",
    )


@pytest.mark.vmkernel
def test_apply_tags_what_is_there_and_never_follows(quota_fs: Path) -> None:
    nb = quota_fs / "nb"
    (nb / "sub").mkdir(parents=True)
    (nb / "sub" / "old.bin").write_bytes(b"x" * (2 * MiB))
    outside = quota_fs / "outside.txt"
    outside.write_text("not the folder's")
    (nb / "link").symlink_to(outside)
    usage = quota.apply(str(nb), 8 * MiB)
    assert quota.is_ours(usage.project) and usage.bytes_limit == 8 * MiB
    assert usage.bytes_used is not None and usage.bytes_used >= 2 * MiB
    assert _projid(nb / "sub") == _projid(nb / "sub" / "old.bin") == usage.project
    assert _projid(outside) == 0  # the link's target stays outside the project
    # a second start keeps the id and changes the limit
    again = quota.apply(str(nb), 12 * MiB, 50)
    assert again.project == usage.project and again.bytes_limit == 12 * MiB
    assert again.files_limit == 50


@pytest.mark.vmkernel
def test_a_container_stops_at_the_quota_and_cannot_leave_the_project(quota_fs: Path) -> None:
    nb = quota_fs / "nb"
    nb.mkdir()
    os.chown(nb, OTHER_UID, OTHER_UID)  # as the product runs a kernel: as its folder's owner
    usage = quota.apply(str(nb), 8 * MiB)
    code = f"""
        import errno, fcntl, json, os, struct
        out = {{}}
        st = os.statvfs("/nb")
        out["size"] = st.f_blocks * st.f_frsize
        written, err = 0, None
        try:
            with open("/nb/big", "wb") as f:
                for _ in range(64):
                    f.write(b"x" * (1 << 20)); f.flush(); os.fsync(f.fileno()); written += 1
        except OSError as e:
            err = e.errno
        out["written"], out["errno"] = written, err
        fd = os.open("/nb", os.O_RDONLY)
        fields = list(struct.unpack("=IIIII8x", fcntl.ioctl(fd, {quota.FS_IOC_FSGETXATTR},
                                                          bytes(28))))
        out["projid"] = fields[3]
        fields[3] = 0
        try:
            fcntl.ioctl(fd, {quota.FS_IOC_FSSETXATTR}, struct.pack("=IIIII8x", *fields))
            out["leave"] = "allowed"
        except OSError as e:
            out["leave"] = e.errno
        print(json.dumps(out))
    """
    spec = userns.for_caller().apply(
        ContainerSpec(
            id=new_container_id(),
            layers=(str(hostimage.layer_dir()),),
            command=("/usr/bin/python3", "-c", textwrap.dedent(code)),
            mounts=(*hostimage.binds(), Bind(str(nb), "/nb", readonly=False, idmap=True)),
            hostname="box",
            user=OTHER_UID,
            group=OTHER_UID,
            workdir="/nb",
        )
    )
    out_path = quota_fs.parent / f"{spec.id}.out"
    with open(out_path, "w+") as out, Container.create(spec) as c:
        c.start(stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        result = c.wait(120)
        out.seek(0)
        text = out.read()
    out_path.unlink()
    assert result.status == 0, text
    facts = json.loads(text.strip().splitlines()[-1])
    assert facts["size"] == 8 * MiB, facts  # df inside shows the quota as the folder's size
    assert facts["errno"] == errno.EDQUOT and facts["written"] <= 8, facts
    assert facts["projid"] == usage.project
    # refused: a project id is not changed from a user namespace (EINVAL: no id is mapped
    # there; EPERM: not the initial namespace)
    assert facts["leave"] in (errno.EINVAL, errno.EPERM), facts
    assert _projid(nb) == _projid(nb / "big") == usage.project
    after = quota.read(str(nb))
    assert after.bytes_used is not None and after.bytes_used <= 8 * MiB


@pytest.mark.vmkernel
def test_unprivileged_check_and_the_cli(quota_fs: Path) -> None:
    nb = quota_fs / "student"
    nb.mkdir()
    os.chown(nb, OTHER_UID, OTHER_UID)
    cli = [sys.executable, "-m", "sandbox_kernel", "quota"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([*cli, "set", str(nb), "8M"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert f"{nb}: project " in done.stdout and "used of 8 MiB" in done.stdout
    check = """
        from sandbox_kernel import quota
        from sandbox_kernel.errors import QuotaError
        print(quota.verify(FOLDER, 8 << 20).bytes_limit)
        try:
            quota.verify(FOLDER, 4 << 20)
        except QuotaError as e:
            print("refused:", e)
    """.replace("FOLDER", repr(str(nb)))
    seen = _as_other(check, quota_fs.parent)
    assert seen.returncode == 0, seen.stderr
    lines = seen.stdout.splitlines()
    assert lines[0] == str(8 * MiB)
    assert "its disk quota (8 MiB) is above the 4 MiB" in lines[1]
    assert "quota set" in lines[1]
    cleared = subprocess.run([*cli, "clear", str(nb)], capture_output=True, text=True, env=env)
    assert cleared.returncode == 0 and "no limit" in cleared.stdout, cleared
    # a project the administrator made is not changed behind their back
    admin = quota_fs / "admin-project"
    admin.mkdir()
    fd = quota.open_folder(str(admin))
    try:
        quota._set_project(fd, 4242, True)
    finally:
        os.close(fd)
    with pytest.raises(QuotaError, match=r"its disk quota \(no limit\) is above"):
        quota.apply(str(admin), 8 * MiB)
    assert quota.apply(str(admin), 8 * MiB, foreign=True).project == 4242


@pytest.fixture
def plain_folder(tmp_path: Path) -> Iterator[Path]:
    """A notebook folder on a filesystem without project quotas: a tmpfs of the test's as
    root; rootless, a folder no quota was set on."""
    nb = tmp_path / "nb"
    nb.mkdir()
    if os.geteuid() != 0:
        yield nb
        return
    done = _run("mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "skt-noquota", str(nb))
    assert done.returncode == 0, done.stderr
    try:
        os.chown(nb, OTHER_UID, OTHER_UID)
        yield nb
    finally:
        _run("umount", str(nb))
        assert not _mounted(nb)


@pytest.mark.images
@pytest.mark.slow
async def test_a_kernel_without_the_asked_quota_does_not_start(
    kernels: Path,
    plain_folder: Path,
    assert_no_leftovers: Callable[[Iterable[str]], None],
) -> None:
    config = Config({"SandboxPolicy": {"notebook_quota": "8M"}})
    km = AsyncKernelManager(kernel_name="python3-sandbox", config=config)
    with pytest.raises(Exception) as caught:
        await km.start_kernel(cwd=str(plain_folder))
    text = str(caught.value)
    if os.geteuid() == 0:
        assert f"notebook folder {plain_folder}: its filesystem has no project quotas" in text
        assert "prjquota" in text and "or remove the quota setting" in text
    else:
        assert f"notebook folder {plain_folder} has no disk quota" in text
        assert "sandbox-kernel quota set" in text
    assert "Traceback" not in text
    cid = getattr(km.provisioner, "container_id", None)
    with contextlib.suppress(Exception):
        await km.cleanup_resources()
    if cid:
        assert_no_leftovers([cid])


@pytest.mark.vmkernel
def test_a_quota_recorded_but_not_enforced_is_refused(unenforced_fs: Path) -> None:
    nb = unenforced_fs / "nb"
    nb.mkdir()
    with pytest.raises(QuotaError, match=r"recorded but not enforced .*-o prjquota"):
        quota.apply(str(nb), 8 * MiB)


@pytest.mark.vmkernel
def test_a_folder_inside_anothers_quota_never_changes_it(quota_fs: Path) -> None:
    home = quota_fs / "home"
    (home / "nb").mkdir(parents=True)
    outer = quota.apply(str(home), 16 * MiB)
    assert _projid(home / "nb") == outer.project
    # a notebook folder inside: checked against the home's quota, never given another
    with pytest.raises(QuotaError, match=r"inside the disk quota of a folder above it"):
        quota.apply(str(home / "nb"), 8 * MiB)
    assert quota.apply(str(home / "nb"), 32 * MiB).project == outer.project
    with pytest.raises(QuotaError, match=r"clear it on that folder"):
        quota.clear(str(home / "nb"))
    assert quota.read(str(home)).bytes_limit == 16 * MiB  # untouched


@pytest.mark.vmkernel
def test_a_walk_cut_short_is_done_again(quota_fs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = quota_fs / "nb"
    for i in range(6):
        (nb / f"d{i}").mkdir(parents=True)
        (nb / f"d{i}" / "f").write_text("x")
    monkeypatch.setattr(quota, "MAX_WALK_ENTRIES", 4)
    with pytest.raises(QuotaError, match="more than 4 entries"):
        quota.apply(str(nb), 8 * MiB)
    cut = quota.read(str(nb))
    assert quota.is_ours(cut.project) and cut.bytes_limit is None  # no limit: not finished
    monkeypatch.setattr(quota, "MAX_WALK_ENTRIES", 1000)
    done = quota.apply(str(nb), 8 * MiB)
    assert done.project == cut.project and done.bytes_limit == 8 * MiB
    assert {_projid(nb / f"d{i}" / "f") for i in range(6)} == {done.project}
