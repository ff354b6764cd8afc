"""The prediction log: buffered, thread-safe, atomic part files, read back with polars."""
import os, threading, time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest

from mlnb.core import Settings
from mlnb.predlog import BASE_SCHEMA, PredictionLog, log_schema, part_files, read_predictions
from mlnb.schema import FeatureDef, FeatureSpec

SPEC = FeatureSpec((FeatureDef("carrier", "cat", categories=("AA", "UA")), FeatureDef("distance", "num"),
                    FeatureDef("temp", "num", nullable=True)))


def rec(rid, ts=None, **features):
    return dict(request_id=str(rid), ts=time.time() if ts is None else ts, model_name="m", model_version="2",
                arm="champion", entity=None, latency_ms=0.7, prediction=0.3,
                features={"carrier": "UA", "distance": 1400, "temp": None, **features})


@pytest.fixture
def settings(tmp_path):
    return Settings(home=tmp_path/"home", log_flush_rows=100, log_flush_seconds=0.05)


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


def test_empty_log_reads_as_empty_frame_with_base_columns(settings):
    df = read_predictions(settings)
    assert df.height == 0 and df.schema == pl.Schema(BASE_SCHEMA)


def test_contract_layout_and_schema(settings):
    with PredictionLog(settings, SPEC) as log:
        log.append([rec("a", datetime(2024, 5, 1, 12, tzinfo=timezone.utc), carrier="ZZ", temp=51.5, distance=733)])
    (p,) = part_files(settings)
    assert p.parent == settings.predictions_dir/"date=2024-05-01"
    name = p.name.split("-")
    assert name[0] == "part" and name[2] == str(os.getpid()) and p.suffix == ".parquet"
    df = read_predictions(settings)
    assert df.schema == pl.Schema(log_schema(SPEC))
    assert df.row(0, named=True) == dict(
        request_id="a", ts=datetime(2024, 5, 1, 12, tzinfo=timezone.utc), model_name="m", model_version="2",
        arm="champion", entity=None, latency_ms=0.7, prediction=0.3, carrier="ZZ", distance=733.0, temp=51.5)


def test_flushes_on_time_and_on_row_count(tmp_path):
    s = Settings(home=tmp_path, log_flush_rows=10, log_flush_seconds=0.2)
    log = PredictionLog(s, SPEC)
    log.append([rec(1)])
    wait_for(lambda: log.rows_written == 1)            # the timer
    log.flush_seconds = 30                              # from the next wait on, only the row count triggers
    time.sleep(0.3)
    log.append([rec(i) for i in range(10)])
    wait_for(lambda: log.rows_written == 11, timeout=3)
    log.close()
    assert read_predictions(s).height == 11


def test_concurrent_appends_and_reads_lose_nothing_and_never_see_partial_files(settings):
    log = PredictionLog(settings, SPEC)
    stop, seen, errors = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            try: seen.append(read_predictions(settings).height)
            except Exception as e: errors.append(e)

    def writer(t):
        for i in range(500): log.append([rec(f"{t}-{i}")])

    r = threading.Thread(target=reader); r.start()
    ws = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for w in ws: w.start()
    for w in ws: w.join()
    log.close()
    stop.set(); r.join()
    assert not errors
    assert seen == sorted(seen)                          # readers only ever see whole files: counts only grow
    df = read_predictions(settings)
    assert df.height == 2000 and df["request_id"].n_unique() == 2000
    assert not [p for p in settings.predictions_dir.rglob("*") if p.name.endswith(".tmp")]


def test_failed_flush_keeps_records_and_retries(settings, capsys):
    log = PredictionLog(settings, SPEC, start=False)
    settings.home.mkdir(parents=True)
    settings.predictions_dir.write_text("a file where the folder should be")
    log.append([rec(1), rec(2)])
    assert log.flush() == 0
    assert len(log) == 2 and log.failures == 1 and "kept in memory" in capsys.readouterr().err
    log.append([rec(3)])
    settings.predictions_dir.unlink()
    log.close()
    assert read_predictions(settings)["request_id"].to_list() == ["1", "2", "3"]


def test_buffer_is_bounded_when_writes_keep_failing(settings, capsys):
    log = PredictionLog(settings, SPEC, start=False, max_buffer=5)
    settings.home.mkdir(parents=True)
    settings.predictions_dir.write_text("x")
    log.append([rec(i) for i in range(8)])
    log.flush()
    assert len(log) == 5 and log.dropped == 3 and "DROPPED the 3 oldest" in capsys.readouterr().err
    settings.predictions_dir.unlink()
    log.close()
    assert read_predictions(settings)["request_id"].to_list() == ["3", "4", "5", "6", "7"]


def test_close_is_idempotent_and_late_appends_are_written(settings):
    log = PredictionLog(settings, SPEC)
    log.append([rec(1)])
    log.close(); log.close()
    log.append([rec(2)])
    assert read_predictions(settings)["request_id"].to_list() == ["1", "2"]
    assert not log._thread.is_alive()


def test_read_filters_and_skips_temp_files(settings):
    t0 = datetime(2024, 7, 1, 23, 59, tzinfo=timezone.utc)
    with PredictionLog(settings, SPEC, start=False) as log:
        log.append([rec(i, t0 + timedelta(minutes=i)) for i in range(4)])   # 23:59, 00:00, 00:01, 00:02
    assert len(part_files(settings)) == 2                                    # one per UTC date
    (settings.predictions_dir/"date=2024-07-02"/".part-zzz.parquet.tmp").write_bytes(b"half a file")
    (settings.predictions_dir/"date=2024-07-02"/"part-broken.parquet").write_bytes(b"not parquet")
    ids = lambda **kw: read_predictions(settings, **kw)["request_id"].to_list()
    assert ids() == ["0", "1", "2", "3"]
    assert ids(since="2024-07-02T00:01:00Z") == ["2", "3"]
    assert ids(until=date(2024, 7, 2)) == ["0"]
    assert ids(since=datetime(2024, 7, 2), until="2024-07-02T00:02:00") == ["1", "2"]
    assert part_files(settings, since=date(2024, 7, 2)) == sorted((settings.predictions_dir/"date=2024-07-02").glob("part-*.parquet"))


def test_feature_name_clash_is_refused():
    with pytest.raises(ValueError, match="clash"):
        log_schema(FeatureSpec((FeatureDef("prediction", "num"),)))


def test_partial_failure_requeues_only_unwritten_rows_and_bad_records_are_dropped(settings, capsys):
    log = PredictionLog(settings, SPEC, start=False)
    settings.predictions_dir.mkdir(parents=True)
    (settings.predictions_dir/"date=2024-01-02").write_text("in the way")          # the second date cannot be written
    log.append([rec(0, "2024-01-01T10:00:00"), rec(1, "2024-01-02T10:00:00"), rec(2, "2024-01-01T11:00:00"),
                {**rec(3, "2024-01-01T12:00:00"), "prediction": "oops"}])
    assert log.flush() == 2
    assert len(log) == 1 and log.dropped == 1
    assert "dropped 1 malformed" in capsys.readouterr().err
    (settings.predictions_dir/"date=2024-01-02").unlink()
    log.close()
    assert read_predictions(settings)["request_id"].to_list() == ["0", "2", "1"]      # no duplicates
