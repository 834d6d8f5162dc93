"""The console at /ui in a real headless Chromium, against a real gateway and model servers, on
both flag stores: log-in, a live flag page, an action with a reason, the editor (validation as
you type, a save, a conflict), a viewer's read-only view, and operator text shown as text.

Chromium is the system's (Debian's `chromium` and `chromium-driver`, installed by .ci/run);
nothing is downloaded. Set CONSOLE_SCREENSHOT=path to keep a screenshot of the flag page.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import GatewayProcess, Server, flag_doc
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

OPERATOR, VIEWER = "op-secret-5f1e9c2a77", "view-secret-8d3b7e4190"
OTHER_OPERATOR = "ops-bot-secret-2c9d11aa"
TOKENS = f"alice:operator:{OPERATOR},victor:viewer:{VIEWER},deploy-bot:operator:{OTHER_OPERATOR}"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 30  # generous: CI machines are slow and shared


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.fail(
                f"{path} not found: apt-get install chromium chromium-driver", pytrace=False
            )
    profile = tempfile.mkdtemp(prefix="console-test-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,1500",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(params=["memory", "redis"])
def store_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return {}
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("scratch_redis_prefix")
    return {"store": {"kind": "redis", "url": url, "prefix": prefix}}


@pytest.fixture
def gateway(
    gateway_server: Callable[..., GatewayProcess],
    model_server: Callable[..., Server],
    store_settings: dict[str, Any],
) -> GatewayProcess:
    """A running canary (5 % for an hour) over two real model servers, with some traffic."""
    stable, canary = model_server("v1"), model_server("v2")
    flags = flag_doc(stable.url, canary.url, weight=0.05, hold="1h")
    gw = gateway_server(flags, settings=store_settings, env={"GATEWAY_ADMIN_TOKENS": TOKENS})
    with httpx.Client(base_url=gw.url, timeout=10) as data:
        for i in range(60):
            data.post("/v1/sentiment/predict", json={"x": i}, headers={"x-user-id": f"u{i}"})
    return gw


def api(gw: GatewayProcess, token: str = OPERATOR) -> httpx.Client:
    return httpx.Client(
        base_url=gw.admin_url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


def wait_for(driver: WebDriver, check: Callable[[WebDriver], Any], what: str) -> Any:
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(check, message=what)


def text_of(driver: WebDriver, css: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def log_in(driver: WebDriver, gw: GatewayProcess, token: str) -> None:
    driver.get(f"{gw.admin_url}/ui/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{gw.admin_url}/ui/")
    wait_for(driver, lambda d: d.find_elements(By.ID, "token"), "the log-in form")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    wait_for(driver, lambda d: d.find_element(By.ID, "who").text, "the logged-in header")


def open_flag(driver: WebDriver, gw: GatewayProcess, key: str = "sentiment") -> None:
    driver.get(f"{gw.admin_url}/ui/#/flag/{key}")
    wait_for(driver, lambda d: text_of(d, "#flag-state"), "the flag's state")


def set_editor(driver: WebDriver, text: str) -> None:
    """Replace the editor's text as typing would (an input event), without typing it all."""
    area = driver.find_element(By.ID, "editor-text")
    driver.execute_script(
        "arguments[0].value = arguments[1];"
        "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
        area,
        text,
    )


def test_operator_sees_the_rollout_and_pauses_it_with_a_reason(
    browser: WebDriver, gateway: GatewayProcess
) -> None:
    log_in(browser, gateway, OPERATOR)
    assert browser.find_element(By.ID, "who").text == "alice (operator)"
    # The list shows the flag with its state and weight.
    wait_for(browser, lambda d: "5.00 %" in text_of(d, "main table"), "the flags list")
    assert "running" in text_of(browser, "main table")

    open_flag(browser, gateway)
    assert browser.find_element(By.ID, "flag-state").text == "running"
    assert text_of(browser, "[data-field=weight] .value") == "5.00 %"
    wait_for(browser, lambda d: "canary request(s)" in text_of(d, "#guard-words"), "the guard")
    assert "Watching" in text_of(browser, "#guard-words")
    assert browser.find_elements(By.CSS_SELECTOR, "#guard svg.chart polyline")
    if path := os.environ.get("CONSOLE_SCREENSHOT"):
        wait_for(browser, lambda d: "req/s" in text_of(d, "main"), "the traffic table")
        browser.save_screenshot(path)

    pause = browser.find_element(By.CSS_SELECTOR, "button[data-action=pause]")
    assert not pause.is_enabled()  # a reason is required first
    browser.find_element(By.ID, "action-reason").send_keys("latency spike under investigation")
    wait_for(browser, lambda d: pause.is_enabled(), "the pause button enabled by a reason")
    pause.click()
    wait_for(browser, lambda d: "done" in text_of(d, "#action-result"), "the pause answer")

    with api(gateway) as admin:
        assert admin.get("/admin/flags/sentiment/status").json()["state"] == "paused"
        events = admin.get("/admin/audit", params={"flag": "sentiment"}).json()["events"]
    paused = [e for e in events if e["action"] == "pause"]
    assert [(e["actor"], e["reason"]) for e in paused] == [
        ("alice", "latency spike under investigation")
    ]
    wait_for(browser, lambda d: text_of(d, "#flag-state") == "paused", "the page going live")

    browser.get(f"{gateway.admin_url}/ui/#/audit?flag=sentiment&actor=alice")
    wait_for(
        browser,
        lambda d: "latency spike under investigation" in text_of(d, "#audit-events"),
        "the reason in the audit browser",
    )
    # The token stays in the tab: no cookie, nothing in the address.
    assert browser.get_cookies() == []
    assert OPERATOR not in browser.current_url
    assert browser.execute_script("return sessionStorage.length") == 1


def test_editor_validates_saves_and_shows_a_conflict(
    browser: WebDriver, gateway: GatewayProcess
) -> None:
    with api(gateway) as admin:
        stored = admin.get("/admin/flags/sentiment").json()
    log_in(browser, gateway, OPERATOR)
    browser.get(f"{gateway.admin_url}/ui/#/flag/sentiment/edit")
    wait_for(browser, lambda d: text_of(d, "#editor-valid") == "valid: no changes", "the document")
    assert "path_prefix: /v1/sentiment" in browser.find_element(By.ID, "editor-text").get_property(
        "value"
    )
    browser.find_element(By.CSS_SELECTOR, "#editor-format option[value=json]").click()
    wait_for(
        browser,
        lambda d: d.find_element(By.ID, "editor-text").get_property("value").startswith("{"),
        "the document as JSON",
    )

    bad = {**stored["document"], "guard": {"e0": 0.2, "e1": 0.1}}
    set_editor(browser, json.dumps(bad, indent=2))
    wait_for(browser, lambda d: text_of(d, "#editor-errors"), "the validation message")
    assert "guard" in text_of(browser, "#editor-errors")
    assert not browser.find_element(By.ID, "editor-save").is_enabled()
    set_editor(browser, "flags: [unclosed")
    wait_for(browser, lambda d: "not valid JSON" in text_of(d, "#editor-errors"), "a parse error")
    with api(gateway) as admin:
        assert admin.get("/admin/flags/sentiment").json() == stored  # nothing was saved

    good = {**stored["document"], "salt": "console-edit"}
    set_editor(browser, json.dumps(good, indent=2))
    wait_for(browser, lambda d: "1 change(s)" in text_of(d, "#editor-valid"), "the diff")
    assert "salt" in text_of(browser, "#editor-diff")
    browser.find_element(By.ID, "editor-reason").send_keys("new salt")
    browser.find_element(By.ID, "editor-save").click()
    wait_for(browser, lambda d: text_of(d, "#editor-saved") == "saved: version 2", "the save")
    with api(gateway) as admin:
        now = admin.get("/admin/flags/sentiment").json()
        assert now["version"] == 2 and now["document"]["salt"] == "console-edit"
        # Another writer saves meanwhile...
        theirs = {**good, "salt": "their-salt"}
        put = api(gateway, OTHER_OPERATOR).put(
            "/admin/flags/sentiment",
            json=theirs,
            headers={"If-Match": '"2"', "X-Gateway-Reason": "rotate salt"},
        )
        assert put.status_code == 200, put.text

    mine = {**good, "salt": "my-salt"}
    set_editor(browser, json.dumps(mine, indent=2))
    wait_for(browser, lambda d: browser.find_element(By.ID, "editor-save").is_enabled(), "save")
    browser.find_element(By.ID, "editor-save").click()
    wait_for(browser, lambda d: text_of(d, "#editor-conflict"), "the conflict")
    conflict = text_of(browser, "#editor-conflict")
    assert "deploy-bot" in conflict and "rotate salt" in conflict and "their-salt" in conflict
    with api(gateway) as admin:
        assert admin.get("/admin/flags/sentiment").json()["document"]["salt"] == "their-salt"


def test_viewer_gets_no_actions_and_a_forged_post_is_refused(
    browser: WebDriver, gateway: GatewayProcess
) -> None:
    log_in(browser, gateway, VIEWER)
    assert browser.find_element(By.ID, "who").text == "victor (viewer)"
    open_flag(browser, gateway)
    assert browser.find_elements(By.ID, "actions") == []
    assert browser.find_elements(By.CSS_SELECTOR, "button[data-action]") == []
    forged = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch('/admin/flags/sentiment/rollback', {method: 'POST',
          headers: {'Authorization': 'Bearer ' + sessionStorage.getItem('gateway.admin.token'),
                    'Content-Type': 'application/json'},
          body: JSON.stringify({reason: 'forged'})}).then((r) => done(r.status));
        """
    )
    assert forged == 403
    with api(gateway) as admin:
        assert admin.get("/admin/flags/sentiment/status").json()["state"] == "running"

    browser.get(f"{gateway.admin_url}/ui/#/flag/sentiment/edit")
    wait_for(browser, lambda d: text_of(d, "#editor-valid"), "the document")
    assert browser.find_element(By.ID, "editor-text").get_attribute("readonly") is not None
    assert browser.find_elements(By.ID, "editor-save") == []


HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


def test_operator_text_renders_as_text(browser: WebDriver, gateway: GatewayProcess) -> None:
    with api(gateway) as admin:
        got = admin.post("/admin/flags/sentiment/pause", json={"reason": HOSTILE})
        assert got.status_code == 200, got.text
    log_in(browser, gateway, OPERATOR)
    browser.get(f"{gateway.admin_url}/ui/#/audit?flag=sentiment")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#audit-events .reason"), "rows")
    reasons = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#audit-events .reason")]
    assert HOSTILE in reasons
    assert browser.find_elements(By.CSS_SELECTOR, "#audit-events img, #audit-events script") == []
    assert browser.execute_script("return window.__pwned === undefined")


# --- without a browser: what the server sends ---------------------------------------------------

ASSETS = Path(__file__).parents[2] / "gateway" / "admin" / "console_assets"


def test_console_answers_carry_a_strict_policy(
    gateway_server: Callable[..., GatewayProcess],
) -> None:
    gw = gateway_server(flag_doc("http://127.0.0.1:9", None), env={"GATEWAY_ADMIN_TOKENS": TOKENS})
    names = sorted(p.name for p in ASSETS.iterdir() if p.suffix in (".html", ".js", ".css"))
    assert "index.html" in names and "app.js" in names
    with httpx.Client(base_url=gw.admin_url, timeout=10) as http:
        moved = http.get("/ui")
        assert moved.status_code == 308 and moved.headers["location"] == "/ui/"
        for path in ["/ui/", *(f"/ui/{name}" for name in names), "/ui/nothing.js"]:
            got = http.get(path)
            assert got.status_code == (404 if path == "/ui/nothing.js" else 200), path
            policy = got.headers["content-security-policy"]
            assert "script-src 'self';" in policy and "style-src 'self';" in policy
            assert "unsafe" not in policy and "default-src 'none'" in policy
            assert got.headers["x-content-type-options"] == "nosniff"
            assert "set-cookie" not in got.headers
        page = http.get("/ui/").text
    # No inline script or style for the policy to have to allow.
    assert page.count("<script") == page.count('<script type="module" src="/ui/')
    assert "style=" not in page and "<style" not in page


@pytest.mark.parametrize("name", sorted(p.name for p in ASSETS.glob("*.js")))
def test_scripts_never_parse_strings_as_markup(name: str) -> None:
    source = (ASSETS / name).read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in source, (name, sink)
    assert "document.cookie" not in source and "localStorage" not in source


def test_stale_store_banner_follows_the_redis_store(
    browser: WebDriver,
    gateway_server: Callable[..., GatewayProcess],
    restartable_redis: Any,
    scratch_redis_prefix: str,
) -> None:
    store = {"kind": "redis", "url": restartable_redis.url, "prefix": scratch_redis_prefix}
    gw = gateway_server(
        flag_doc("http://127.0.0.1:9", None),
        settings={"store": store},
        env={"GATEWAY_ADMIN_TOKENS": TOKENS},
    )
    log_in(browser, gw, VIEWER)
    wait_for(browser, lambda d: "sentiment" in text_of(d, "main table"), "the flags list")
    assert not browser.find_element(By.ID, "banner").is_displayed()
    restartable_redis.stop()
    wait_for(
        browser,
        lambda d: "flag store is unreachable" in d.find_element(By.ID, "banner").text,
        "the stale-store banner",
    )
    restartable_redis.start()
    wait_for(browser, lambda d: not d.find_element(By.ID, "banner").is_displayed(), "no banner")


# --- the validation endpoint the editor uses ----------------------------------------------------


def test_validate_checks_like_put_and_stores_nothing(
    gateway_server: Callable[..., GatewayProcess],
) -> None:
    gw = gateway_server(flag_doc("http://127.0.0.1:9", None), env={"GATEWAY_ADMIN_TOKENS": TOKENS})
    with api(gw, VIEWER) as viewer:  # it changes nothing: a viewer may ask
        stored = viewer.get("/admin/flags/sentiment").json()
        yaml_text = (
            "route: {path_prefix: /v1/sentiment}\nstable: {name: v1, upstream: 'http://a:1'}\n"
        )
        got = viewer.post(
            "/admin/flags/sentiment/validate",
            content=yaml_text,
            headers={"Content-Type": "application/yaml"},
        ).json()
        assert got["valid"] and got["errors"] == [] and got["version"] == 1
        assert got["document"]["key"] == "sentiment"
        assert {c["path"] for c in got["diff"]} >= {"stable.upstream", "unit"}
        bad = viewer.post(
            "/admin/flags/sentiment/validate",
            json={**stored["document"], "guard": {"e0": 0.2, "e1": 0.1}, "surprise": 1},
        ).json()
        assert not bad["valid"] and "document" not in bad
        assert {e["path"] for e in bad["errors"]} >= {"surprise", "guard.e1"}
        broken = viewer.post(
            "/admin/flags/other/validate",
            content="route: [unclosed",
            headers={"Content-Type": "application/yaml"},
        ).json()
        assert broken["valid"] is False and broken["version"] is None
        assert broken["errors"][0]["message"].startswith("not valid YAML (line 1, column ")
        clash = viewer.post(
            "/admin/flags/other/validate",
            json={
                "route": {"path_prefix": "/v1/sentiment"},
                "stable": stored["document"]["stable"],
            },
        ).json()
        assert [e["path"] for e in clash["errors"]] == ["route"]
        assert viewer.get("/admin/flags/sentiment").json() == stored
        assert viewer.get("/admin/flags/other").status_code == 404
        assert viewer.get("/admin/whoami").json() == {"name": "victor", "role": "viewer"}
    assert httpx.post(f"{gw.admin_url}/admin/flags/sentiment/validate", json={}).status_code == 401
