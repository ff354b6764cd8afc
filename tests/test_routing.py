"""Routing across real server processes: sticky A/B over two replicas, the observed split, shadow predictions in
the log and never in answers, a bandit whose rewards reach every replica through the shared SQLite state."""
from __future__ import annotations
import signal, time
from collections import Counter

import httpx
import polars as pl
import pytest

from test_rollout import ServerProc, build_two_version_home, clean, wait_until


@pytest.fixture(scope="module")
def home(trained_home, tmp_path_factory):
    b = trained_home.bundle
    return build_two_version_home(tmp_path_factory.mktemp("routing"), b.reference, b.spec)


@pytest.fixture(scope="module")
def records(trained_home):
    b = trained_home.bundle
    return [clean(r, b.spec) for r in b.reference.head(200).to_dicts()]


@pytest.fixture(scope="module")
def pair(home, tmp_path_factory):
    "Two independent server processes (replicas) on one home and one shared serving state, started in parallel."
    import socket
    tmp = tmp_path_factory.mktemp("pair")
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); ports.append(s.getsockname()[1])
    state = tmp/"serving.db"
    servers = [ServerProc(home, p, tmp/f"{n}.log", state=state).start(wait=False) for p, n in zip(ports, "ab")]
    try:
        for s in servers: s.wait_ready()
        yield servers
    finally:
        for s in servers: s.stop(); s.kill_group()


def arms_of(url: str, records, entities) -> list[tuple[str, str]]:
    with httpx.Client(base_url=url, timeout=30) as c:
        out = []
        for i, e in enumerate(entities):
            r = c.post("/predict", json={**records[i % len(records)], "entity": e})
            assert r.status_code == 200, r.text
            out.append((r.json()["arm"], r.json()["model_version"]))
        return out


def test_sticky_ab_across_replicas_and_split(pair, records):
    a, b = pair
    r = a.admin("/admin/routing", {"strategy": "ab", "weights": {"champion": 70, "challenger": 30}})
    assert r.status_code == 200, r.text
    g = r.json()["generation"]
    wait_until(lambda: b.models()["generation"] == g, timeout=10, what="replica b applies the routing")
    assert b.models()["routing"]["weights"] == {"champion": 70.0, "challenger": 30.0}
    entities = [f"customer-{i}" for i in range(600)]
    from_a, from_b = arms_of(a.url, records, entities), arms_of(b.url, records, entities)
    assert from_a == from_b                                              # sticky across processes
    assert arms_of(a.url, records, entities[:100]) == from_a[:100]       # and over time
    assert set(from_a) == {("champion", "1"), ("challenger", "2")}       # each arm answers with its version
    share = Counter(arm for arm, _ in from_a)["challenger"] / len(from_a)
    assert abs(share - 0.30) < 0.06, share                               # 3 sigma for n=600 is 0.056
    # a restart keeps the routing and the assignment (state in SQLite, stable hash)
    a.stop(); a.start()
    assert arms_of(a.url, records, entities[:100]) == from_a[:100]


def test_shadow_is_logged_never_answered(pair, records, home):
    from mlnb.predlog import read_predictions
    a, b = pair
    assert a.admin("/admin/routing", {"strategy": "shadow"}).status_code == 200
    wait_until(lambda: b.models()["routing"]["strategy"] == "shadow", timeout=10, what="replica b in shadow mode")
    answers = []
    with httpx.Client(timeout=30) as c:
        for i in range(60):
            srv = (a, b)[i % 2]
            r = c.post(srv.url + "/predict", json={**records[i], "entity": f"shadow-{i}"})
            assert r.status_code == 200, r.text
            answers.append(r.json())
    assert {(x["arm"], x["model_version"]) for x in answers} == {("champion", "1")}
    assert all("shadow" not in r for r in map(str, answers))
    ids = [x["request_id"] for x in answers]
    mine = lambda: read_predictions(home).filter(pl.col("request_id").is_in(ids))
    wait_until(lambda: mine().height >= 120, timeout=10, what="the logs flushed (every 0.2 s)")
    log = mine()
    by_arm = Counter(log["arm"].to_list())
    assert by_arm == {"champion": 60, "shadow": 60}, by_arm
    assert set(log.filter(pl.col("arm") == "shadow")["model_version"].to_list()) == {"2"}
    served = log.filter(pl.col("arm") == "champion").sort("request_id")["prediction"].to_list()
    assert sorted(x["prediction"] for x in answers) == sorted(served)


def test_bandit_state_is_shared_by_replicas(pair, records):
    "Predictions on replica a, feedback on replica b: both learn that the challenger earns more."
    a, b = pair
    assert a.admin("/admin/routing", {"strategy": "bandit"}).status_code == 200
    wait_until(lambda: b.models()["routing"]["strategy"] == "bandit", timeout=10, what="replica b in bandit mode")
    with httpx.Client(timeout=30) as c:
        for i in range(150):
            x = c.post(a.url + "/predict", json=records[i % len(records)]).json()
            fb = c.post(b.url + "/feedback", json={"request_id": x["request_id"], "reward": float(x["arm"] == "challenger")})
            assert fb.status_code == 200, fb.text
        stored = c.post(b.url + "/feedback", json=[{"request_id": "never-seen", "label": 1}]).json()
        assert stored == {"stored": 1, "attributed": 0, "results": [{"request_id": "never-seen", "arm": None,
                                                                    "model_version": None, "attributed": False}]}
        time.sleep(1.0)      # a few polls: routes written by a, feedback attributed, stats refreshed everywhere
        late = {s.url: Counter(c.post(s.url + "/predict", json=records[0]).json()["arm"] for _ in range(100))
                for s in (a, b)}
    for url, counts in late.items(): assert counts["challenger"] >= 80, (url, counts)
    from mlnb.feedback import ServingStore
    fb = ServingStore(a.env["MLNB_SERVE_STATE"]).feedback()
    assert fb.height == 151 and fb.filter(pl.col("applied") == 1).height == 150


def test_admin_needs_the_token(pair):
    a, _ = pair
    before = a.models()["routing"]
    r = httpx.post(a.url + "/admin/routing", json={"strategy": "ab"})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), r.text
    r = httpx.post(a.url + "/admin/reload", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "invalid admin bearer token" in r.text
    r = a.admin("/admin/routing", {"strategy": "canary", "percent": 101})
    assert r.status_code == 422 and r.json()["detail"] == {"field": "percent", "problem": "must be a number from 0 to 100, got 101"}
    r = a.admin("/admin/routing", {"strategy": "canary", "arms": {"champion": "champion", "challenger": "nope"}})
    assert r.status_code == 409 and "arm 'challenger'" in r.json()["message"], r.text
    assert a.models()["routing"] == before                                # nothing changed
    r = a.admin("/admin/reload")
    assert r.status_code == 200 and r.json()["version"] == "1"
