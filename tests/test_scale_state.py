"""mlnb's own state on a database server by a URL in settings: the serving store (routing generation, reload counter,
bandit routes, feedback and bandit counts) runs the same code on a SQLite file and on a real PostgreSQL cluster, and
two processes updating it at once lose nothing. `mlnb.statedb` is the shared helper other stores adopt."""
from __future__ import annotations
import subprocess, sys
from pathlib import Path

import pytest

from conftest import ROOT
from pg import pg_cluster

WORKER = r'''
import sys, time
from pathlib import Path
from mlnb.feedback import ServingStore
url, tag, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
store = ServingStore(url)
while not go.exists(): time.sleep(0.005)           # both processes start their updates together
for i in range(n):
    rid = f"{tag}-{i}"
    arm, version = ("challenger", "2") if i % 2 else ("champion", "1")
    store.record_routes([(rid, arm, version, 0.25, 1000.0 + i)])
    store.add_feedback([{"request_id": rid, "reward": 1.0}])
    if i % 3 == 0: store.add_feedback([{"request_id": rid, "reward": 0.5}])      # a correction: replaces, not adds
    store.set_routing({"strategy": "bandit", "by": tag}, actor=tag)
    store.request_reload()
print("done", tag)
'''


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request, tmp_path) -> str:
    if request.param == "sqlite": return str(tmp_path/"serving.db")
    return pg_cluster().createdb()


def test_two_processes_update_the_serving_store_at_once_and_lose_nothing(state_url, tmp_path):
    from mlnb.feedback import ServingStore
    n, go = 120, tmp_path/"go"
    store = ServingStore(state_url)                  # creates the tables once, as the first server would
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, state_url, tag, str(n), str(go)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    go.touch()
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    # every update of both processes is there: counters, generations, feedback rows, bandit counts
    assert store.generation() == (2 * n, 2 * n)
    gen, cfg = store.get_routing()
    assert gen == 2 * n and cfg["strategy"] == "bandit" and cfg["by"] in ("a", "b")
    fb = store.feedback()
    assert fb.height == 2 * n and fb["applied"].sum() == 2 * n
    corrected = len(range(0, n, 3))
    stats = store.bandit_stats({"champion": "1", "challenger": "2"})
    assert stats["champion"][0] + stats["challenger"][0] == 2 * n                      # one count per request
    assert stats["champion"][1] + stats["challenger"][1] == pytest.approx(2 * (n - corrected) + 2 * corrected * 0.5)
    assert stats["champion"][0] == stats["challenger"][0] == n


def test_serving_store_on_postgresql_is_chosen_by_the_setting(tmp_path):
    "serve_state=postgresql://... (what MLNB_SERVE_STATE sets) selects PostgreSQL; nothing is written to the home."
    from conftest import make_settings
    from mlnb.feedback import ServingStore, read_feedback, state_path
    url = pg_cluster().createdb()
    bare = url.replace("postgresql+psycopg2://", "postgresql://")              # what a user writes
    s = make_settings(tmp_path, serve_state=bare)
    store = ServingStore(state_path(s))
    assert store.engine.dialect.name == "postgresql" and store.path is None
    store.record_routes([("r1", "champion", "1", 0.9, 1.0)])
    assert store.add_feedback([{"request_id": "r1", "label": 1}])[0]["attributed"] is True
    assert read_feedback(s)["request_id"].to_list() == ["r1"]
    assert not (s.home/"serving.db").exists()
    import sqlalchemy as sa
    with sa.create_engine(url).connect() as c:                                  # really in PostgreSQL
        assert c.execute(sa.text("SELECT n, reward_sum FROM bandit")).fetchall() == [(1.0, 0.9)]


COUNTER = r'''
import sys, time
from pathlib import Path
import sqlalchemy as sa
from mlnb.statedb import state_url, state_engine, write_tx
url, n, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
eng = state_engine(state_url(url, "unused"))
while not go.exists(): time.sleep(0.005)
for _ in range(n):
    with write_tx(eng, "counter") as c:                 # read-modify-write: only correct if writers are serialized
        v = c.execute(sa.text("SELECT value FROM counters WHERE key = 'n'")).scalar() or 0
        c.execute(sa.text("INSERT INTO counters (key, value) VALUES ('n', :v) "
                          "ON CONFLICT (key) DO UPDATE SET value = excluded.value"), {"v": v + 1})
'''


def test_statedb_read_modify_write_from_two_processes(state_url, tmp_path):
    "The helper other stores adopt: `write_tx` serializes writers across processes on SQLite and PostgreSQL."
    import sqlalchemy as sa
    from mlnb.statedb import create_tables, state_engine, state_url as to_url
    meta = sa.MetaData()
    sa.Table("counters", meta, sa.Column("key", sa.String(16), primary_key=True), sa.Column("value", sa.Integer))
    eng = state_engine(to_url(state_url, "unused"))
    create_tables(eng, meta, "counter")
    n, go = 150, tmp_path/"go"
    procs = [subprocess.Popen([sys.executable, "-c", COUNTER, state_url, str(n), str(go)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    with eng.connect() as c: assert c.execute(sa.text("SELECT value FROM counters")).scalar() == 2 * n
