"""Drift and data quality over time: per-feature timelines with threshold bands, feature x chunk heatmap, data-quality
panels, the latest report's table."""
import plotly.express as px
import plotly.graph_objects as go
import polars as pl
import streamlit as st
import lib

name = lib.model()
st.title("Drift and data quality")
tl = lib.load("timeline_frame", name)
if not lib.empty(tl):
    summ = lib.db.drift_summary(tl)
    c1, c2, c3 = st.columns(3)
    c1.metric("Chunks", tl["chunk"].n_unique())
    c2.metric("Features drifting now", f"{summ.filter(pl.col('latest_status') == 'alert').height} / {summ.height}")
    c3.metric("Last chunk", str(tl["start"].max())[:16])

    st.subheader("Drift per feature over time")
    feats = summ["feature"].to_list()
    pick = st.multiselect("Features", feats, default=feats[:3])
    ser = lib.db.metric_series(tl, "drift", "drift", pick)
    ser = pl.concat([ser, lib.db.metric_series(tl, "prediction", "drift", [p for p in pick if p == "prediction"])])
    fig = go.Figure()
    for col, part in ser.group_by("column", maintain_order=True):
        fig.add_trace(go.Scatter(x=part["start"].to_list(), y=part["value"].to_list(), mode="lines+markers", name=col[0]))
    if ser.height and ser["upper"].drop_nulls().len():
        th = float(ser["upper"].drop_nulls()[-1])
        fig.add_hrect(y0=th, y1=max(th * 2, float(ser["value"].max() or th)), fillcolor="#c62828", opacity=0.08, line_width=0)
        fig.add_hline(y=th, line_dash="dash", line_color="#c62828", annotation_text="alert threshold")
    fig.update_layout(height=350, yaxis_title="PSI", margin=dict(l=10, r=10, t=10, b=10))
    st.plotly_chart(fig, width="stretch")

    st.subheader("Feature x chunk heatmap (PSI)")
    hm = lib.db.drift_heatmap(tl)
    fig = go.Figure(go.Heatmap(z=hm.drop("feature").to_numpy(), x=hm.columns[1:], y=hm["feature"].to_list(),
                               colorscale="Reds", zmin=0, colorbar_title="PSI"))
    fig.update_layout(height=max(300, 22 * hm.height + 80), margin=dict(l=10, r=10, t=10, b=10))
    st.plotly_chart(fig, width="stretch")
    st.dataframe(lib.status_style(summ, "latest_status"), hide_index=True, width="stretch")

    st.subheader("Data quality")
    q = lib.db.quality_table(tl)
    metrics = q["metric"].unique().sort().to_list()
    for col, m in zip(st.columns(max(1, len(metrics))), metrics):
        with col:
            part = q.filter(pl.col("metric") == m)
            st.markdown(f"**{m.replace('_', ' ')}**: {part.filter(pl.col('chunks_flagged') > 0).height} features flagged")
            st.dataframe(lib.status_style(part.drop("metric")), hide_index=True, width="stretch")

st.subheader("Latest drift report")
rep = lib.load("latest_drift_report", name)
if not lib.empty(rep):
    summ = rep["summary"]
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Overall status", summ["status"].upper())
    c2.metric("Features drifting", f"{summ['n_drifting']} / {summ['n_features']}")
    c3.metric("Prediction drift", (summ["prediction_status"] or "n/a").upper())
    c4.metric("Rows (reference / current)", f"{rep['n_reference']:,} / {rep['n_current']:,}")
    st.caption(f"Report of {rep['created_at']}" + "".join(f" · {k}: {v}" for k, v in rep["context"].items() if v not in (None, "")))
    df = rep["table"]
    fig = px.bar(df.sort("psi").to_pandas(), x="psi", y="feature", color="status", orientation="h",
                 color_discrete_map=lib.STATUS_COLORS, category_orders={"status": ["ok", "warn", "drift"]},
                 labels={"psi": "PSI", "feature": ""}, height=max(300, 22 * df.height + 80))
    for x, dash in ((rep["psi_warn"], "dot"), (rep["psi_alert"], "dash")): fig.add_vline(x=x, line_dash=dash, line_color="grey")
    fig.update_layout(margin=dict(l=10, r=10, t=10, b=10))
    st.plotly_chart(fig, width="stretch")
    st.dataframe(df, hide_index=True, width="stretch")
