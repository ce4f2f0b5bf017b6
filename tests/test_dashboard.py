"""The dashboard page: built from a small history, then opened in a real headless Chromium.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs
them) and selenium (``pip install '.[bench]'``). Without them it skips here, and fails in CI
(``CI=true``), where a silently skipped browser test would prove nothing.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mha_conformance.dashboard import page as dashboard
from mha_conformance.results.report import OUTCOMES
from tests.history_fixtures import asv_results, small_history

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def test_page_shows_latest_matrix_and_problems(tmp_path):
    expected = small_history(tmp_path / "history")
    page, problems = dashboard.build_page(tmp_path / "history", tmp_path / "no-results")
    assert len(problems) == expected["problems"]
    assert "20260103T100000Z_abc123_0000dddd.json" in page  # the damaged file is named on the page
    assert '<span id="run-count">3</span>' in page
    for adapter, check, dtype, device, host in expected["matrix"]:
        assert (
            f'data-adapter="{adapter}" data-check="{check}" data-dtype="{dtype}" data-device="{device}" '
            f'data-host="{host}"' in page
        )
    assert "No benchmark results" in page and "nox -s benchmarks" in page
    assert "<svg" in page  # error-ratio and trend plots, inline
    for external in ('src="http', 'href="http', "url(http", "@import"):
        assert external not in page  # nothing fetched from elsewhere: the page works offline


def test_page_without_history(tmp_path):
    page, problems = dashboard.build_page(tmp_path / "empty", tmp_path / "no-results")
    assert "No runs yet" in page and "no such folder" in problems[0]


def _driver():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing = "selenium is not installed: pip install '.[bench]'"
    else:
        if CHROMIUM and CHROMEDRIVER:
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for arg in (
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--window-size=1300,1000",
            ):
                options.add_argument(arg)
            options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
            return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        missing = (
            "chromium and chromium-driver are not installed: apt-get install -y chromium chromium-driver"
        )
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser test cannot run in CI: {missing} (.ci/run installs them)")
    pytest.skip(missing)


@pytest.fixture
def served(tmp_path):
    """The dashboard built by its CLI from the fixtures, served over HTTP on 127.0.0.1."""
    expected = small_history(tmp_path / "history")
    asv_results(tmp_path / "results")
    html = tmp_path / "html"
    cmd = [
        sys.executable,
        "-m",
        "mha_conformance.dashboard.page",
        "--history",
        str(tmp_path / "history"),
        "--results",
        str(tmp_path / "results"),
        "--html",
        str(html),
        "--no-publish",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("dashboard: skipped") == expected["problems"]  # reported in the log, not fatal
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(html))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/conformance/index.html", expected
    server.shutdown()
    server.server_close()


def test_dashboard_in_a_browser(served):
    from selenium.webdriver.common.by import By

    url, expected = served
    driver = _driver()
    try:
        driver.get(url)
        assert driver.title == "MHA conformance dashboard"
        rows = driver.find_elements(By.CSS_SELECTOR, "#matrix-table tbody tr")
        shown = {}
        for row in rows:
            key = tuple(
                row.get_attribute(f"data-{a}") for a in ("adapter", "check", "dtype", "device", "host")
            )
            cells = row.find_elements(By.CSS_SELECTOR, "td.count")
            shown[key] = {c.get_attribute("data-outcome"): int(c.text) for c in cells}
        assert shown == expected["matrix"]
        total = driver.find_elements(By.CSS_SELECTOR, "#matrix-total td.count")
        assert {c.get_attribute("data-outcome"): int(c.text) for c in total} == expected["total"]
        assert driver.find_element(By.ID, "problem-count").text == str(expected["problems"])
        assert driver.find_element(By.ID, "run-count").text == str(expected["runs"])
        figures = driver.find_elements(By.CSS_SELECTOR, "#speed figure svg")
        assert len(figures) == 2  # forward time and GFLOP/s for the fixture's machine
        # the filter works: typing a case keeps only its rows
        every = int(driver.find_element(By.ID, "shown").text)
        assert every == sum(sum(c.values()) for c in expected["matrix"].values())
        driver.find_element(By.ID, "filter").send_keys("decode_tq1")
        assert driver.find_element(By.ID, "shown").text == "1"
        visible = [
            r for r in driver.find_elements(By.CSS_SELECTOR, "table.tests tbody tr") if r.is_displayed()
        ]
        assert [r.find_element(By.TAG_NAME, "td").text for r in visible] == ["decode_tq1_tk1024_long_cache"]
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert errors == [], errors
    finally:
        driver.quit()


def test_outcome_columns_are_the_reports():
    assert dashboard.OUTCOMES == OUTCOMES


def test_conventions_section_shows_probe_verdicts_and_reports_bad_files(tmp_path):
    from mha_conformance.dashboard.page import build_page
    from mha_conformance.probes.conventions import COLUMNS

    history_dir = tmp_path / "results" / "conformance"
    history_dir.mkdir(parents=True)
    probes = tmp_path / "results" / "probes"
    probes.mkdir()
    column = next(iter(COLUMNS))
    doc = {
        "format_version": "1",
        "adapters": {"my-attention": {"probes": {column: {"verdict": "bottom-right", "detail": "d"}}}},
    }
    (probes / "mine.json").write_text(json.dumps(doc))
    (probes / "broken.json").write_text("{")
    page, problems = build_page(history_dir, tmp_path / "asv")
    assert 'id="conventions-table"' in page and "my-attention" in page and "bottom-right" in page
    assert any("broken.json" in p for p in problems)


def test_adapter_controlled_markup_stays_text_in_the_page(tmp_path):
    """An adapter's name, exception message and meta carry markup through the suite, the JSON
    report, the history and the dashboard; headless Chromium shows it as text and runs none of it."""
    from selenium.webdriver.common.by import By

    from tests.faulty_adapters import PAYLOADS
    from tests.runs import run_suite

    history, html = tmp_path / "history", tmp_path / "html"
    res = run_suite(
        *("--adapter", "tests.faulty_adapters:Hostile", "--case", "bias_*", "--dtype", "float32"),
        *("-k", "golden", "--history", str(history)),
    )
    assert res.returncode == 1, res.stdout[-2000:]  # bias_none raised
    (report_file,) = history.glob("*.json")
    recorded = report_file.read_text()
    for payload in PAYLOADS.values():
        assert json.dumps(payload)[1:-1] in recorded  # kept as data, unchanged
    cmd = [sys.executable, "-m", "mha_conformance.dashboard.page", "--history", str(history)]
    cmd += ["--results", str(tmp_path / "no-results"), "--html", str(html), "--no-publish"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    driver = _driver()
    try:
        driver.get((html / "conformance" / "index.html").as_uri())
        for row in driver.find_elements(By.CSS_SELECTOR, "#details details"):
            driver.execute_script("arguments[0].open = true", row)
        text = driver.find_element(By.TAG_NAME, "body").text
        assert PAYLOADS["name"] in text  # shown, as text
        assert PAYLOADS["meta"] in text
        assert "</script><script>" in text
        assert driver.execute_script("return window.__xss === undefined")
        assert not driver.find_elements(By.CSS_SELECTOR, "body img, body svg[onload]")
        scripts = driver.find_elements(By.TAG_NAME, "script")
        assert len(scripts) == 1  # the page's own
        driver.switch_to.alert  # noqa: B018 (raises NoAlertPresentException when none opened)
        pytest.fail("an alert opened: the adapter's name ran as markup")
    except Exception as exc:  # selenium's NoAlertPresentException is the good outcome
        if type(exc).__name__ != "NoAlertPresentException":
            raise
    finally:
        driver.quit()
