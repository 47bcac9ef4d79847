"""Network mode ``nat`` without root, its pure parts: the rules in the kernel's own
namespace (the same rule list as root mode's), the subnet's bound, the factory, and gc's
removal of a user-mode stack a dead kernel left (a stand-in process named like it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox_kernel.network import firewall, inside, nat, usermode
from sandbox_kernel.network.config import NatConfig


def _chain(cmds: list[dict[str, Any]], chain: str) -> list[str]:
    return [
        json.dumps(c["add"]["rule"]["expr"])
        for c in cmds
        if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain
    ]


ALLOWED = (("198.18.9.0/24", None), ("198.18.1.1/32", 443))
DNS = ("198.18.0.53",)


def test_the_namespace_table_uses_root_modes_rule_list_with_the_deny_list_first() -> None:
    cmds = firewall.namespace_commands(ALLOWED, DNS, ("198.18.64.0/24", "198.19.9.1/32"))
    rules = _chain(cmds, "kernel")
    # the same rules as a root kernel's chain, under other names, with the deny list
    # (root mode's has the source check too: the stack's tap device is the namespace's own)
    root = _chain(firewall.kernel_commands("n", "198.18.64.9", ALLOWED, DNS), "k-n")
    head = 1 + len(firewall.NEVER) + 2  # IPv4 only, never reachable, replies, the cap

    def renamed(rules: list[str]) -> list[str]:
        return [r.replace('"refused"', '"refused-n"') for r in rules]

    assert len(rules) == len(root) - 1 + 2
    assert '"saddr"' in root[1]
    assert renamed(rules[:head]) == [root[0], *root[2 : head + 1]]
    assert renamed(rules[head + 2 :]) == root[head + 1 :]
    # the stack's subnet and the host's addresses: counted and refused before any allow
    assert '"prefix": {"addr": "198.18.64.0", "len": 24}' in rules[head]
    assert '"right": "198.19.9.1"' in rules[head + 1]
    for r in rules[head : head + 2]:
        assert '"counter": "refused"' in r and "admin-prohibited" in r
    # loopback passes, the rest goes through the kernel's chain; in: loopback and replies
    assert _chain(cmds, "output") == [
        '[{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "lo"}}, '
        '{"accept": null}]',
        '[{"jump": {"target": "kernel"}}]',
    ]
    (chain,) = [c["add"]["chain"] for c in cmds if c["add"].get("chain", {}).get("name") == "input"]
    assert chain["hook"] == "input" and chain["policy"] == "drop"
    assert len(_chain(cmds, "input")) == 2 and "established" in _chain(cmds, "input")[1]


def test_a_refresh_swaps_only_the_kernels_rules() -> None:
    cmds = firewall.namespace_commands(ALLOWED, (), (), replace=True)
    assert cmds[0] == {
        "flush": {"chain": {"family": "inet", "table": "sandbox_kernel", "name": "kernel"}}
    }
    assert {c["add"]["rule"]["chain"] for c in cmds[1:]} == {"kernel"}


def test_a_rootless_subnet_holds_the_stacks_addresses() -> None:
    assert usermode.subnet_problem("198.18.64.0/24") is None
    assert usermode.subnet_problem("10.213.0.0/16") is None
    problem = usermode.subnet_problem("198.18.64.0/26")
    assert problem and "network_subnet" in problem and "/25" in problem


def test_the_factory_gives_root_the_hosts_attachment_and_others_the_stack(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = NatConfig()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    root = usermode.attachment("sk-0123456789ab", config, tmp_path, lambda pid: None)
    assert type(root) is nat.Attachment
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    user = usermode.attachment("sk-0123456789ab", config, tmp_path, lambda pid: None)
    assert isinstance(user, usermode.UserModeAttachment)
    assert user.stats() == {"mode": "nat", "address": None, "allow": [], "bandwidth": None}


def test_a_missing_stack_or_tun_device_is_refused_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(Exception, match="install the Debian package slirp4netns"):
        usermode.check_host()
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(usermode, "TUN", "/nonexistent/tun")
    with pytest.raises(Exception, match="chmod 0666 /nonexistent/tun"):
        usermode.check_host()


def test_the_tap_devices_bytes_are_read_from_proc_net_dev() -> None:
    text = (
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets\n"
        "    lo:     10       1    0    0    0     0          0         0       10       1"
        "    0    0    0     0       0          0\n"
        "  eth0:   5432      12    0    0    0     0          0         0      987       7"
        "    0    0    0     0       0          0\n"
    )
    assert inside.device_bytes(text) == (5432, 987)
    assert inside.device_bytes(text, "sk-ifb") is None


def test_an_unknown_request_in_the_namespace_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown request"):
        inside.handle({"op": "nothing"})


def _stand_in(tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    prog = tmp_path / name
    shutil.copy("/bin/sleep", prog)
    return subprocess.Popen([str(prog), "60"])


@pytest.mark.parametrize("alive", [True, False])
def test_gc_kills_the_stack_a_dead_kernel_left_and_nothing_else(
    tmp_path: Path, alive: bool
) -> None:
    stack = _stand_in(tmp_path, usermode.STACK)
    other = _stand_in(tmp_path, "sleep")
    try:
        time.sleep(0.2)  # exec'd: its name is the stand-in's
        for proc, sub in ((stack, "a"), (other, "b")):
            (tmp_path / sub).mkdir()
            (tmp_path / sub / usermode.PID_FILE).write_text(f"{proc.pid} 123\n")
        check = lambda pid, start: alive and start == "123"  # noqa: E731
        uid = os.getuid()
        # another user's process is never killed on the word of that user's file
        assert usermode.collect_run_dir(tmp_path / "a", check, uid + 1) == []
        assert stack.poll() is None
        got = usermode.collect_run_dir(tmp_path / "a", check, uid)
        assert usermode.collect_run_dir(tmp_path / "b", check, uid) == []
        assert usermode.collect_run_dir(tmp_path / "none", check, uid) == []
        if alive:
            assert got == [f"{usermode.STACK} {stack.pid}"]
            assert stack.wait(5) == -9
        else:  # its start time is not the recorded one: another process, left alone
            assert got == [] and stack.poll() is None
        assert other.poll() is None
    finally:
        for proc in (stack, other):
            proc.kill()
            proc.wait()


def test_a_refresh_swaps_the_namespaces_rules_when_a_name_moved(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sandbox_kernel.network.config import parse_allow_list

    config = NatConfig(allow=parse_allow_list(["pypi.example:443"]), dns=())
    att = usermode.UserModeAttachment("sk-0123456789ab", config, tmp_path, lambda pid: None)
    answers = {"pypi.example": ["198.18.5.5"]}
    monkeypatch.setattr(nat, "resolve_host", lambda name: answers[name])
    sent: list[dict[str, Any]] = []

    def request(req: dict[str, Any]) -> dict[str, Any]:
        sent.append(req)
        return {}

    monkeypatch.setattr(att, "_request", request)
    att.lease = nat.Lease("198.18.64.100", "198.18.64.2", att.name)
    att.allowed = (("198.18.5.5/32", 443),)
    assert att.refresh() is False and sent == []
    answers["pypi.example"] = ["198.18.6.6"]
    assert att.refresh() is True
    assert sent == [
        {"op": "rules", "allowed": [["198.18.6.6/32", 443]], "dns": [], "deny": [],
         "replace": True}
    ]  # fmt: skip
    assert att.allowed == (("198.18.6.6/32", 443),)
