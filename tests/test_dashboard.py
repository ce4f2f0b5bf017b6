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
from tests.history_fixtures import asv_results, record, small_history, write_run

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def test_page_shows_latest_matrix_and_problems(tmp_path):
    expected = small_history(tmp_path / "history")
    page, problems = dashboard.build_page(tmp_path / "history", tmp_path / "no-results")
    assert len(problems) == expected["problems"]
    assert "20260103T100000Z_abc123_0000dddd.json" in page  # the damaged file is named on the page
    assert '<span id="run-count">3</span>' in page
    for adapter in {key[0] for key in expected["matrix"]}:
        assert f'<tr data-adapter="{adapter}" data-framework="torch">' in page
    assert 'data-check="golden" data-status="divergent"' in page  # torch-mha's xfailed fully masked rows
    assert 'data-check="golden" data-status="xpass"' in page  # torch-sdpa's bfloat16 xpassed
    assert 'class="divergence" id="divergence-' in page  # every declared divergence has its anchor
    assert "No benchmark results" in page and "nox -s benchmarks" in page
    assert "<svg" in page and 'id="errors-data"' in page  # the plot, and its data as a table
    for external in ('src="http', 'href="http', "url(http", "@import"):
        assert external not in page  # nothing fetched from elsewhere: the page works offline


def test_cells_hold_the_tests_with_reproduce_lines(tmp_path):
    small_history(tmp_path / "history")
    page, _ = dashboard.build_page(tmp_path / "history", tmp_path / "no-results", cells_dir=tmp_path / "out")
    scripts = sorted((tmp_path / "out" / "cells").glob("*.js"))
    assert len(scripts) == 2  # torch-mha and torch-sdpa, golden
    data = {}
    for script in scripts:
        text = script.read_text()
        assert text.startswith("mhaCell(") and "<" not in text  # JSON with < escaped
        body = json.loads(text[text.index(",") + 1 : text.rindex(")")])
        data[body["adapter"]] = body
    (xfailed,) = data["torch-mha"]["tests"]
    assert xfailed["outcome"] == "xfailed" and xfailed["divergence"].startswith("divergence-")
    assert xfailed["reproduce"] == (
        "python -m mha_conformance -k 'test_golden' --adapter torch-mha --device cpu --dtype float32 "
        "--case mask_fully_masked_query_rows"
    )
    assert data["torch-mha"]["skips"] == [
        {"reason": "nn.MultiheadAttention has no grouped-query attention", "count": 1}
    ]
    assert data["torch-mha"]["counts"]["passed"] == 3  # hosts alpha and beta


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
    failing = record("torch-flex", "float32", "causal_long_t512_h2_hd8", "failed", 7.0)
    write_run(tmp_path / "history", "2026-01-05T10:00:00+00:00", "gamma", [failing], token="0000ffff")
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
    """The landing view is the matrix; a cell opens its tests (the failing one with its reproduce
    line), the filters work, nothing is requested outside the folder, the page is small and
    opens within a second; a screenshot is kept under results/."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, expected = served
    driver = _driver()
    try:
        driver.get(url)
        assert driver.title == "MHA conformance dashboard"
        opened = driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0]; return [n.loadEventEnd, n.transferSize]"
        )
        assert opened[0] > 0, "the page's load event never fired"  # how fast: a benchmark's business
        rows = driver.find_elements(By.CSS_SELECTOR, "#matrix-table tbody tr[data-adapter]")
        assert [r.get_attribute("data-adapter") for r in rows] == ["torch-flex", "torch-mha", "torch-sdpa"]
        status = {
            (r.get_attribute("data-adapter"), c.get_attribute("data-check")): c.get_attribute("data-status")
            for r in rows
            for c in r.find_elements(By.CSS_SELECTOR, "td.cell")
        }
        assert status == {
            ("torch-flex", "golden"): "fail",
            ("torch-mha", "golden"): "divergent",
            ("torch-sdpa", "golden"): "xpass",
        }
        assert driver.find_element(By.ID, "problem-count").text == str(expected["problems"])
        assert driver.find_element(By.ID, "run-count").text == str(expected["runs"] + 1)
        assert (
            len(driver.find_elements(By.CSS_SELECTOR, "#speed figure svg")) == 2
        )  # the fixture's benchmarks
        # a click opens the cell: its failing test, the message, the reproduce line
        driver.find_element(By.CSS_SELECTOR, 'tr[data-adapter="torch-flex"] td.cell').click()
        WebDriverWait(driver, 5).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cell-tests tbody tr"))
        (row,) = driver.find_elements(By.CSS_SELECTOR, "#cell-tests tbody tr")
        assert row.get_attribute("data-outcome") == "failed" and "max abs err" in row.text
        assert row.find_element(By.CSS_SELECTOR, "td.repro").text == (
            "python -m mha_conformance -k 'test_golden' --adapter torch-flex --device cpu --dtype float32 "
            "--case causal_long_t512_h2_hd8"
        )
        # a divergent cell links to its divergence's anchor
        driver.find_element(By.CSS_SELECTOR, 'tr[data-adapter="torch-mha"] td.cell').click()
        WebDriverWait(driver, 5).until(
            lambda d: (
                "torch-mha" in d.find_element(By.ID, "cell-title").text
                and d.find_elements(By.CSS_SELECTOR, "#cell-tests td.reason a")
            )
        )
        anchor = driver.find_element(By.CSS_SELECTOR, "#cell-tests td.reason a").get_attribute("href")
        assert driver.find_elements(By.ID, anchor.rpartition("#")[2])
        # the filters: adapters by text, squares by dtype
        driver.find_element(By.ID, "filter").send_keys("sdpa")
        assert driver.find_element(By.ID, "shown").text == "1"
        assert [r.get_attribute("data-adapter") for r in rows if r.is_displayed()] == ["torch-sdpa"]
        Select(driver.find_element(By.ID, "dtype")).select_by_value("bfloat16")
        squares = driver.find_elements(By.CSS_SELECTOR, 'tr[data-adapter="torch-sdpa"] .sq')
        assert [s.get_attribute("data-dtype") for s in squares if s.is_displayed()] == ["bfloat16"]
        # nothing requested outside the served folder
        origin = url.rsplit("/conformance/", 1)[0]
        requested = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert requested and all(r.startswith(origin) or r.startswith("data:") for r in requested), requested
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert errors == [], errors
        shots = ROOT / "results" / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        driver.find_element(By.ID, "filter").clear()
        driver.save_screenshot(str(shots / "dashboard.png"))
    finally:
        driver.quit()
    page = Path(url.replace("http://", "")).name  # index.html
    assert page == "index.html"


def test_dashboard_page_size_and_load_time_at_scale(tmp_path):
    """The page for a history of 50 runs of 17,000 tests each is under 1 MB (the tests are in the
    cells' files) and opens in headless Chromium; its size and load time are printed (how fast it
    loads depends on the machine and its load, so it is reported, never asserted: docs/benchmarks.md)."""
    import time

    from tests.history_fixtures import large_history

    large_history(tmp_path / "history", runs=50, tests=17_000)
    html = tmp_path / "html"
    started = time.perf_counter()
    target, _ = dashboard.write_page(tmp_path / "history", tmp_path / "no-results", html)
    built = time.perf_counter() - started
    size = target.stat().st_size
    cells = sum(p.stat().st_size for p in (target.parent / "cells").glob("*.js"))
    assert size < 1_000_000, f"index.html is {size} bytes"
    driver = _driver()
    try:
        driver.get(target.as_uri())
        load = driver.execute_script("return performance.getEntriesByType('navigation')[0].loadEventEnd")
    finally:
        driver.quit()
    print(
        f"\n50 runs x 17,000 tests: index.html {size / 1e3:.0f} kB, cells {cells / 1e6:.1f} MB, built in {built:.1f} s, "
        f"loaded in {load:.0f} ms"
    )
    assert load > 0, "the page's load event never fired"


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
    from selenium.webdriver.support.ui import WebDriverWait

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
        driver.find_element(By.CSS_SELECTOR, "td.cell").click()  # its tests, loaded from cells/<n>.js
        WebDriverWait(driver, 5).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cell-tests tbody tr"))
        text = driver.find_element(By.TAG_NAME, "body").text
        assert PAYLOADS["name"] in text  # shown, as text
        assert PAYLOADS["meta"] in text
        assert "</script><script>" in text
        assert driver.execute_script("return window.__xss === undefined")
        assert not driver.find_elements(By.CSS_SELECTOR, "body img, body svg[onload]")
        scripts = [s.get_attribute("src") or "inline" for s in driver.find_elements(By.TAG_NAME, "script")]
        assert scripts.count("inline") == 1  # the page's own, and its cells' data files
        assert all(s == "inline" or "/conformance/cells/" in s for s in scripts), scripts
        driver.switch_to.alert  # noqa: B018 (raises NoAlertPresentException when none opened)
        pytest.fail("an alert opened: the adapter's name ran as markup")
    except Exception as exc:  # selenium's NoAlertPresentException is the good outcome
        if type(exc).__name__ != "NoAlertPresentException":
            raise
    finally:
        driver.quit()


def test_asv_site_renders_offline(tmp_path):
    """A real ``asv run`` of one configuration and ``asv publish``, then the dashboard's
    ``asv_offline.localize``: served from the folder, headless Chromium draws the benchmark's graph
    with every script and stylesheet from the folder (no CDN request), and no load-failure banner."""
    pytest.importorskip("torch")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from benchmarks import runner
    from mha_conformance.dashboard import asv_offline
    from tests.runs import asv_setup

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "README").write_text("asv needs a commit to file results under\n")
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    asv, env = asv_setup(tmp_path, repo, "offline")
    forward = (
        r"bench_attention\.Forward\.time_forward\("
        + runner.param_regex("torch-sdpa", "gpt-t128", "float32", True).partition(r"\w+\(")[2]
    )
    run = [*asv, "run", "--python=same", "--quick", "--machine", "offline"]
    done = subprocess.run(
        [*run, "--set-commit-hash", head, "--bench", forward],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    done = subprocess.run([*asv, "publish"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    html = tmp_path / "html"
    assert "https://" in (html / "index.html").read_text()  # asv's page, as published, loads CDNs
    assert asv_offline.localize(html) == []
    assert "https://cdn" not in (html / "index.html").read_text()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(html))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    driver = _driver()
    try:
        driver.get(f"{origin}/#bench_attention.Forward.time_forward")
        WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "canvas.flot-base"))
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "failed to load" not in body
        requested = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert any("/vendor/" in r for r in requested)
        assert all(r.startswith(origin) or r.startswith("data:") for r in requested), requested
        shots = ROOT / "results" / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shots / "asv-offline.png"))
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
