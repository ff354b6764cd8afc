"""The latest drift report: overall status, PSI per feature, the full table."""
import plotly.express as px
import streamlit as st
from mlnb.monitor import load_latest_report
import lib

s = lib.settings()
st.title("Drift")

report = load_latest_report(s)
if report is None:
    st.info(f"No drift report in `{s.home}` yet. Run `mlnb drift` to compare recent predictions with the "
            "champion's training data.")
    st.stop()

summ = report.summary
c1, c2, c3, c4 = st.columns(4)
c1.metric("Overall status", summ["status"].upper())
c2.metric("Features drifting", f"{summ['n_drifting']} / {summ['n_features']}")
c3.metric("Prediction drift", (summ["prediction_status"] or "n/a").upper())
c4.metric("Rows (reference / current)", f"{report.n_reference:,} / {report.n_current:,}")
ctx = dict(report.context)
st.caption(f"Report of {report.created_at}" + "".join(f" · {k}: {v}" for k, v in ctx.items() if v not in (None, "")))

st.subheader("PSI per feature")
st.caption(f"Population Stability Index: warn above {report.psi_warn}, drift above {report.psi_alert} "
           f"(or above {report.psi_warn} when the KS / chi-square p-value is below {report.pvalue}). "
           "PSI leads: on large samples any difference is 'significant', so p-values alone would always alarm.")
df = report.to_frame()
fig = px.bar(df.sort("psi").to_pandas(), x="psi", y="feature", color="status", orientation="h",
             color_discrete_map=lib.STATUS_COLORS, category_orders={"status": ["ok", "warn", "drift"]},
             hover_data=["kind", "test", "p_value", "ref_null_rate", "cur_null_rate"],
             labels={"psi": "PSI", "feature": ""},
             height=max(300, 24 * df.height + 80))
for x, dash in ((report.psi_warn, "dot"), (report.psi_alert, "dash")):
    fig.add_vline(x=x, line_dash=dash, line_color="grey")
fig.update_layout(margin=dict(l=10, r=10, t=10, b=10), legend_title_text="status")
st.plotly_chart(fig, width="stretch")

st.subheader("All columns")
st.dataframe(df, hide_index=True, width="stretch")
