"""Explainability: global importance, dependence, one request explained (waterfall), champion vs challenger, explanation drift."""
import plotly.graph_objects as go
import streamlit as st
import lib

name = lib.model()
st.title("Explainability")
versions = lib.load("versions_frame", name)
lib.empty(versions, stop=True)
refs = [f"v{v}" + (f" ({a})" if a else "") for v, a in versions.select("version", "aliases").iter_rows()]
champ = next((i for i, a in enumerate(versions["aliases"]) if "champion" in (a or "")), 0)
ref = versions["version"][st.selectbox("Version", range(len(refs)), index=champ, format_func=lambda i: refs[i])]

st.subheader("Global importance")
st.caption("Mean |SHAP| (exact TreeSHAP, XGBoost `pred_contribs`) over the version's reference sample, in the "
           "model's margin (log-odds for a classifier, the target's units for a regressor).")
imp = lib.load("version_importance", name, ref).sort("mean_abs_shap")
fig = go.Figure(go.Bar(x=imp["mean_abs_shap"].to_list(), y=imp["feature"].to_list(), orientation="h"))
fig.update_layout(height=max(300, 22 * imp.height + 60), margin=dict(l=10, r=10, t=10, b=10), xaxis_title="mean |SHAP|")
st.plotly_chart(fig, width="stretch")

st.subheader("Dependence of the top features")
dep = lib.load("dependence_frames", name, ref, max_rows=500)
for col, (feat, df) in zip(st.columns(len(dep)), dep.items()):
    f = go.Figure(go.Scattergl(x=df["value"].to_list(), y=df["shap"].to_list(), mode="markers", opacity=0.4))
    f.update_layout(height=280, title=feat, xaxis_title=feat, yaxis_title="SHAP", margin=dict(l=10, r=10, t=40, b=10))
    col.plotly_chart(f, width="stretch")

st.subheader("Why this prediction?")
rid = st.text_input("Request id", value=st.query_params.get("request_id", ""),
                    placeholder="the request_id of a /predict answer (or ?request_id=... in the page's address)")
if rid:
    ex = lib.load("explain_request", name, rid)
    if not lib.empty(ex):
        w = ex["waterfall"]
        measure = ["absolute"] + ["relative"] * (w.height - 2) + ["total"]
        fig = go.Figure(go.Waterfall(orientation="h", measure=measure, y=w["step"].to_list(), x=w["delta"].to_list()))
        fig.update_layout(height=max(300, 28 * w.height + 60), margin=dict(l=10, r=10, t=10, b=10),
                          yaxis=dict(autorange="reversed"), xaxis_title="margin (log-odds)")
        st.markdown(f"Request `{ex['request_id']}` served by **v{ex['model_version']}** (arm {ex['arm']}) at {ex['ts']}: "
                    f"prediction **{ex['prediction']:.4f}** (logged {lib.fmt_metric(ex['logged_prediction'])})")
        if not ex["matches_log"]: st.warning("The recomputed prediction differs from the logged one.")
        st.plotly_chart(fig, width="stretch")

st.subheader("Champion vs challenger")
others = [v for v in versions["version"].to_list()]
has_chall = any("challenger" in (a or "") for a in versions["aliases"])
b_default = "challenger" if has_chall else ("previous" if any("previous" in (a or "") for a in versions["aliases"]) else None)
c1, c2 = st.columns(2)
a = c1.selectbox("Left", ["champion"] + others, key="sbs_a")
b = c2.selectbox("Right", ([b_default] if b_default else []) + others, index=0 if b_default else min(1, len(others) - 1),
                 key="sbs_b")
sbs = lib.load("importance_side_by_side", name, a, b)
if not lib.empty(sbs):
    va, vb = sbs.columns[1], sbs.columns[3]
    fig = go.Figure([go.Bar(x=sbs[v].to_list(), y=sbs["feature"].to_list(), name=v, orientation="h") for v in (va, vb)])
    fig.update_layout(barmode="group", height=max(300, 30 * sbs.height + 60), yaxis=dict(autorange="reversed"),
                      xaxis_title="mean |SHAP|", margin=dict(l=10, r=10, t=10, b=10))
    st.plotly_chart(fig, width="stretch")

st.subheader("Explanation drift over time")
tl = lib.load("timeline_frame", name)
if not lib.empty(tl):
    ed = lib.db.explanation_drift(tl)
    if ed.height:
        fig = go.Figure([go.Scatter(x=part["start"].to_list(), y=part["value"].to_list(), mode="lines", name=c[0])
                         for c, part in ed.group_by("column", maintain_order=True)])
        fig.update_layout(height=350, yaxis_title="mean |SHAP| on live traffic", margin=dict(l=10, r=10, t=10, b=10))
        st.plotly_chart(fig, width="stretch")
    else: st.info("The timeline has no explanation values (the monitor runs without the model's booster).")
