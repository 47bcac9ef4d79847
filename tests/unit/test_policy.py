"""The host's policy file: parsing, trust, per-user resolution, and where it is applied
(kernel starts, live changes, the kernel count, delegation caps, doctor, the hub hook)."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sandbox_kernel import policy as hp
from sandbox_kernel.errors import LimitRefused, QuotaError, SpecError
from sandbox_kernel.limits import Ceilings, Limits, plan_change
from sandbox_kernel.runtime.rundir import proc_starttime

GIB = 1024**3
ME = pwd.getpwuid(os.getuid())
MY_GROUP = grp.getgrgid(ME.pw_gid).gr_name
NOBODY = pwd.getpwuid(65534)


def write_policy(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A policy file as root would keep it: only its owner can write it or its folder."""
    folder = tmp_path / "etc"
    folder.mkdir(mode=0o755, exist_ok=True)
    path = folder / "policy.toml"
    path.write_text(text)
    path.chmod(0o644)
    monkeypatch.setenv(hp.ENV, str(path))
    return path


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a trusted policy file is root's")


def test_the_example_parses_and_every_key_is_documented() -> None:
    pol = hp.parse_text(hp.EXAMPLE, "/etc/sandbox-kernel/policy.toml")
    assert pol.top.ceilings == {
        "memory": 2 * GIB,
        "cpus": 1.0,
        "pids": 512,
        "tmp_size": 512 << 20,
        "writable_size": 512 << 20,
    }
    assert pol.top.max_kernels == 3 and pol.top.sandboxed_only is True
    assert pol.reserve_memory == 2 * GIB and pol.reserve_cpus == 0.5
    assert pol.groups["instructors"].ceilings == {"memory": 8 * GIB, "bandwidth": 16_000_000}
    assert pol.groups["instructors"].networks == ("none", "nat")
    assert pol.groups["instructors"].network_allow == ("198.18.0.0/15", "pypi.org:443")
    assert pol.users["alice"].max_kernels == 6
    for key in hp.RULE_KEYS:
        assert f"\n{key} = " in hp.EXAMPLE, key


def test_every_problem_is_named_with_its_section() -> None:
    raw = {
        "max_memory": "lots",
        "max_cpu": 2,
        "max_kernels": 0,
        "sandboxed_only": "yes",
        "allowed_images": "python3",
        "groups": {"students": {"user_pids": -1, "max_pids": True}},
        "users": {"bob": 3},
        "reserve": {"memory": "1G", "disk": "1G"},
    }
    with pytest.raises(SpecError) as exc:
        hp.parse(raw, "/p.toml")
    problems = exc.value.problems
    text = str(exc.value)
    assert text.startswith("the policy file /p.toml: invalid settings:")
    assert any("(top level) max_memory='lots' is not a size" in p for p in problems), problems
    assert any("(top level) max_cpu: not a policy key; use: max_memory" in p for p in problems)
    assert any("max_kernels = 0 is out of range; use 1..10000" in p for p in problems)
    assert any("sandboxed_only = 'yes' must be true or false" in p for p in problems)
    assert any("allowed_images must be a list of image names" in p for p in problems)
    assert any("[groups.students] user_pids" in p for p in problems)
    assert any("[groups.students] max_pids = True" in p for p in problems)
    assert any("users.bob must be a table" in p for p in problems)
    assert any("[reserve] 'disk' is not a key" in p for p in problems)
    assert len(problems) == 9


def test_a_user_gets_the_top_level_then_groups_then_their_own_section() -> None:
    raw = {
        "max_memory": "1G",
        "max_pids": 100,
        "max_kernels": 2,
        "allowed_images": ["python3"],
        "user_memory": "2G",
        "groups": {MY_GROUP: {"max_memory": "3G", "user_cpus": 1.5}, "nobody-s-group": {}},
        "users": {ME.pw_name: {"max_pids": 50, "max_kernels": 5}},
    }
    mine = hp.parse(raw, "/p.toml").for_user(ME.pw_uid)
    assert mine.ceilings.memory == 3 * GIB and mine.ceilings.pids == 50
    assert mine.ceilings.source("memory") == f"/p.toml [groups.{MY_GROUP}] max_memory"
    assert mine.ceilings.source("pids") == f"/p.toml [users.{ME.pw_name}] max_pids"
    assert mine.max_kernels == 5 and mine.images == ("python3",)
    assert (mine.user_memory, mine.user_cpus, mine.user_pids) == (2 * GIB, 1.5, None)
    assert mine.where == f"/p.toml (groups.{MY_GROUP}, users.{ME.pw_name})"
    # a uid's own section may be named by number; an unknown uid gets the top level
    by_uid = hp.parse({"users": {str(ME.pw_uid): {"max_kernels": 7}}}, "/p").for_user(ME.pw_uid)
    assert by_uid.max_kernels == 7
    nobody = hp.parse(raw, "/p.toml").for_user(2**31 - 5)
    assert nobody.ceilings.memory == GIB and nobody.max_kernels == 2


def test_several_groups_give_their_most_generous_values() -> None:
    a = hp.Rule({"memory": 1.0 * GIB, "pids": 900}, {}, ("python3",), 2, True)
    b = hp.Rule({"memory": 4.0 * GIB}, {"cpus": 2.0}, ("python2.7",), None, False)
    merged = hp._generous([a, b])
    assert merged.ceilings == {"memory": 4 * GIB, "pids": 900}
    assert merged.user == {"cpus": 2.0} and merged.images == ("python3", "python2.7")
    assert merged.max_kernels == 2 and merged.sandboxed_only is False
    assert hp._generous([]) == hp.Rule()


def test_only_the_default_path_may_be_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hp, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    monkeypatch.delenv(hp.ENV)
    assert hp.load() is None  # no policy file on this host
    monkeypatch.setenv(hp.ENV, hp.NO_FILE)
    assert hp.load() is None and hp.policy_path() is None  # none, on purpose
    # a file the variable names must exist: a typo must not turn the policy off
    monkeypatch.setenv(hp.ENV, str(tmp_path / "typo.toml"))
    with pytest.raises(SpecError, match=r"typo.toml: does not exist; create it, or unset"):
        hp.load()


def test_a_file_others_could_change_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_policy(tmp_path, "max_memory = '1G'\n", monkeypatch)
    if os.geteuid() != 0:
        with pytest.raises(SpecError, match="must belong to root and be writable by root only"):
            hp.load()
        return
    assert hp.load() is not None
    path.chmod(0o664)
    with pytest.raises(SpecError, match=r"chown root:root .* && chmod 644"):
        hp.load()
    path.chmod(0o644)
    path.parent.chmod(0o777)
    with pytest.raises(SpecError, match="is not a folder only root can write"):
        hp.load()
    # sticky, like /tmp: fine above the file (tmp_path is under /tmp), not as its folder,
    # where anyone could plant the file while it is absent
    path.parent.chmod(0o1777)
    with pytest.raises(SpecError, match="is not a folder only root can write"):
        hp.load()
    path.parent.chmod(0o755)
    # a link is resolved first, then the real file and its folders are checked
    link = tmp_path / "link.toml"
    link.symlink_to(path)
    monkeypatch.setenv(hp.ENV, str(link))
    assert hp.load() is not None
    monkeypatch.setenv(hp.ENV, str(path))
    path.write_text("x" * (hp.MAX_BYTES + 1))
    with pytest.raises(SpecError, match="at most"):
        hp.load()
    path.write_text("max_memory = \n")
    with pytest.raises(SpecError, match="cannot parse it"):
        hp.load()
    path.unlink()
    os.mkfifo(path, 0o644)  # a FIFO must not block the reader
    with pytest.raises(SpecError, match="not a regular file"):
        hp.load()


def test_ceilings_take_the_tighter_value_and_name_its_source() -> None:
    server = Ceilings(memory=4 * GIB, pids=100)
    host = Ceilings(memory=2 * GIB, cpus=1.0, where=(("memory", "F [top] max_memory"),))
    both = server.tighter(host)
    assert (both.memory, both.cpus, both.pids) == (2 * GIB, 1.0, 100)
    assert both.source("memory") == "F [top] max_memory"
    assert both.source("pids") == "SandboxPolicy.max_pids"
    problem = both.start_problem("memory", "3G", 3 * GIB)
    assert problem == (
        "memory='3G' is above the administrator's ceiling (F [top] max_memory = 2 GiB); "
        "ask for at most 2 GiB"
    )


def test_without_any_ceiling_a_notebook_cannot_raise_its_caps() -> None:
    start = Limits(memory=GIB, cpus=1.0, pids=256)
    live = Ceilings().or_start(start)
    for field, value, shown in (
        ("memory", "1T", "1 GiB"),
        ("cpus", 64, "1 CPUs"),
        ("pids", 1000000, "256 processes"),
        ("cpus", "1e6", "1 CPUs"),
    ):
        with pytest.raises(LimitRefused) as exc:
            plan_change({field: value}, start, live, None)
        assert str(exc.value) == (
            f"{field}={value} refused: this server allows at most {shown} per kernel "
            "(the kernelspec's value; the administrator set no higher ceiling)"
        )
    lower, _ = plan_change({"memory": "512M", "pids": 100}, start, live, None)
    assert lower.memory == 512 << 20 and lower.pids == 100
    # an administrator's ceiling lifts it, and is named as such
    admin = Ceilings(memory=4 * GIB).or_start(start)
    raised, _ = plan_change({"memory": "3G"}, start, admin, None)
    assert raised.memory == 3 * GIB
    with pytest.raises(LimitRefused, match=r"at most 4 GiB per kernel$"):
        plan_change({"memory": "8G"}, start, admin, None)


@needs_root
def test_kernel_starts_apply_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A root server's kernel of user nobody gets nobody's values."""
    from sandbox_kernel.jupyter.resolve import read_policy, resolve_settings
    from sandbox_kernel.jupyter.settings import SETTING_NAMES, SandboxPolicy, SandboxSettings

    write_policy(
        tmp_path,
        'max_memory = "2G"\nallowed_images = ["python3"]\n'
        f"[users.{NOBODY.pw_name}]\nmax_pids = 64\nmax_kernels = 2\n",
        monkeypatch,
    )
    defaults = SandboxSettings()
    values = {n: getattr(defaults, n) for n in SETTING_NAMES} | {"image": "python2.7"}
    values["memory"], values["user"] = "3G", str(NOBODY.pw_uid)
    policy = read_policy(SandboxPolicy(max_memory="4G"))
    with pytest.raises(SpecError) as exc:
        resolve_settings(
            values,
            policy,
            explicit=frozenset({"memory", "image"}),
            workdir=str(tmp_path),
            context="kernelspec 'k'",
        )
    text = str(exc.value)
    assert f"allowed_images in {tmp_path}/etc/policy.toml (users.{NOBODY.pw_name}): python3" in text
    assert f"({tmp_path}/etc/policy.toml [top level] max_memory = 2 GiB)" in text
    values |= {"image": "python3", "memory": "1G"}
    ok = resolve_settings(
        values, policy, explicit=frozenset({"memory"}), workdir=str(tmp_path), context="k"
    )
    # the default pids (256) is lowered to the user's ceiling; the count limit travels along
    assert ok.limits.pids == 64 and ok.policy.max_kernels == 2
    assert ok.policy.max_kernels_source.startswith("max_kernels in ")


def _fake_run_dir(root: Path, n: int, uid: int, kernel: bool = True) -> None:
    d = root / f"sk-{n:012x}"
    d.mkdir(parents=True)
    meta: dict[str, Any] = {"user": uid, "kernelspec": f"spec{n}", "notebook_dir": f"/nb/{n}"}
    if kernel:
        meta["kernel_id"] = f"k{n}"
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "pid").write_text(json.dumps({"pid": os.getpid(), "start": proc_starttime(os.getpid())}))


def test_a_start_beyond_the_kernel_count_names_the_running_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandbox_kernel.jupyter.provisioner import SandboxProvisioner
    from sandbox_kernel.jupyter.resolve import KernelSettings, Policy

    run = tmp_path / "run"
    monkeypatch.setenv("SANDBOX_KERNEL_RUN_DIR", str(run))
    for n in range(2):
        _fake_run_dir(run, n, 1234)
    _fake_run_dir(run, 7, 1234, kernel=False)  # a `sandbox-kernel run`, not a kernel
    _fake_run_dir(run, 8, 999)  # another user's kernel (a root server)
    prov = SandboxProvisioner(kernel_id="k-new")
    settings = KernelSettings(
        image="python3",
        limits=Limits(),
        tmp_size=1,
        writable_size=1,
        mounts=(),
        env=(),
        network=__import__("sandbox_kernel.runtime.spec", fromlist=["x"]).NetworkMode.NONE,
        uid=1234,
        gid=1234,
        cpu_defer_timeout=1.0,
        policy=Policy(max_kernels=3),
        host_uid=1234,
    )
    # a root server counts the kernels of that uid (its run root holds every user's)
    monkeypatch.setattr("sandbox_kernel.jupyter.provisioner.os.geteuid", lambda: 0)
    prov._check_kernel_count(settings)  # 2 of 3
    with pytest.raises(SpecError) as exc:
        prov._check_kernel_count(
            KernelSettings(**{**settings.__dict__, "policy": Policy(max_kernels=2)})
        )
    assert str(exc.value) == (
        "kernelspec '?': uid 1234 already runs 2 kernel(s), the most allowed at once "
        "(SandboxPolicy.max_kernels = 2): spec0 in /nb/0; spec1 in /nb/1; shut one down "
        "(Kernel > Shut Down Kernel, or the Running panel) and start again"
    )
    # a rootless server's run root is its user's alone: every kernel in it counts
    monkeypatch.setattr("sandbox_kernel.jupyter.provisioner.os.geteuid", lambda: 1234)
    with pytest.raises(SpecError, match=r"already runs 3 kernel\(s\)"):
        prov._check_kernel_count(settings)


@needs_root
def test_delegation_caps_come_from_the_file_and_the_reserve_from_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandbox_kernel.jupyter import delegating

    write_policy(
        tmp_path,
        'user_memory = "3G"\nuser_pids = 300\n[reserve]\nmemory = "1G"\ncpus = 0.5\n',
        monkeypatch,
    )
    host = hp.load()
    assert host is not None
    caps, source = delegating.caps_for(host.for_user(ME.pw_uid))
    assert (caps.memory, caps.memory_swap, caps.pids, caps.cpu_quota_us) == (
        3 * GIB,
        0,
        300,
        None,
    )
    assert source.endswith("etc/policy.toml")
    flags, why = delegating.caps_for(host.for_user(ME.pw_uid), cpus="2")
    assert flags.cpu_quota_us == 200_000 and flags.memory is None and why == "the command line"
    top = delegating.reserve_caps(host)
    assert top is not None and top.memory == delegating._mem_total() - GIB
    cpus = len(os.sched_getaffinity(0))
    assert top.cpu_quota_us == round((cpus - 0.5) * 100_000)
    assert delegating.reserve_caps(None) is None
    greedy = hp.HostPolicy("/p", reserve_memory=delegating._mem_total())
    with pytest.raises(SpecError, match="leaves nothing for kernels"):
        delegating.reserve_caps(greedy)


def test_doctor_warns_without_a_policy_and_fails_on_a_bad_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandbox_kernel.cli import doctor

    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("JUPYTER_CONFIG_PATH", str(tmp_path / "cfg"))
    [line] = doctor.check_policy()
    assert line.status == doctor.WARN and "no policy is set" in line.what
    write_policy(tmp_path, "max_memory = 'lots'\n", monkeypatch)
    [line] = doctor.check_policy()
    assert line.status == doctor.FAIL and "the policy file" in line.what


def test_only_sandbox_kernelspecs_are_offered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jupyter_client.kernelspec import NoSuchKernel

    from sandbox_kernel.jupyter.specmanager import SandboxOnlyKernelSpecManager, sandboxed

    kernels = tmp_path / "share" / "kernels"
    for name, meta in (
        ("box", {"kernel_provisioner": {"provisioner_name": "sandbox-provisioner"}}),
        ("plain", {}),
    ):
        (kernels / name).mkdir(parents=True)
        spec = {"argv": ["python3"], "display_name": name, "language": "python", "metadata": meta}
        (kernels / name / "kernel.json").write_text(json.dumps(spec))
    (kernels / "huge").mkdir()
    (kernels / "huge" / "kernel.json").write_text(" " * (70 * 1024))
    assert sandboxed(str(kernels / "box")) and not sandboxed(str(kernels / "plain"))
    assert not sandboxed(str(kernels / "huge")) and not sandboxed(str(tmp_path))
    ksm = SandboxOnlyKernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=True)
    monkeypatch.setattr(ksm, "_kernel_dirs_default", lambda: [str(kernels)])
    assert set(ksm.find_kernel_specs()) == {"box"}
    assert set(ksm.get_all_specs()) == {"box"}
    assert ksm.get_kernel_spec("box").display_name == "box"
    with pytest.raises(NoSuchKernel):
        ksm.get_kernel_spec("plain")
    with pytest.raises(NoSuchKernel):
        ksm.get_kernel_spec("python3")  # the native ipykernel one


def test_the_hub_hook_delegates_and_offers_only_sandbox_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandbox_kernel import hub

    calls: list[str] = []
    done = SimpleNamespace(source="policy", policy=hp.UserPolicy(sandboxed_only=True))

    def fake_delegate(name: str) -> SimpleNamespace:
        calls.append(name)
        return done

    monkeypatch.setattr(hub, "delegate_user", fake_delegate)
    monkeypatch.setattr(hub, "_account_uid", lambda name: 4321)
    logged: list[str] = []
    spawner = SimpleNamespace(
        user=SimpleNamespace(name="hub-alice"),
        environment={"KEEP": "1"},
        args=["--debug"],
        log=SimpleNamespace(info=lambda fmt, *a: logged.append(fmt % a)),
    )
    hook = hub.make_pre_spawn_hook(unix_name=lambda n: n.removeprefix("hub-"))
    asyncio.run(hook(spawner))
    asyncio.run(hook(spawner))  # a second spawn adds nothing twice
    assert calls == ["alice", "alice"]
    assert spawner.environment == {"KEEP": "1", hp.ENV: os.environ[hp.ENV]}
    assert spawner.args == [
        "--debug",
        f"--ServerApp.kernel_spec_manager_class={hub.SPEC_MANAGER}",
        "--MappingKernelManager.default_kernel_name=python3-sandbox",
    ]
    assert logged[-1] == (
        "sandbox-kernel: delegated alice's kernels (caps from policy); sandbox kernels only"
    )


def test_the_policy_verb_shows_what_a_user_gets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sandbox_kernel.cli import main

    monkeypatch.setenv(hp.ENV, hp.NO_FILE)
    assert main(["policy"]) == 0
    assert "no policy file at" in capsys.readouterr().out
    if os.geteuid() != 0:
        return
    path = write_policy(
        tmp_path,
        'max_memory = "2G"\nmax_kernels = 3\nuser_cpus = 1.5\n[reserve]\nmemory = "1G"\n'
        f"[users.{NOBODY.pw_name}]\nmax_kernels = 4\n",
        monkeypatch,
    )
    assert main(["policy", NOBODY.pw_name]) == 0
    out = capsys.readouterr().out
    assert f"{path}: valid; for {NOBODY.pw_name} (uid 65534) from {path} (users." in out
    assert "per kernel at most: memory 2 GiB, cpus no limit" in out
    assert "kernels at once: 4" in out and "cpus 1.5" in out
    assert "kept for the hub and servers: memory 1 GiB, cpus none" in out
    assert main(["policy", "--json", "65534"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["max_kernels"] == 4 and data["per_kernel"]["memory"] == 2 * GIB
    assert main(["policy", "no-such-user-here"]) == 125


def test_a_user_name_wins_over_a_uid() -> None:
    from sandbox_kernel.cgroups.delegation import user_entry

    assert user_entry(ME.pw_name).pw_uid == ME.pw_uid
    assert user_entry(str(NOBODY.pw_uid)).pw_name == NOBODY.pw_name
    with pytest.raises(SpecError, match="is no user of this host"):
        user_entry("99999999999999999999")


def test_the_post_stop_hook_collects_the_users_leftovers(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox_kernel import hub
    from sandbox_kernel.runtime.leftovers import GcReport

    asked: list[int | None] = []

    def fake_collect(*, dry_run: bool = False, uid: int | None = None) -> GcReport:
        asked.append(uid)
        return GcReport(run_dirs=["sk-1 (uid 7)"], cgroups=["sk-1 (uid 7)"])

    monkeypatch.setattr(hub, "collect_other_users", fake_collect)
    ending = [2, 1, 0]  # a killed server's containers still ending: waited for first
    monkeypatch.setattr(hub, "orphans_ending", lambda uid: ending.pop(0))
    logged: list[str] = []
    spawner = SimpleNamespace(
        user=SimpleNamespace(name=ME.pw_name),
        log=SimpleNamespace(info=lambda fmt, *a: logged.append(fmt % a)),
    )
    asyncio.run(hub.post_stop_hook(spawner))
    assert asked == [ME.pw_uid] and ending == []
    assert logged == [
        f"sandbox-kernel: collected what {ME.pw_name}'s kernels left: 1 run dir(s), 1 cgroup(s)"
    ]


def test_hub_names_are_accounts_and_hook_errors_stay_in_the_hook(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sandbox_kernel import hub

    with pytest.raises(SpecError, match="has no unix account of that name"):
        hub._account_uid(str(ME.pw_uid) + "0000")  # digits are never taken as a uid
    with pytest.raises(SpecError):
        hub._account_uid("\u0661\u0660\u0660\u0661")  # Arabic-Indic digits, "1001"
    logged: list[str] = []
    spawner = SimpleNamespace(
        user=SimpleNamespace(name="no-such-account-here"),
        log=SimpleNamespace(warning=lambda fmt, *a: logged.append(fmt % a)),
    )
    asyncio.run(hub.post_stop_hook(spawner))  # does not raise into the hub
    assert logged and "collecting no-such-account-here's leftovers failed" in logged[0]


def test_an_empty_image_list_is_refused() -> None:
    with pytest.raises(SpecError, match=r"allowed_images = \[\] allows no image"):
        hp.parse({"allowed_images": []}, "/p")


def test_the_readme_policy_example_is_valid() -> None:
    """The teaching-host policy the README shows parses, as an admin would copy it."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b for b in readme.split("```toml\n")[1:] if "max_kernels" in b.split("```")[0]]
    assert blocks, "the README shows no policy file"
    pol = hp.parse_text(blocks[0].split("```")[0], "/etc/sandbox-kernel/policy.toml")
    assert pol.top.max_kernels and pol.reserve_memory and "instructors" in pol.groups


def test_home_quota_comes_from_the_file_and_the_hub_hook_sets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sandbox_kernel import hub
    from sandbox_kernel import quota as q

    raw = {"home_quota": "2G", "groups": {MY_GROUP: {"home_quota": "5G"}}}
    assert hp.parse(raw, "/p.toml").for_user(ME.pw_uid).home_quota == 5 * GIB
    assert hp.parse(raw, "/p.toml").for_user(2**31 - 5).home_quota == 2 * GIB
    with pytest.raises(SpecError, match=r"\(top level\) home_quota='lots' is not a size"):
        hp.parse({"home_quota": "lots"}, "/p.toml")
    with pytest.raises(SpecError, match="home_quota='1K' is too small"):
        hp.parse({"home_quota": "1K"}, "/p.toml")

    applied: list[tuple[str, int]] = []

    def fake_apply(folder: str, limit: int, source: str, what: str) -> q.Usage:
        assert what == "home" and source.startswith("home_quota in")
        applied.append((folder, limit))
        return q.Usage(folder, q.PROJECT_BASE, limit, 0)

    done = SimpleNamespace(source="policy", policy=hp.UserPolicy(home_quota=2 * GIB))
    monkeypatch.setattr(hub, "delegate_user", lambda name: done)
    monkeypatch.setattr(hub, "_account_uid", lambda name: ME.pw_uid)
    monkeypatch.setattr(q, "apply", fake_apply)
    logged: list[str] = []
    spawner = SimpleNamespace(
        user=SimpleNamespace(name=ME.pw_name),
        environment={},
        args=[],
        log=SimpleNamespace(info=lambda fmt, *a: logged.append(fmt % a)),
    )
    asyncio.run(hub.make_pre_spawn_hook()(spawner))
    assert applied == [(os.path.realpath(ME.pw_dir), 2 * GIB)]
    assert f"project {q.PROJECT_BASE}: 0 B used of 2 GiB" in logged[0]

    # a filesystem without project quotas fails the spawn with the fix
    def unsupported(folder: str, limit: int, source: str, what: str) -> q.Usage:
        raise QuotaError(f"notebook folder {folder}: its filesystem has no project quotas")

    monkeypatch.setattr(q, "apply", unsupported)
    with pytest.raises(QuotaError, match="has no project quotas"):
        asyncio.run(hub.make_pre_spawn_hook()(spawner))
