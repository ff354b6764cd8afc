"""Performance: realized performance as labels arrive and the label-free estimate (CBPE/DLE) on one chart with their
bands, and the labeled fraction per chunk."""
import plotly.graph_objects as go
import polars as pl
import streamlit as st
from plotly.subplots import make_subplots
import lib

name = lib.model()
st.title("Performance")
tl = lib.load("timeline_frame", name)
lib.empty(tl, stop=True)
metrics = lib.db.performance_metrics(tl)
if not metrics:
    st.info("The timeline has no performance rows yet: labels arrive with `mlnb feedback import FILE` (or `/feedback`), "
            "and the estimate needs a reference sample with its target. Then run `mlnb monitor`.")
    st.stop()
metric = st.selectbox("Metric", metrics)
ps = lib.db.performance_series(tl, metric)
fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.72, 0.28], vertical_spacing=0.06,
                    subplot_titles=(f"{metric}: realized and estimated", "labeled fraction"))
colors = {"realized": "#1f77b4", "estimated": "#ff7f0e"}
for kind, part in ps.group_by("kind", maintain_order=True):
    kind = kind[0]; c = colors.get(kind, "#555")
    x = part["start"].to_list()
    if kind == "estimated" and part["upper"].drop_nulls().len():      # the estimate's expected range
        fig.add_trace(go.Scatter(x=x + x[::-1], y=part["upper"].to_list() + part["lower"].to_list()[::-1], fill="toself",
                                 line=dict(width=0), fillcolor=c, opacity=0.12, name=f"{kind} band", hoverinfo="skip"), 1, 1)
    fig.add_trace(go.Scatter(x=x, y=part["value"].to_list(), mode="lines+markers", name=kind, line=dict(color=c),
                             text=part["reason"].to_list()), 1, 1)
lab = ps.select("start", "labeled_fraction").unique("start").sort("start")
fig.add_trace(go.Bar(x=lab["start"].to_list(), y=lab["labeled_fraction"].to_list(), name="labeled fraction",
                     marker_color="#7f7f7f"), 2, 1)
fig.update_layout(height=520, margin=dict(l=10, r=10, t=30, b=10))
st.plotly_chart(fig, width="stretch")
st.caption("Band: the range the estimate is expected to stay in, learned on the reference chunks (outside it, the "
           "monitor raises an alert). A realized value is n/a while too few labels have arrived; the table says why.")
na = ps.filter(pl.col("value").is_null())
if na.height:
    st.dataframe(na.select("start", "kind", "reason"), hide_index=True, width="stretch")
