"""A/B comparison: arms, traffic split and SRM, the primary metric's always-valid interval over time, guardrails,
per-arm model quality, the decision and its reason; past experiments."""
import plotly.graph_objects as go
import polars as pl
import streamlit as st
import lib

name = lib.model()
st.title("A/B comparison")
exps = lib.load("experiments_frame", name)
lib.empty(exps, stop=True)
ids = exps["id"].to_list()
running = exps.filter(pl.col("status") == "running")["id"].to_list()
exp_id = st.selectbox("Experiment", ids, index=ids.index(running[0]) if running else 0)
d = lib.load("experiment_detail", exp_id)
if not lib.empty(d):
    dec = d["decision"]
    c1, c2, c3 = st.columns(3)
    c1.metric("Status", d["status"])
    c2.metric("Decision", (dec.get("decision") or "n/a").upper(), dec.get("winner") or None)
    srm = d["health"]["srm"]
    c3.metric("Sample ratio", srm.get("status", "n/a").upper())
    st.markdown(f"**Reason:** {dec.get('reason', '')}")
    st.caption(f"Split: {srm.get('reason', '')}")
    for issue in d["health"].get("issues", []): st.warning(issue)

    t = d["tables"]
    st.subheader("Arms and traffic split")
    st.dataframe(t["arms"], hide_index=True, width="stretch")
    st.caption("Planned weights: " + ", ".join(f"{a} {w:g}%" for a, w in d["weights"].items()))

    st.subheader("Primary metric: always-valid interval over time")
    hist = lib.load("sequential_history", exp_id)
    if not lib.empty(hist):
        fig = go.Figure()
        for arm, part in hist.group_by("arm", maintain_order=True):
            x = part["at"].to_list()
            fig.add_trace(go.Scatter(x=x + x[::-1], y=part["seq_high"].to_list() + part["seq_low"].to_list()[::-1],
                                     fill="toself", opacity=0.15, line=dict(width=0), name=f"{arm[0]} always-valid"))
            fig.add_trace(go.Scatter(x=x, y=part["diff"].to_list(), mode="lines+markers", name=f"{arm[0]} difference"))
        fig.add_hline(y=0, line_dash="dot")
        fig.update_layout(height=330, yaxis_title=f"{hist['metric'][0]}: treatment - control",
                          margin=dict(l=10, r=10, t=10, b=10))
        st.plotly_chart(fig, width="stretch")
    st.dataframe(t["metrics"], hide_index=True, width="stretch")

    left, right = st.columns(2)
    with left:
        st.subheader("Guardrails")
        if t["guardrails"].height: st.dataframe(lib.status_style(t["guardrails"]), hide_index=True, width="stretch")
        else: st.caption("No guardrail results yet.")
    with right:
        st.subheader("Model quality per arm")
        st.dataframe(t["quality"], hide_index=True, width="stretch")
    if d["status"] == "running":
        lib.admin_form("stop_experiment", name, f"Stop experiment {exp_id} (roll back to the control)", experiment=exp_id)

st.subheader("Past experiments")
st.dataframe(exps, hide_index=True, width="stretch")
