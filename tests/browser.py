"""A real browser for the end-to-end tests: Debian's Chromium (/usr/bin/chromium) driven by
Playwright, and the few JupyterLab 4 gestures the tests make (open a notebook from the
launcher, run a cell, read its output).

Used by tests/hub (a student's JupyterLab through JupyterHub). Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from playwright.sync_api import Browser, Locator, Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

CHROMIUM = "/usr/bin/chromium"
#: Chromium's own sandbox needs a user namespace it cannot make as root in a test; the
#: other flags keep it from calling out to the network (this host reaches none of it).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium with a fresh profile (Playwright's own, removed after), closed on
    exit. Fails, never skips, when Chromium is missing: ``make test`` installs it."""
    if not os.access(CHROMIUM, os.X_OK):
        raise AssertionError(f"{CHROMIUM} is missing: apt-get install chromium (make deps)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def launcher_cards(page: Page, category: str = "Notebook") -> list[str]:
    """The kernel names the launcher offers in ``category`` (waits for it, bounded)."""
    cards = page.locator(f'.jp-LauncherCard[data-category="{category}"]')
    cards.first.wait_for(timeout=120_000)
    return [str(c.get_attribute("title")) for c in cards.all()]


def open_notebook(page: Page, kernel: str) -> Locator:
    """Open a new notebook on ``kernel`` (its display name) from a launcher (a new one when
    none shows) and return its panel once the kernel is idle."""
    card = page.locator(f'.jp-LauncherCard[data-category="Notebook"][title="{kernel}"]')
    if not card.is_visible():
        page.click('[data-command="launcher:create"]')
    card.click(timeout=60_000)
    panel = page.locator(".jp-NotebookPanel:visible")
    panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=120_000)
    return panel


def run_cell(page: Page, panel: Locator, code: str, tries: int = 4) -> str:
    """Type ``code`` into the panel's first cell, run it, and return its output's text.

    JupyterLab may show a new notebook's kernel as idle before it is connected: a run then
    does nothing (the prompt stays ``[ ]``); the cell is run again, ``tries`` times at most.
    """
    cell = panel.locator(".jp-Cell").first
    cell.locator(".cm-content").click()
    page.keyboard.type(code)
    output = cell.locator(".jp-OutputArea-output").first
    for _ in range(tries):
        cell.locator(".cm-content").click()
        page.keyboard.press("Control+Enter")
        with contextlib.suppress(PlaywrightTimeout):
            output.wait_for(timeout=15_000)
            return output.inner_text()
        prompt = cell.locator(".jp-InputPrompt").inner_text()
        if "*" in prompt:  # running: wait for it once more
            output.wait_for(timeout=60_000)
            return output.inner_text()
    raise AssertionError(f"the cell {code!r} gave no output in {tries} runs")
