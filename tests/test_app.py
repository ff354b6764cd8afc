"""The Streamlit app: headless with AppTest (a trained home and an empty one), then in a real browser."""
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT/"apps"/"app.py"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def _set_env(monkeypatch, env: dict):
    for k, v in env.items(): monkeypatch.setenv(k, str(v))


def _mlflow_uris(settings):
    import mlflow
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_registry_uri)


@pytest.fixture(scope="module")
def champion(trained_home):
    "The trained home's champion bundle."
    from mlnb.registry import load_model
    _mlflow_uris(trained_home.settings)
    return load_model(trained_home.settings, "champion")


@pytest.fixture(scope="module")
def drift_home(trained_home, champion):
    "The trained home with a drift report: the champion's reference sample vs real July 2013 flights."
    from mlnb.monitor import drift_report, reference_frame, save_latest_report
    s, spec = trained_home.settings, champion.spec
    from mlnb.examples.flights import build_training_set
    current = build_training_set(s, months=(7, 7)).select(spec.names)
    current = current.with_columns(prediction=pl.Series(np.asarray(champion.predict_frame(current), np.float64)))
    report = drift_report(reference_frame(champion), current, spec, settings=s,
                          context={"source": "test: July 2013 flights", "model_version": champion.version})
    save_latest_report(s, report)
    return trained_home, report


def _texts(at) -> str:
    return "\n".join([e.value for e in at.title] + [e.value for e in at.markdown] + [e.value for e in at.caption])


def test_app_pages_on_a_trained_home(monkeypatch, drift_home, champion):
    home, report = drift_home
    _set_env(monkeypatch, home.env)
    at = AppTest.from_file(str(APP), default_timeout=180).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value == "Champion model"
    text = _texts(at)
    assert f"**{champion.name}** version **{champion.version}**" in text and champion.run_id in text
    import mlflow
    metrics = mlflow.get_run(champion.run_id).data.metrics
    assert metrics and {m.label for m in at.metric} == set(metrics)
    assert len(at.get("plotly_chart")) == 1                       # the SHAP importance
    contract = at.dataframe[0].value
    assert list(contract["feature"]) == champion.spec.names

    at.switch_page("app_pages/drift.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Drift" and not at.info
    m = {e.label: e.value for e in at.metric}
    assert m["Overall status"] == report.summary["status"].upper()
    assert m["Features drifting"] == f"{report.summary['n_drifting']} / {len(champion.spec.names)}"
    assert len(at.get("plotly_chart")) == 1
    table = at.dataframe[0].value
    assert list(table["feature"]) == champion.spec.names + ["prediction"]
    assert set(table["status"]) <= {"ok", "warn", "drift"}


def test_app_on_an_empty_home(monkeypatch, tmp_path):
    (tmp_path/"settings.ini").write_text(f"[mlnb]\nhome = {tmp_path/'home'}\n")
    _set_env(monkeypatch, {"MLNB_HOME": tmp_path/"home", "MLNB_SETTINGS": tmp_path/"settings.ini"})
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.info) == 1 and "make demo" in at.info[0].value and "mlnb run train" in at.info[0].value
    assert not at.get("plotly_chart")
    at.switch_page("app_pages/drift.py").run()
    assert not at.exception
    assert len(at.info) == 1 and "mlnb drift" in at.info[0].value
    assert not (tmp_path/"home"/"mlflow.db").exists()             # looking must not create a registry


@pytest.fixture
def app_server(drift_home, free_port, tmp_path):
    "`streamlit run apps/app.py` on the trained home, headless, on a free port."
    home, _ = drift_home
    env = {**os.environ, **{k: str(v) for k, v in home.env.items()}, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    log = open(tmp_path/"streamlit.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
                             "--server.address", "127.0.0.1", "--server.port", str(free_port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{free_port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{(tmp_path/'streamlit.log').read_text()}")
            try:
                if httpx.get(f"{url}/_stcore/health", timeout=2).status_code == 200: break
            except httpx.HTTPError: pass
            if time.time() > deadline: raise TimeoutError((tmp_path/"streamlit.log").read_text())
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try: proc.wait(10)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        log.close()


def test_app_in_a_real_browser(app_server, champion, drift_home, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing: `apt-get install -y chromium` (make test installs it)")
    from playwright.sync_api import sync_playwright
    _, report = drift_home
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_server, wait_until="domcontentloaded")
            want = f"{champion.name} version {champion.version}"
            page.wait_for_function("t => document.body.innerText.includes(t)", arg=want, timeout=120_000)
            page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
            page.locator("[data-testid='stDataFrame']").first.wait_for(timeout=60_000)     # the last element
            page.screenshot(path=str(tmp_path/"model.png"), full_page=True)
            _assert_clean(page)

            page.goto(f"{app_server}/drift", wait_until="domcontentloaded")
            page.get_by_text("Overall status").wait_for(timeout=60_000)
            page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
            page.locator("[data-testid='stDataFrame']").first.wait_for(timeout=60_000)
            page.get_by_text("Report of").wait_for()
            page.screenshot(path=str(tmp_path/"drift.png"), full_page=True)
            _assert_clean(page)
            assert report.summary["status"].upper() in page.locator("[data-testid='stMetric']").first.inner_text()
        finally:
            browser.close()
    assert (tmp_path/"model.png").stat().st_size > 10_000 and (tmp_path/"drift.png").stat().st_size > 10_000


def _assert_clean(page):
    body = page.inner_text("body")
    assert "Traceback" not in body and "Exception" not in body, body[:2000]
    assert page.locator("[data-testid='stException']").count() == 0
