"""JupyterLab shows the sandbox: a real JupyterLab (loopback only) with the product's lab
extension, as ``kernelspec install`` sets it up, driven by Debian's Chromium.

Both sandbox kernels open from the launcher with their logos; the status bar item shows the
active kernel's memory used / limit, CPU and image and follows a ``%sandbox memory=``
change; a cell over the memory cap brings the dialog with the reason (and the reason in the
cell), whose "Restart with ..." raises the limit; interrupt and restart from the Kernel menu
work; with no sandbox kernel active (no notebook, a plain kernel's) nothing is polled; after
a death the kernel's status comes back to idle with no cell run. A failing test leaves a
screenshot and the server log under $SANDBOX_KERNEL_TEST_ARTIFACTS (else the test's tmp
dir).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, Request, expect

from sandbox_kernel.jupyter import kernelspecs, labext
from tests.browser import chromium, launcher_cards, open_notebook
from tests.privileged.test_server import spawn_jupyter, stop_jupyter
from tests.wsclient import rest_call

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.images,
    pytest.mark.slow,
    pytest.mark.browser,
]

PY3, PY2 = "Python 3 (sandbox)", "Python 2.7 (sandbox)"
#: the server's own Python (ipykernel's kernelspec, always offered): no sandbox kernel
PLAIN = "Python 3 (ipykernel)"
#: the admin's ceiling: the kernelspecs' 1 GiB may be doubled once
CEILING = "2G"
#: "312 MiB / 1 GiB": memory used / limit, in binary units
USED = r"\d+(\.\d+)? (B|KiB|MiB|GiB) / "


class Lab:
    def __init__(self, url: str, token: str, root: Path, log: Path) -> None:
        self.url, self.token, self.root, self.log = url, token, root, log

    def api(self, method: str, path: str) -> tuple[int, object]:
        return rest_call(self.url + path, self.token, method, None)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, images: None) -> Iterator[Lab]:
    """JupyterLab with the sandbox kernelspecs, the server extension and the lab extension
    installed into its own prefix by ``kernelspecs.install`` (as ``kernelspec install
    --prefix`` does), stopped after the module."""
    base = tmp_path_factory.mktemp("lab")
    prefix = base / "prefix"
    kernelspecs.install(None, prefix=str(prefix))
    assert (prefix / "share" / "jupyter" / "labextensions" / labext.NAME / "package.json").is_file()
    root = base / "root"
    url, token, proc, log = spawn_jupyter(
        base,
        prefix,
        root,
        "jupyterlab",
        (
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            f"--SandboxPolicy.max_memory={CEILING}",
        ),
        timeout=90,
    )
    srv = Lab(url, token, root, log)
    try:
        yield srv
    finally:
        stop_jupyter(proc, 30)
        keep = artifacts_dir(None)
        if keep is not None:
            shutil.copy2(log, keep / "lab.log")
        shutil.rmtree(base, ignore_errors=True)


def artifacts_dir(tmp_path: Path | None) -> Path | None:
    """Where a failure leaves its screenshots: $SANDBOX_KERNEL_TEST_ARTIFACTS, else
    ``tmp_path`` (None: only the variable's folder)."""
    env = os.environ.get("SANDBOX_KERNEL_TEST_ARTIFACTS")
    folder = Path(env) if env else tmp_path
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def lab_page(lab: Lab, tmp_path: Path, name: str) -> Iterator[Page]:
    """A page on the lab, logged in by its token; on a failure inside, a screenshot and the
    page's console go to the artifacts folder."""
    console: list[str] = []
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60_000)
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        # a fresh layout each time: the server keeps the last page's workspace
        page.goto(f"{lab.url}/lab?reset&token={lab.token}", timeout=120_000)
        try:
            yield page
        except BaseException:
            folder = artifacts_dir(tmp_path)
            assert folder is not None
            with contextlib.suppress(Exception):
                page.screenshot(path=str(folder / f"{name}.png"), full_page=True)
            (folder / f"{name}.console.txt").write_text("\n".join(console))
            shutil.copy2(lab.log, folder / f"{name}.lab.log")
            raise


def status_item(page: Page) -> Locator:
    return page.locator(".jp-StatusBar-Widget .sk-SandboxStatus, .sk-SandboxStatus").first


def run_code(page: Page, panel: Locator, code: str) -> Locator:
    """Put ``code`` into the panel's first cell (replacing what is there), run it, and return
    the cell (its outputs are read by the caller, with bounded waits)."""
    cell = panel.locator(".jp-Cell").first
    editor = cell.locator(".cm-content")
    editor.click()
    page.keyboard.press("Control+a")
    page.keyboard.press("Delete")
    page.keyboard.insert_text(code)
    editor.click()
    page.keyboard.press("Control+Enter")
    return cell


def output_of(page: Page, panel: Locator, code: str, tries: int = 4) -> str:
    """Run ``code`` in the first cell and return all its outputs once it has finished
    (again, ``tries`` times at most, when a just-started kernel dropped the request)."""
    for _ in range(tries):
        cell = run_code(page, panel, code)
        output = cell.locator(".jp-OutputArea-output").first
        prompt = cell.locator(".jp-InputPrompt")
        with contextlib.suppress(Exception):
            output.wait_for(timeout=20_000)
            return finished_outputs(cell, prompt)
        if "*" in prompt.inner_text():
            output.wait_for(timeout=60_000)
            return finished_outputs(cell, prompt)
    raise AssertionError(f"the cell {code!r} gave no output in {tries} runs")


def finished_outputs(cell: Locator, prompt: Locator) -> str:
    """The text of all of ``cell``'s outputs once its prompt no longer shows it running
    (a notice on stderr can come before the cell's own output)."""
    expect(prompt).not_to_contain_text("*", timeout=60_000)
    return "\n".join(cell.locator(".jp-OutputArea-output").all_inner_texts())


def kernel_menu(page: Page, command: str) -> None:
    """Kernel menu -> the item of ``command`` (kernelmenu:interrupt, kernelmenu:restart)."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Kernel$")).click()
    page.locator(f'.lm-Menu-item[data-command="{command}"]').click()


def test_launcher_shows_both_kernels_with_their_logos(lab: Lab, tmp_path: Path) -> None:
    with lab_page(lab, tmp_path, "logos") as page:
        cards = launcher_cards(page)
        assert PY3 in cards and PY2 in cards, cards
        sources = {}
        for title, spec in ((PY3, "python3-sandbox"), (PY2, "python2.7-sandbox")):
            card = f'.jp-LauncherCard[data-category="Notebook"][title="{title}"]'
            img = page.locator(f"{card} .jp-LauncherCard-icon img")
            expect(img).to_be_visible(timeout=30_000)
            src = str(img.get_attribute("src"))
            assert f"/kernelspecs/{spec}/logo-" in src, src
            page.wait_for_function(
                "(el) => el.complete && el.naturalWidth > 0",
                arg=img.element_handle(),
                timeout=30_000,
            )
            sources[spec] = src
        assert sources["python3-sandbox"] != sources["python2.7-sandbox"]


def test_status_bar_follows_the_active_sandbox_kernel(lab: Lab, tmp_path: Path) -> None:
    with lab_page(lab, tmp_path, "status") as page:
        requests: list[str] = []

        def seen(request: Request) -> None:
            if "/api/sandbox/kernels" in request.url:
                requests.append(request.url)

        page.on("request", seen)
        cards = launcher_cards(page)
        assert PLAIN in cards, cards
        # no notebook: no item and nothing polled (two poll periods and more)
        page.wait_for_timeout(7_000)
        assert requests == [], requests
        expect(status_item(page)).to_be_hidden()

        panel = open_notebook(page, PY3)
        item = status_item(page)
        expect(item).to_contain_text(re.compile(USED + r"1 GiB"), timeout=30_000)
        expect(item).to_contain_text("python3-plot")
        expect(item).to_contain_text(re.compile(r"CPU \d+% of 1 CPU"), timeout=30_000)
        assert requests, "the status bar item read nothing"

        out = output_of(page, panel, "%sandbox memory=768M")
        assert "768 MiB" in out, out
        # the poll shows the new limit within 10 s (it reads every 3 s)
        expect(item).to_contain_text(re.compile(USED + r"768 MiB"), timeout=10_000)

        item.click()
        report = page.locator(".jp-Dialog", has_text=f"Sandbox: {PY3}")
        expect(report).to_be_visible(timeout=30_000)
        expect(report).to_contain_text("python3-plot")
        expect(report).to_contain_text(re.compile(r"Memory ceiling\s*2 GiB"))
        expect(report).to_contain_text(re.compile(r"used of 768 MiB"))
        report.locator("button.jp-mod-accept").click()
        expect(report).to_be_hidden(timeout=30_000)

        open_notebook(page, PY2)
        expect(item).to_contain_text("python2.7-plot", timeout=30_000)
        expect(item).to_contain_text(re.compile(USED + r"1 GiB"), timeout=30_000)

        # a plain kernel's notebook active: no item, nothing polled (the sandbox notebooks
        # stay open behind it)
        open_notebook(page, PLAIN)
        expect(item).to_be_hidden(timeout=10_000)
        page.wait_for_timeout(1_000)  # a reading already under way may still land
        requests.clear()
        page.wait_for_timeout(7_000)
        assert requests == [], requests


def test_a_cell_over_the_cap_shows_the_reason_and_restart_with_more(
    lab: Lab, tmp_path: Path
) -> None:
    with lab_page(lab, tmp_path, "oom") as page:
        launcher_cards(page)
        panel = open_notebook(page, PY3)
        out = output_of(page, panel, "%sandbox memory=512M")
        assert "512 MiB" in out, out
        item = status_item(page)
        expect(item).to_contain_text(re.compile(USED + r"512 MiB"), timeout=10_000)

        cell = run_code(page, panel, "big = b'x' * (900 << 20)\nprint(len(big))")
        # JupyterLab's own "Kernel Restarting" notice comes first; dialogs show one at a time
        notice = page.locator(".jp-Dialog", has_text="Kernel Restarting")
        expect(notice).to_be_visible(timeout=120_000)
        # the kernel's status comes back by itself, as a plain ipykernel's does: not stuck
        # at connecting / unknown / dead until another cell is run
        status = panel.locator(".jp-Notebook-ExecutionIndicator")
        expect(status).to_have_attribute(
            "data-status", re.compile(r"^(starting|idle)$"), timeout=10_000
        )
        expect(status).to_have_attribute("data-status", "idle", timeout=30_000)
        notice.locator("button.jp-mod-accept").click()
        reason = page.locator(".jp-Dialog", has_text="out of memory")
        expect(reason).to_be_visible(timeout=30_000)
        expect(reason).to_contain_text(f"{PY3} stopped")
        expect(reason).to_contain_text(
            re.compile(r"out of memory \(limit 512 MiB, peak [\d.]+ MiB\)")
        )

        reason.get_by_role("button", name="Restart with 1 GiB").click()
        expect(reason).to_be_hidden(timeout=30_000)
        expect(item).to_contain_text(re.compile(USED + r"1 GiB"), timeout=30_000)
        # the reason in the cell too (the server's notice on the cell's output, left there)
        expect(cell.locator(".jp-OutputArea")).to_contain_text("out of memory", timeout=10_000)
        expect(status).to_have_attribute("data-status", "idle")  # still, with no cell run
        out = output_of(page, panel, "r = %sandbox\nprint(r)")
        assert "1 GiB" in out, out
        # the first execution's notice says the limit is raised, and asks for nothing
        assert "The previous kernel was stopped: out of memory" in out, out
        assert "The memory limit is now 1 GiB." in out and "Raise it" not in out, out


def test_interrupt_and_restart_from_the_kernel_menu(lab: Lab, tmp_path: Path) -> None:
    with lab_page(lab, tmp_path, "menus") as page:
        launcher_cards(page)
        panel = open_notebook(page, PY3)
        assert output_of(page, panel, "x = 6 * 7\nprint(x)").strip() == "42"

        cell = run_code(page, panel, "import time\ntime.sleep(600)")
        expect(cell.locator(".jp-InputPrompt")).to_contain_text("*", timeout=30_000)
        kernel_menu(page, "kernelmenu:interrupt")
        expect(cell.locator(".jp-OutputArea")).to_contain_text("KeyboardInterrupt", timeout=60_000)

        kernel_menu(page, "kernelmenu:restart")
        confirm = page.locator(".jp-Dialog", has_text="Restart")
        confirm.locator("button.jp-mod-accept").click(timeout=30_000)
        panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(
            timeout=120_000
        )
        # the variables are gone: the kernel restarted, and no death dialog was shown for it
        out = output_of(page, panel, "print('x' in dir())")
        assert out.strip() == "False", out
        expect(page.locator(".jp-Dialog", has_text="stopped")).to_have_count(0)
