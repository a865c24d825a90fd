"""`gateway demo` in a real (headless) Chromium: sign in as alice, see whoami, sign out, be refused as carol.

The demo runs in-process (run_demo on its own event loop in a thread) on a fresh state dir and free ports.
Screenshots of every step land in test-artifacts/browser/ at the repo root.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from gateway.demo.demo import DemoInfo, run_demo

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "browser"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="needs Debian's chromium and chromedriver (/usr/bin/chromium, /usr/bin/chromedriver)"),
]


def page_wait(drv: Any, timeout: float = 30.0) -> Any:
    """A WebDriverWait that retries what a navigation still in progress makes fail: an element of the page being
    replaced (StaleElementReferenceException), a script run as the document changes (JavascriptException).
    Generous: a busy machine may take long, a wait only ends early when the page is there."""
    from selenium.common.exceptions import JavascriptException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout, ignored_exceptions=(StaleElementReferenceException, JavascriptException))


def click_to_page(drv: Any, wait: Any, element: Any, marker: str) -> None:
    """Click `element`, which loads another page, and return once that page is the one shown, whole: the old
    document is gone (staleness_of its <html>), the new one is parsed to the end (readyState complete) and holds
    the element with id `marker`. Read sooner, an element may belong to the old page or to one a navigation in
    progress is about to replace (a StaleElementReferenceException on a busy machine); a sign-in crosses from
    GitLab's origin to the gateway's, which Chromium may even load in another renderer."""
    from selenium.webdriver.common.by import By

    old = drv.find_element(By.TAG_NAME, "html")
    element.click()
    wait.until(lambda d: replaced(old))
    wait.until(lambda d: page_ready(d) and d.find_elements(By.ID, marker))


def replaced(old: Any) -> bool:
    """Whether element `old` belongs to a document no longer shown. Selenium's staleness_of only knows
    StaleElementReferenceException; chromedriver may instead answer "Node with given id does not belong to the
    document" (a plain WebDriverException) while the new document takes over, which also means the old one is
    gone. Any other error is a real one and propagates."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    try:
        old.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        if "does not belong to the document" in str(exc):
            return True
        raise
    return False


def page_ready(drv: Any) -> bool:
    """The current document is parsed to its end and its subresources loaded."""
    return bool(drv.execute_script("return document.readyState") == "complete")


@contextmanager
def running_demo(port: int, state_dir: Path) -> Iterator[DemoInfo]:
    """run_demo in a background thread with its own loop; stopped (PostgreSQL included) on exit."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()
    box: dict[str, object] = {}

    def ready(info: DemoInfo) -> None:
        box["info"] = info
        started.set()

    def run() -> None:
        try:
            loop.run_until_complete(run_demo(port, state_dir, ready=ready, stop=stop))
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc
        finally:
            loop.close()
            started.set()

    thread = threading.Thread(target=run, name="gateway-demo", daemon=True)
    thread.start()
    assert started.wait(60), "the demo did not start within 60 s"
    if "error" in box:
        raise AssertionError(f"the demo failed to start: {box['error']!r}")
    info = box["info"]
    assert isinstance(info, DemoInfo)
    try:
        yield info
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        assert not thread.is_alive(), "the demo did not stop within 30 s"
        assert "error" not in box, f"the demo failed while stopping: {box['error']!r}"
        pgdata = str(state_dir.resolve() / "pgdata")
        left = [p for p in psutil.process_iter(["name", "cmdline"])
                if p.info["name"] == "postgres" and pgdata in " ".join(p.info["cmdline"] or [])]
        assert left == [], "the embedded PostgreSQL is still running"


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium Manager download anything
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1100,900"):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


def test_demo_in_a_browser(driver, demo_state_dir: Path, demo_port: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    wait = page_wait(driver)

    def shot(name: str) -> None:
        driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))

    def text(element_id: str) -> str:
        return str(driver.find_element(By.ID, element_id).text)

    def click(element_id: str, *, lands_on: str) -> None:
        """Click the element with this id and wait for the page it loads (which holds `lands_on`)."""
        click_to_page(driver, wait, wait.until(ec.element_to_be_clickable((By.ID, element_id))), lands_on)

    def opened(url: str, *, lands_on: str) -> None:
        driver.get(url)
        wait.until(lambda d: page_ready(d) and d.find_elements(By.ID, lands_on))

    with running_demo(demo_port, demo_state_dir) as info:
        alice = next(u for u in info.users if u.login == "alice")
        carol = next(u for u in info.users if u.login == "carol")
        assert alice.allowed and not carol.allowed

        # 1. The tool sends a visitor who is not signed in to GitLab's sign-in page.
        opened(info.url, lands_on="sign-in-alice")
        assert driver.current_url.startswith(f"{info.gitlab_url}/users/sign_in"), driver.current_url
        shot("01-gitlab-sign-in")

        # 2. Alice signs in and lands on whoami, which shows her identity headers.
        click("sign-in-alice", lands_on="whoami")
        assert driver.current_url == info.url
        assert text("user") == "alice"
        assert text("preferred-username") == "alice"
        groups = driver.find_element(By.ID, "groups").find_element(By.CLASS_NAME, "groups")
        assert groups.get_attribute("data-value") == "acme,acme/platform,acme/platform/sre,gateway-users"
        assert sorted(alice.groups) == ["acme", "acme/platform", "acme/platform/sre", "gateway-users"]
        assert "alice" in text("email")
        shot("02-whoami-alice")

        # 3. Sign out: the gateway session ends (and the stand-in's, so another user can be picked).
        click("sign-out", lands_on="sign-in-carol")
        shot("03-signed-out")

        # 4. Opening the tool again asks for sign-in again.
        opened(info.url, lands_on="sign-in-carol")
        assert driver.current_url.startswith(f"{info.gitlab_url}/users/sign_in"), driver.current_url
        shot("04-sign-in-again")

        # 5. Carol is outside the allowed group "acme": the refusal page, status 403.
        click("sign-in-carol", lands_on="title")
        page = driver.find_element(By.TAG_NAME, "body").text
        assert "not a member of an allowed GitLab group" in page, page
        assert "Error 403" in page, page
        assert driver.current_url.startswith(f"{info.url}oauth2/callback"), driver.current_url
        shot("05-carol-refused")

        # 6. "Try again" while GitLab still has carol signed in: the same refusal, and the page says so.
        assert "To use another GitLab account" in page, page
        click("retry", lands_on="title")
        assert "Same answer as before" in text("message"), text("message")
        shot("06-carol-same-answer")

        # 7. The way out (SPEC §16): the page's link to GitLab, sign out there, then sign in as alice.
        click("gitlab-sign-out", lands_on="sign-out")
        assert driver.current_url == f"{info.gitlab_url}/", driver.current_url
        click("sign-out", lands_on="sign-in-alice")
        opened(info.url, lands_on="sign-in-alice")
        click("sign-in-alice", lands_on="whoami")
        assert text("user") == "alice"
        shot("07-alice-after-carol")
