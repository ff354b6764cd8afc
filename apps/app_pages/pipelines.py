"""Pipelines and audit: the run index (status, parameters, failed cell, executed notebook, MLflow run) and the audit
trail with filters, failures highlighted."""
from datetime import date, timedelta
from pathlib import Path

import polars as pl
import streamlit as st
import lib

name = lib.model()
st.title("Pipelines and audit")
st.subheader("Pipeline runs")
runs = lib.load("run_index")
if not lib.empty(runs):
    pipes = sorted(runs["pipeline"].unique().to_list())
    pick = st.multiselect("Pipelines", pipes, default=pipes)
    view = runs.filter(pl.col("pipeline").is_in(pick))
    c1, c2, c3 = st.columns(3)
    c1.metric("Runs", view.height)
    c2.metric("Failed", view.filter(pl.col("status") == "failure").height)
    c3.metric("Last run", str(view["started"].max())[:16] if view.height else "n/a")
    failed = view.filter(pl.col("status") == "failure")
    if failed.height:
        st.markdown(f":red[**{failed.height} failed runs**]")
        st.dataframe(lib.status_style(failed.head(50).select("pipeline", "run_id", "status", "started", "failed_cell", "error")),
                     hide_index=True, width="stretch")
    st.dataframe(view.select("pipeline", "run_id", "status", "started", "seconds", "job", "params", "failed_cell",
                             "mlflow_run_id"), hide_index=True, width="stretch")
    if view.height:
        k = st.selectbox("Run", range(view.height), format_func=lambda j: f"{view['pipeline'][j]} {view['run_id'][j]} ({view['status'][j]})")
        r = view.row(k, named=True)
        if r["failed_cell"]: st.error(f"Failed cell: {r['failed_cell']}")
        elif r["error"]: st.error(r["error"])
        st.markdown(f"Parameters: `{r['params']}` · MLflow run: `{r['mlflow_run_id'] or 'n/a'}` "
                    f"(`mlflow ui --backend-store-uri {lib.settings().mlflow_tracking_uri}`)")
        html = Path(r["html"]) if r["html"] else None
        if html is not None and html.exists():
            st.download_button("Executed notebook (HTML)", html.read_bytes(), file_name=f"{r['pipeline']}-{r['run_id']}.html",
                               mime="text/html")
        st.caption(f"Notebook: `{r['notebook']}`")

st.subheader("Audit trail")
all_ops = lib.load("audit_frame", limit=None)
ops = sorted(all_ops["operation"].drop_nulls().unique().to_list())
models = sorted(all_ops["model_name"].drop_nulls().unique().to_list())
c1, c2, c3, c4 = st.columns(4)
f_ops = c1.multiselect("Operation", ops)
f_out = c2.multiselect("Outcome", ["success", "failure"])
f_model = c3.selectbox("Model (plus project-wide records)", ["all"] + models, index=(models.index(name) + 1) if name in models else 0)
today = date.today()
f_days = c4.date_input("Between", (today - timedelta(days=30), today))
lo, hi = (f_days[0], f_days[1] + timedelta(days=1)) if isinstance(f_days, tuple) and len(f_days) == 2 else (None, None)
trail = lib.load("audit_frame", operations=tuple(f_ops) or None, outcomes=tuple(f_out) or None,
                 model=None if f_model == "all" else f_model, since=lo, until=hi, limit=2000)
if trail.height == 0:
    st.info("No audit record matches. Every mlnb command that changes something writes one (e.g. `mlnb run train`).")
else:
    cols = ["timestamp", "operation", "outcome", "user", "model_name", "model_version", "correlation_id",
            "duration_seconds", "error", "change_ticket", "command"]
    bad = trail.filter("failed")
    st.caption(f"{trail.height} records, {bad.height} failures, newest first")
    if bad.height:
        st.markdown(f":red[**{bad.height} failed operations**]")
        st.dataframe(lib.status_style(bad.head(200).select(cols), "outcome"), hide_index=True, width="stretch")
    st.dataframe(trail.select(cols), hide_index=True, width="stretch",
                 column_config={"outcome": st.column_config.TextColumn("outcome", help="failure rows are listed above in red")})
