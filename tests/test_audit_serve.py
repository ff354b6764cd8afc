"""Correlation into the server's reloads: a real `mlnb serve` process swaps models after `mlnb models promote`, and
its `serve_swap` record joins the promote's correlation (it learns the cause from the audit log)."""
import json, os, subprocess, sys, time
import pytest
from conftest import ROOT
from mlnb.audit import read_audit, verify
from test_audit import valid_lines
from test_rollout import ServerProc, base, build_two_version_home   # noqa: F401  (base is a fixture)


def test_server_swap_joins_the_promote_correlation(base, tmp_path, free_port):
    reference, spec, _ = base
    s = build_two_version_home(tmp_path, reference, spec)               # v1 champion, v2 challenger
    srv = ServerProc(s, free_port, tmp_path/"server.log").start()
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("MLNB_CORRELATION_ID", "MLNB_COMMAND", "MLNB_PARENT_ID")}
        p = subprocess.run([sys.executable, "-m", "mlnb.cli", "--change-ticket", "CHG-5", "models", "promote", "--force",
                            "--reason", "audit test"], cwd=ROOT, env={**env, **s.to_env()}, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        promote = read_audit(s, operation="promote", phase="end")[-1]
        assert promote["outcome"] == "success" and promote["model_version"] == "2"
        deadline = time.monotonic() + 60
        while not (swaps := [r for r in read_audit(s, operation="serve_swap", phase="end") if r["model_version"] == "2"]):
            assert time.monotonic() < deadline, f"no serve_swap to v2 within 60 s:\n{srv.log()}"
            time.sleep(0.2)
    finally:
        srv.stop()
    swap = swaps[0]
    assert swap["correlation_id"] == promote["correlation_id"] and swap["parent_id"] == promote["audit_id"]
    assert swap["command"] == promote["command"] == "mlnb --change-ticket CHG-5 models promote --force --reason 'audit test'"
    # one query returns the promote and the reload it caused
    out = subprocess.run([sys.executable, "-m", "mlnb.cli", "audit", "--correlation", promote["correlation_id"]], cwd=ROOT,
                         env={**env, **s.to_env()}, capture_output=True, text=True, check=True).stdout
    assert {"promote", "serve_swap"} <= {json.loads(l)["operation"] for l in out.splitlines()}
    assert len(valid_lines(s)) == len(read_audit(s)) and verify(s).ok
