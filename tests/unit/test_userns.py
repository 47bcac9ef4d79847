"""Whose ids a container's are on the host: the maps, the ranges and the private run dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox_kernel.errors import SandboxError
from sandbox_kernel.runtime import userns
from sandbox_kernel.runtime.rundir import ensure_run_root
from sandbox_kernel.runtime.spec import Bind, ContainerSpec, IdMap
from sandbox_kernel.runtime.userns import SubRange


def _outside(maps: tuple[IdMap, ...]) -> list[range]:
    return [range(m.outside, m.outside + m.count) for m in maps]


def test_keep_id_maps_the_user_to_itself_and_the_rest_into_its_range() -> None:
    maps = userns.keep_id(1000, SubRange(100000, 65536))
    assert maps == (IdMap(0, 100000, 1000), IdMap(1000, 1000, 1), IdMap(1001, 101000, 64536))
    ranges = _outside(maps)
    assert not any(0 in r for r in ranges), "host root is in no map"
    ids = [i for r in ranges for i in r]
    assert len(ids) == len(set(ids)), "no host id twice"
    assert all(100000 <= i < 165536 or i == 1000 for i in ids), "only the user and its range"


def test_subordinate_range_by_name_or_uid(tmp_path: Path) -> None:
    f = tmp_path / "subuid"
    f.write_text("junk\nbob:x:1\nbob:0:65536\nalice:200000:65536\n1234:300000:10\n")
    assert userns.subordinate_range(f, "alice", 1001) == SubRange(200000, 65536)
    assert userns.subordinate_range(f, "carol", 1234) == SubRange(300000, 10)
    assert userns.subordinate_range(f, "bob", 1002) is None, "a start of 0 (host root) is refused"
    assert userns.subordinate_range(tmp_path / "missing", "alice", 1001) is None


def test_rootless_maps_with_and_without_a_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    me, gid = os.getuid(), os.getgid()
    sub = tmp_path / "subuid"
    sub.write_text("")
    monkeypatch.setattr(userns, "SUBUID", sub)
    monkeypatch.setattr(userns, "SUBGID", sub)
    monkeypatch.setattr(userns, "map_helpers", lambda: ("/usr/bin/newuidmap", "/usr/bin/newgidmap"))
    single = userns.rootless(me, gid)
    assert single.uid_map == (IdMap(me, me, 1),) and single.gid_map == (IdMap(gid, gid, 1),)
    assert single.helpers is None and "subordinate" in single.notice
    sub.write_text(f"{me}:500000:65536\n{gid}:500000:65536\n")
    full = userns.rootless(me, gid)
    assert full.uid_map == userns.keep_id(me, SubRange(500000, 65536)) and not full.notice
    assert full.helpers == ("/usr/bin/newuidmap", "/usr/bin/newgidmap")
    monkeypatch.setattr(userns, "map_helpers", lambda: None)
    assert userns.rootless(me, gid).helpers is None, "no helpers: the single map"


def test_free_start_overlaps_no_range_and_no_account(tmp_path: Path) -> None:
    f = tmp_path / "subuid"
    f.write_text("a:100000:65536\nb:165536:65536\n")
    start = userns._free_start((f,), 65536)
    assert start % 65536 == 0 and start >= 231072
    import pwd

    assert all(not start <= e.pw_uid < start + 65536 for e in pwd.getpwall())


def test_root_mode_maps_container_root_to_the_reserved_range() -> None:
    ns = userns.root_mode(SubRange(196608, 65536))
    assert ns.host_uid(0) == 196608 and ns.host_uid(65535) == 196608 + 65535
    assert ns.host_uid(65536) is None and ns.has_root
    spec = ContainerSpec(
        id="sk-0123456789ab",
        layers=("/l",),
        command=("/bin/true",),
        mounts=(Bind("/srv/nb", "/srv/nb", readonly=False, idmap=True),),
    )
    rooted = ns.apply(spec)
    assert rooted.idmap_layers and all(isinstance(m, Bind) and m.idmap for m in rooted.mounts)
    rootless = userns.UserNamespace((IdMap(1000, 1000, 1),), (IdMap(1000, 1000, 1),), None).apply(
        spec
    )
    assert not rootless.idmap_layers
    assert not any(isinstance(m, Bind) and m.idmap for m in rootless.mounts)


def test_private_run_root_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run root someone else made (in /tmp: anyone may) or opened to others is refused."""
    real = os.getuid()
    fake = real if real != 0 else 4242  # as root, stand for an ordinary user
    monkeypatch.setattr(os, "geteuid", lambda: fake)
    root = tmp_path / "sk-run"
    if real == 0:
        # made by another uid (here: root's own process, not the pretended user's)
        with pytest.raises(SandboxError, match="not a private directory"):
            ensure_run_root(root)
        os.chown(root, fake, fake)
    assert ensure_run_root(root) == root  # the caller's own, 0700
    assert (root.stat().st_mode & 0o777) == 0o700
    root.chmod(0o755)
    with pytest.raises(SandboxError, match="mode 755"):
        ensure_run_root(root)
    root.chmod(0o700)
    link = tmp_path / "sk-link"
    link.symlink_to(root)
    with pytest.raises(SandboxError, match="not a private directory"):
        ensure_run_root(link)
    other = tmp_path / "sk-other"
    other.mkdir(mode=0o700)
    if real == 0:
        os.chown(other, fake + 1, fake + 1)
        with pytest.raises(SandboxError, match=f"owner {fake + 1}"):
            ensure_run_root(other)


def test_root_mode_keeping_keeps_the_owner_never_root() -> None:
    """A notebook filesystem without idmapped mounts: the kernel's own ids map to
    themselves, every other one into the range; host root is never kept."""
    sub = SubRange(196608, 65536)
    kept = userns.root_mode_keeping(sub, 1000, 1000)
    assert kept.mode == "root" and kept.host_uid(1000) == 1000 and kept.host_gid(1000) == 1000
    assert kept.host_uid(0) == 196608 and kept.host_uid(1001) == 196608 + 1000
    assert not any(0 in r for r in _outside(kept.uid_map))
    for uid in (0, 1, 999, 65534, 70000):  # root, system ids, nobody, beyond the range
        ns = userns.root_mode_keeping(sub, uid, uid)
        assert ns == userns.root_mode(sub), uid
    half = userns.root_mode_keeping(sub, 1000, 100)  # the group 'users' is not kept
    assert half.host_uid(1000) == 1000 and half.gid_map == userns.root_mode(sub).gid_map


def test_kernel_userns_falls_back_where_the_folder_cannot_be_idmapped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sandbox_kernel.jupyter import launch

    sub = SubRange(196608, 65536)
    monkeypatch.setattr(userns, "for_caller", lambda: userns.root_mode(sub))
    monkeypatch.setattr(userns, "idmap_supported", lambda path: True)
    ns, idmapped, note = launch.kernel_userns("/srv/nb", 1000, 1000)
    assert ns == userns.root_mode(sub) and idmapped and not note
    monkeypatch.setattr(userns, "idmap_supported", lambda path: False)
    nb = tmp_path / "nb"
    nb.mkdir()
    if os.getuid() == 0:
        os.chown(nb, 1000, 1000)
    owner = nb.stat().st_uid
    ns, idmapped, note = launch.kernel_userns(str(nb), owner, owner)
    if owner >= 1000:
        assert not idmapped and ns.host_uid(owner) == owner and f"host uid {owner}" in note
    ns, idmapped, note = launch.kernel_userns(str(nb), owner + 1, owner + 1)
    assert ns == userns.root_mode(sub) and "not kept" in note, "only the folder's owner"
    ns, idmapped, note = launch.kernel_userns(str(nb), 65534, 65534)
    assert ns == userns.root_mode(sub), "nobody is never kept"
