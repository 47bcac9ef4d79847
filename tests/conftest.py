"""Shared test policy.

* Tests marked ``privileged`` need root; outside CI they skip when not root. Under
  ``CI=true`` a skipped privileged test is turned into a failure: privileged tests must
  run in CI. The exceptions run in the QEMU guest (``make test-cgroup-v2``) instead: the
  ``cgroupv2`` selection on a cgroup v1 host, and the ``vmkernel`` tests outside the guest
  (they need what Debian's stock kernel has and the CI host's lacks).
"""

from __future__ import annotations

import os

import pytest

from tests.hostmounts import OWN_BASETEMP

IN_CI = os.environ.get("CI") == "true"
#: Set by tools/rootless-tests.sh: the privileged suites run again as an unprivileged user
#: (a rootless server), minus the tests marked root_only.
ROOTLESS = os.environ.get("SANDBOX_KERNEL_TEST_ROOTLESS") == "1"


def _unified_host() -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1:3] == ["/sys/fs/cgroup", "cgroup2"] for line in f)
    except OSError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        # tests of a rootless server run in the rootless rerun only
        root_pass = [i for i in items if "rootless_only" in i.keywords]
        if root_pass:
            config.hook.pytest_deselected(items=root_pass)
            items[:] = [i for i in items if "rootless_only" not in i.keywords]
        return
    if ROOTLESS:
        # left out, not skipped: root_only tests ran in the root pass; with a single-id
        # map there is no root inside, so the cases run as container root do not apply
        no_root = os.environ.get("SANDBOX_KERNEL_TEST_NO_SUBIDS") == "1"
        keep, drop = [], []
        for item in items:
            as_root = (
                "-root]" in item.nodeid
                or item.nodeid.endswith("[root]")
                or "container_root" in item.keywords
            )
            if "root_only" in item.keywords or (no_root and as_root):
                drop.append(item)
            else:
                keep.append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
        return
    skip = pytest.mark.skip(reason="needs root (privileged test)")
    for item in items:
        if "privileged" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if not (IN_CI and report.skipped and "privileged" in item.keywords):
        return
    if "cgroupv2" in item.keywords and not _unified_host():
        return  # runs in the v2 guest instead
    if "vmkernel" in item.keywords and os.environ.get("SANDBOX_KERNEL_IN_VM") != "1":
        return  # runs in the guest instead (where its own fixture fails rather than skips)
    report.outcome = "failed"
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.longrepr = (
        f"privileged test skipped under CI=true (privileged tests must run in CI): {reason}"
    )


@pytest.fixture(autouse=True, scope="session")
def _own_basetemp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Mounts in this session's own temp dir count in the host mount comparisons."""
    OWN_BASETEMP.append(str(tmp_path_factory.getbasetemp()) + "/")


#: What the tests use as the host's policy file unless a test writes its own: none, so that a
#: policy file of the machine running the tests does not change what they see. Set once for
#: the session (a fixture using monkeypatch would change the order fixtures are undone in).
os.environ.setdefault("SANDBOX_KERNEL_POLICY", "none")
