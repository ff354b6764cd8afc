"""Run NannyML's CBPE on given chunks; print one JSON object. Runs in the `.refs/nannyml` venv
(`make .refs/nannyml/.installed`), not in mlnb's: `.refs/nannyml/bin/python tests/nannyml_cbpe.py IN.npz`.

IN.npz: reference_scores, reference_labels, analysis_scores, analysis_chunk (chunk number of each analysis row,
non-decreasing), threshold, reference_chunks (how many consecutive reference chunks). Chunks are handed to NannyML
as calendar months of a synthetic timestamp (`chunk_period="M"`), so chunks of any sizes are compared one to one.
Output: {"needs_calibration": bool, "seconds": fit + estimate, "chunks": [{metric: {"value", "sampling_error",
"lower", "upper"}}]}."""
import json, os, sys, time, warnings
os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
warnings.filterwarnings("ignore")
import numpy as np, pandas as pd
import nannyml as nml

METRICS = ["roc_auc", "accuracy", "precision", "recall", "f1"]

def _months(chunk: np.ndarray, start: str) -> pd.Series:
    base = pd.Timestamp(start)
    return pd.Series([base + pd.DateOffset(months=int(c)) for c in chunk])

def main(path: str) -> None:
    d = np.load(path)
    thr = float(d["threshold"])
    n_ref, k = len(d["reference_scores"]), int(d["reference_chunks"])
    ref_chunk = np.repeat(np.arange(k), np.diff(np.linspace(0, n_ref, k + 1).astype(int)))
    ref = pd.DataFrame({"s": d["reference_scores"], "y": d["reference_labels"].astype(int)})
    ana = pd.DataFrame({"s": d["analysis_scores"]})
    ref["t"], ana["t"] = _months(ref_chunk, "1990-01-01"), _months(d["analysis_chunk"], "2000-01-01")
    for df in (ref, ana): df["yp"] = (df["s"] >= thr).astype(int)
    est = nml.CBPE(y_pred_proba="s", y_pred="yp", y_true="y", problem_type="classification_binary",
                   metrics=METRICS, timestamp_column_name="t", chunk_period="M")
    t = time.perf_counter()
    est.fit(ref)
    res = est.estimate(ana).filter(period="analysis").to_df()
    seconds = time.perf_counter() - t
    chunks = [{m: {"value": float(row[(m, "value")]), "sampling_error": float(row[(m, "sampling_error")]),
                   "lower": float(row[(m, "lower_confidence_boundary")]), "upper": float(row[(m, "upper_confidence_boundary")])}
               for m in METRICS} for _, row in res.iterrows()]
    print(json.dumps({"needs_calibration": bool(est.needs_calibration), "seconds": seconds, "chunks": chunks,
                      "nannyml": nml.__version__}))

if __name__ == "__main__": main(sys.argv[1])
