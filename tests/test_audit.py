"""Audit records: fields, failure records, concurrent writers."""
import json, multiprocessing as mp
import pytest
from conftest import make_settings
from mlnb.audit import audited, read_audit, AUDIT_FIELDS


def _writer(args):
    home, i = args
    from mlnb.core import Settings
    from pathlib import Path
    s = Settings(home=Path(home))
    for j in range(50):
        with audited("load_test", s, model_name="m", model_version=f"{i}.{j}") as rec:
            rec.metrics["j"] = j


def test_success_and_failure_records(scratch_settings):
    s = scratch_settings
    with audited("train", s, model_name="flight-delay", resources=["runs:/x"]) as rec:
        rec.model_version = "7"; rec.metrics["auc"] = 0.7
    with pytest.raises(ZeroDivisionError):
        with audited("deploy", s, model_name="flight-delay", rollback_available=True):
            1 / 0
    recs = read_audit(s)
    assert [(r["operation"], r["phase"], r["outcome"]) for r in recs] == [
        ("train", "start", "started"), ("train", "end", "success"),
        ("deploy", "start", "started"), ("deploy", "end", "failure")]
    for r in recs:
        assert set(r) == set(AUDIT_FIELDS)
        assert r["actor"] and r["environment"] == "local" and r["ts"].endswith("+00:00")
    ok, fail = recs[1], recs[3]
    assert ok["model_version"] == "7" and ok["metrics"] == {"auc": 0.7} and ok["duration_s"] >= 0
    assert fail["error"]["type"] == "ZeroDivisionError" and "division by zero" in fail["error"]["message"]
    assert "Traceback" in fail["error"]["traceback"] and fail["rollback_available"] is True
    assert recs[0]["audit_id"] == ok["audit_id"] != fail["audit_id"]


def test_concurrent_writers_never_interleave(tmp_path):
    with mp.get_context("spawn").Pool(4) as pool:
        pool.map(_writer, [(str(tmp_path), i) for i in range(4)])
    lines = (tmp_path/"audit.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 50 * 2
    assert all(json.loads(l)["operation"] == "load_test" for l in lines)   # every line is whole JSON


def test_torn_last_line_is_skipped(scratch_settings):
    s = scratch_settings
    with audited("x", s): pass
    with open(s.audit_path, "a") as f: f.write('{"ts": "2026-01-01", "operati')    # a writer killed mid-line
    assert [r["operation"] for r in read_audit(s)] == ["x", "x"]


def test_cli_audit_filters(scratch_settings):
    import subprocess, sys, os
    from conftest import ROOT
    s = scratch_settings
    with audited("a", s): pass
    with pytest.raises(RuntimeError):
        with audited("b", s): raise RuntimeError("boom")
    out = subprocess.run([sys.executable, "-m", "mlnb.cli", "audit", "--outcome", "failure"], cwd=ROOT,
                         env={**os.environ, **s.to_env()}, capture_output=True, text=True, check=True).stdout
    recs = [json.loads(l) for l in out.splitlines()]
    assert [(r["operation"], r["error"]["message"]) for r in recs] == [("b", "boom")]
