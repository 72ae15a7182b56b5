"""The status page in a real headless browser: Debian's chromium driven by selenium through the
system chromedriver (scripts/system-deps installs both).

The test opens the page, makes a service fail over by rewriting the catalog, reloads until the
page lists it, submits the explain form, checks the page fits a phone's width, and takes
screenshots. ``MESHDNS_STATUS_PNG=docs/status.png`` also writes the README's screenshot.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLE_CATALOG

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path):  # noqa: ANN201 - a selenium driver
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(binary):
            pytest.fail(f"{binary} is not installed: run scripts/system-deps")
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "driver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def failover_rows(driver) -> dict[str, str]:  # noqa: ANN001
    rows = driver.find_elements(By.CSS_SELECTOR, "#failover tr")
    out = {}
    for row in rows[1:]:
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        out[f"{cells[0]}/{cells[2]}"] = cells[3]
    return out


def full_page_screenshot(driver, path: Path, width: int) -> bytes:  # noqa: ANN001
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(int(height) + 120, 6000))
    driver.save_screenshot(str(path))
    return path.read_bytes()


def test_status_page_in_a_browser(start_server, browser, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(EXAMPLE_CATALOG.read_text())
    server = start_server(catalog=catalog)
    url = f"http://127.0.0.1:{server.admin_port}/"
    browser.get(url)
    assert "meshdns" in browser.title
    before = failover_rows(browser)
    assert before["payments/default"].startswith("peer cluster-02")
    assert "web/default" not in before

    # every dc1 web instance goes critical: the default sameness group sends web to cluster-02
    data = yaml.safe_load(catalog.read_text())
    for svc in data["services"]:
        if svc["name"] == "web" and not svc.get("datacenter") and not svc.get("peer"):
            svc["health"] = "critical"
    tmp = catalog.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data))
    os.replace(tmp, catalog)
    deadline = time.monotonic() + 15
    rows: dict[str, str] = {}
    while time.monotonic() < deadline:
        browser.refresh()
        rows = failover_rows(browser)
        if "web/default" in rows:
            break
        time.sleep(0.2)
    assert rows.get("web/default") == "peer cluster-02, partition default, namespace default"

    # the explain form: a GET that renders the explanation in the page
    box = browser.find_element(By.ID, "name")
    box.clear()
    box.send_keys("payments.service.consul")
    Select(browser.find_element(By.ID, "type")).select_by_visible_text("A")
    browser.find_element(By.ID, "run").click()
    # the click returns before the next page is in: wait for the result to be there
    result = WebDriverWait(browser, 20).until(
        expected_conditions.presence_of_element_located((By.ID, "explain-result"))).text
    assert "dropped payments-1 on node-2 10.0.1.2:7070 critical: service payments-1 is " \
           "critical" in result
    assert "why: failover target 1 of 2 of payments" in result
    assert "payments.service.consul. 0 IN A 10.102.0.1" in result
    assert browser.current_url.startswith(url + "?name=payments.service.consul")
    assert browser.find_element(By.ID, "name").get_attribute("value") == \
        "payments.service.consul"

    # queries show in the rates and, for a mistyped name, in the NXDOMAIN list
    for _ in range(6):
        server.query("paymnets.service.consul")
    for name in ("web.service.consul", "payments.service.consul", "api.service.consul"):
        server.query(name)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the rates are read at most every few seconds
        browser.refresh()
        if browser.find_elements(By.CSS_SELECTOR, "#rates td"):
            break
        time.sleep(0.5)
    nx = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#nxdomain td")]
    assert nx[:2] == ["paymnets.service.consul", "6"]
    assert "NXDOMAIN" in browser.find_element(By.ID, "rates").text
    png = full_page_screenshot(browser, tmp_path / "status.png", 1280)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    wanted = os.environ.get("MESHDNS_STATUS_PNG")
    if wanted:
        Path(wanted).write_bytes(png)

    # a phone: nothing wider than the screen (wide tables scroll inside their own box)
    browser.set_window_size(390, 844)
    browser.refresh()
    width = browser.execute_script("return window.innerWidth")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width
    phone = full_page_screenshot(browser, tmp_path / "status-phone.png", 390)
    assert phone[:8] == b"\x89PNG\r\n\x1a\n"
