"""mlnb.schedule with the real scheduler (APScheduler on its SQLite job store), real papermill runs on the mlnb kernel
and real processes: every-second cron, no overlap (in one scheduler and across processes), the missed-run policy
after a restart, retries with backoff, the runs index, and the exports."""
from __future__ import annotations
import json, os, subprocess, sys, time
from datetime import datetime, timedelta, timezone
from pathlib import Path
import nbformat, pytest
from conftest import make_settings, ROOT

TICK = '''sleep: float = 0.0      # seconds to sleep
fail_until: int = 0     # fail while the counter file has at most this many lines
counter: str = ""       # a file that gets one line per run
run_id: str = ""        # injected by mlnb run'''

BODY = '''import time
from pathlib import Path
from mlnb.pipeline import record
p = Path(counter); p.open("a").write(f"{time.time()}\\n")
n = len(p.read_text().splitlines())
time.sleep(sleep)
if n <= fail_until: raise RuntimeError(f"tick {n} fails on purpose")
record("ticks", n)'''


def _pipeline(d: Path) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(TICK, metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell(BODY)])
    nb.metadata = {"kernelspec": {"name": "mlnb", "display_name": "mlnb", "language": "python"}}
    d.mkdir(parents=True, exist_ok=True); nbformat.write(nb, d/"tick.ipynb")
    return d/"tick.ipynb"


@pytest.fixture
def project(tmp_path):
    _pipeline(tmp_path/"pipelines")
    return make_settings(tmp_path, pipelines_dir=str(tmp_path/"pipelines"))


def _job(name, counter, cron="0 2 * * *", **kw):
    from mlnb.schedule import JobSpec
    params = {"counter": str(counter), **kw.pop("params", {})}
    return JobSpec(name, "tick", cron, params=params, **kw)


def _wait(cond, timeout, what):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout: raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_every_second_cron_never_overlaps(project, tmp_path):
    "A job due every second whose run takes longer: runs never overlap, the refused firings are recorded as skipped."
    from mlnb.schedule import Scheduler, RunLedger, runs_index
    counter = tmp_path/"ticks.txt"
    sch = Scheduler(project, {"tick": _job("tick", counter, "*/1 * * * * *", params={"sleep": 1.5}, retries=0)})
    sch.start()
    ledger = RunLedger(project)
    try: _wait(lambda: sum(r["status"] == "success" for r in ledger.rows("tick")) >= 2, 120, "two scheduled runs")
    finally: sch.shutdown(wait=True)
    rows = ledger.rows("tick")
    done = sorted((r for r in rows if r["status"] == "success"), key=lambda r: r["started_at"])
    for a, b in zip(done, done[1:]): assert a["ended_at"] <= b["started_at"], (a, b)     # never two at once
    assert any(r["status"] == "skipped" and "max_instances" in r["error"] for r in rows)
    assert len(counter.read_text().splitlines()) == len(done)                           # each run ran once
    idx = {r["run_id"]: r for r in runs_index(project)}
    for r in done:
        (rid,) = r["run_ids"]
        assert idx[rid]["job"] == "tick" and idx[rid]["status"] == "success" and idx[rid]["metrics"]["ticks"] >= 1
    assert "tick" in (project.reports_dir/"index.html").read_text()


def test_lock_across_processes(project, tmp_path):
    "`mlnb schedule run` in another process holds the pipeline's lock: a run here is skipped, not run twice."
    from mlnb.schedule import run_job
    counter = tmp_path/"ticks.txt"
    sched = tmp_path/"schedule.toml"
    sched.write_text(f'[jobs.slow]\npipeline = "tick"\ncron = "0 2 * * *"\nretries = 0\n'
                     f'params = {{ sleep = 6.0, counter = "{counter}" }}\n')
    env = {**os.environ, **project.to_env(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mlnb.cli", "schedule", "--file", str(sched), "run", "slow"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: counter.exists(), 60, "the other process's run to start")
        row = run_job(_job("here", counter, retries=0), project)
        assert row["status"] == "skipped" and "already running" in row["error"] and row["run_ids"] == []
        out, err = proc.communicate(timeout=60)
    finally: proc.kill()
    assert proc.returncode == 0, err
    assert json.loads(out)["status"] == "success"
    assert len(counter.read_text().splitlines()) == 1


def _restart_after_downtime(project, spec, minutes_down=5):
    "Schedule `spec`, pretend the scheduler was down for `minutes_down` (its stored next run in the past), restart it."
    from mlnb.schedule import Scheduler
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    sch = Scheduler(project, {spec.name: spec}); sch.start(); sch.shutdown()
    store = SQLAlchemyJobStore(url=f"sqlite:///{project.home/'schedule'/'jobs.db'}")
    store.start(BackgroundScheduler(), "default")           # edit the stored job as if the scheduler had been down
    job = store.lookup_job(spec.name)
    job._modify(next_run_time=datetime.now(timezone.utc).replace(second=0, microsecond=0) - timedelta(minutes=minutes_down))
    store.update_job(job); store.shutdown()
    restart = datetime.now(timezone.utc).isoformat()
    sch = Scheduler(project, {spec.name: spec})
    assert sch.start()["kept"] == [spec.name]           # the stored next run time survived the restart
    return sch, restart


def test_missed_runs_coalesced_into_one(project, tmp_path):
    "Runs missed while the scheduler was down run once (coalesce) when they are within the grace time."
    from mlnb.schedule import RunLedger
    counter = tmp_path/"ticks.txt"
    sch, restart = _restart_after_downtime(project, _job("minutely", counter, "* * * * *", retries=0, coalesce=True,
                                                         misfire_grace_seconds=3600))
    ledger = RunLedger(project)
    try: _wait(lambda: any(r["status"] == "success" for r in ledger.rows()), 60, "the coalesced run")
    finally: sch.shutdown()
    late = [r for r in ledger.rows() if r["scheduled_for"] < restart]
    assert [r["status"] for r in late] == ["success"]


def test_missed_runs_beyond_grace_are_recorded(project, tmp_path):
    "Without coalescing and with a 1 s grace, every missed run is recorded as missed and none runs."
    from mlnb.schedule import RunLedger
    counter = tmp_path/"ticks.txt"
    sch, restart = _restart_after_downtime(project, _job("minutely", counter, "* * * * *", retries=0, coalesce=False,
                                                         misfire_grace_seconds=1))
    ledger = RunLedger(project)
    try: _wait(lambda: len([r for r in ledger.rows() if r["status"] == "missed"]) >= 5, 30, "missed runs")
    finally: sch.shutdown()
    late = [r for r in ledger.rows() if r["scheduled_for"] < restart]
    assert {r["status"] for r in late} == {"missed"} and len(late) >= 5
    assert not counter.exists()


def test_retries_with_backoff_and_failed_cell(project, tmp_path, monkeypatch, capsys):
    "A failing run is retried; the ledger keeps every attempt's report; the index shows the failed cell."
    from mlnb.schedule import run_job, runs_index, write_runs_index
    counter = tmp_path/"ticks.txt"
    row = run_job(_job("flaky", counter, params={"fail_until": 1}, retries=2, retry_backoff_seconds=0.2), project)
    assert (row["status"], row["attempts"], len(row["run_ids"])) == ("success", 2, 2)
    from mlnb.audit import read_audit
    tries = read_audit(project, operation="pipeline_run", phase="end", correlation_id=f"schedule-flaky-{row['id']}")
    assert [r["outcome"] for r in tries] == ["failure", "success"]                     # both attempts, one audit thread
    row2 = run_job(_job("broken", counter, params={"fail_until": 99}, retries=0), project)
    assert (row2["status"], row2["attempts"], len(row2["run_ids"])) == ("failure", 1, 1)
    assert "tick 3 fails on purpose" in row2["error"]
    idx = {r["run_id"]: r for r in runs_index(project)}
    failed = idx[row["run_ids"][0]]
    assert failed["status"] == "failure" and failed["failed_cell"]["ename"] == "RuntimeError"
    assert "raise RuntimeError" in failed["failed_cell"]["source"] and failed["params"]["fail_until"] == 1
    assert idx[row["run_ids"][1]]["status"] == "success" and idx[row["run_ids"][1]]["job"] == "flaky"
    html = write_runs_index(project).read_text()
    assert "tick 1 fails on purpose" in html and html.count("<tr class='failure'>") == 2
    from mlnb.cli import main                        # `mlnb runs`: the same listing, and the index
    for k, v in project.to_env().items(): monkeypatch.setenv(k, v)
    assert main(["runs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum("cell " in l and "RuntimeError" in l for l in out) == 2 and out[-1].endswith("index.html")


def test_cli_list_and_exports(project, tmp_path, monkeypatch, capsys):
    "`mlnb schedule list` and the three exports; bad files get clear errors."
    from mlnb.schedule import schedule_cli
    for k, v in project.to_env().items(): monkeypatch.setenv(k, v)
    f = tmp_path/"schedule.toml"
    f.write_text('[jobs.nightly]\npipeline = "tick"\ncron = "30 2 * * 1-5"\nparams = { counter = "/tmp/x" }\n')
    assert schedule_cli(["--file", str(f), "list"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["job"] == "nightly" and datetime.fromisoformat(row["next_run"]).weekday() < 5
    assert schedule_cli(["--file", str(f), "export", "--crontab"]) == 0
    assert "30 2 * * 1-5 mkdir -p " in capsys.readouterr().out
    assert schedule_cli(["--file", str(f), "export", "--systemd", "--out", str(tmp_path/"units")]) == 0
    assert "OnCalendar=Mon,Tue,Wed,Thu,Fri *-*-* 2:30:00 UTC" in (tmp_path/"units"/"mlnb-nightly.timer").read_text()
    capsys.readouterr()
    assert schedule_cli(["--file", str(f), "export", "--airflow"]) == 0
    dag = capsys.readouterr().out
    compile(dag, "dag.py", "exec"); assert "PapermillOperator" in dag and "max_active_runs=1" in dag
    f.write_text('[jobs.x]\npipeline = "tick"\ncron = "0 25 * * *"\n')
    assert schedule_cli(["--file", str(f), "list"]) == 2
    assert "job 'x': cron '0 25 * * *'" in capsys.readouterr().err
