"""Overview: what serves now (aliases, routing), open alerts, the retrain loop, traffic, latency and errors, last runs."""
import json

import plotly.graph_objects as go
import polars as pl
import streamlit as st
from plotly.subplots import make_subplots
import lib

name = lib.model()
st.title("Overview")
st.caption(f"Model **{name}**")
ov = lib.load("overview", name)

al, routing, alerts, loop = ov["aliases"], ov["routing"], ov["alerts"], ov["loop"]
c1, c2, c3, c4, c5 = st.columns(5)
versions = {} if lib.db.is_empty(al) else dict(al.select("alias", "version").iter_rows())
c1.metric("Champion", f"v{versions['champion']}" if "champion" in versions else "none")
c2.metric("Challenger", f"v{versions['challenger']}" if "challenger" in versions else "none")
c3.metric("Routing", "single" if lib.db.is_empty(routing) else routing["config"].get("strategy", "?"))
c4.metric("Open alerts", "n/a" if lib.db.is_empty(alerts) else str(alerts.filter(pl.col("status") == "firing").height))
c5.metric("Retrain loop", "n/a" if lib.db.is_empty(loop) else loop["state"] + (" (paused)" if loop["paused"] else ""))

left, right = st.columns(2)
with left:
    st.subheader("Serving model per alias")
    if not lib.empty(al): st.dataframe(al, hide_index=True, width="stretch")
    st.subheader("Traffic routing")
    if not lib.empty(routing):
        st.code(json.dumps(routing["config"]), language="json", wrap_lines=True)
        st.caption(f"generation {routing['generation']} · set by {routing['actor'] or 'n/a'} · {routing['updated_at'] or ''}")
with right:
    st.subheader("Alerts")
    if not lib.empty(alerts):
        if alerts.height: st.dataframe(lib.status_style(alerts), hide_index=True, width="stretch")
        else: st.success("No alert has fired.")
    st.subheader("Retrain loop")
    if not lib.empty(loop):
        st.markdown(f"Loop `{loop['id']}`: **{loop['state']}**" + (" · paused" if loop["paused"] else ""))
        st.dataframe(loop["transitions"], hide_index=True, width="stretch")
        if loop["active"]:
            if loop["paused"]: lib.admin_form("resume_loop", name, "Resume the retrain loop")
            else: lib.admin_form("pause_loop", name, "Pause the retrain loop")

st.subheader("Requests, latency and errors")
svc = ov["service"]
if not lib.empty(svc):
    fig = make_subplots(rows=1, cols=3, subplot_titles=("requests per chunk", "latency (ms)", "error rate"))
    x = svc["start"].to_list()
    fig.add_trace(go.Bar(x=x, y=svc["requests"].to_list(), name="requests"), 1, 1)
    fig.add_trace(go.Scatter(x=x, y=svc["p50_ms"].to_list(), name="p50", mode="lines"), 1, 2)
    fig.add_trace(go.Scatter(x=x, y=svc["p99_ms"].to_list(), name="p99", mode="lines"), 1, 2)
    fig.add_trace(go.Scatter(x=x, y=svc["error_rate"].to_list(), name="error rate", mode="lines"), 1, 3)
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=30, b=10), showlegend=False)
    st.plotly_chart(fig, width="stretch")
    if svc["error_rate"].is_null().all():
        st.caption("Error rate n/a: the prediction log records successful predictions only (no status or error column).")

st.subheader("Last pipeline runs")
runs = ov["runs"]
if not lib.empty(runs):
    st.dataframe(lib.status_style(runs.select("pipeline", "run_id", "status", "started", "seconds", "error")),
                 hide_index=True, width="stretch")
