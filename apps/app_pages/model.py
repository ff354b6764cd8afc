"""The champion model: identity, metrics, global SHAP importance, feature contract."""
import plotly.express as px
import streamlit as st
import lib

s = lib.settings()
st.title("Champion model")

version = lib.champion_version(s, str(s.home), s.mlflow_tracking_uri, s.model_name)
if version is None:
    st.info(f"No champion model for **{s.model_name}** in `{s.home}` yet. Run `make demo` (or `mlnb run train`) "
            "to train and register one; it becomes the champion automatically.")
    st.stop()

try:
    bundle = lib.load_bundle(s, str(s.home), s.model_name, version)
except Exception as e:                   # e.g. IntegrityError: show it plainly, the model is not served either
    st.error(f"Champion **{s.model_name}** version {version} could not be loaded: {e}")
    st.stop()

st.markdown(f"**{bundle.name}** version **{bundle.version}** · MLflow run `{bundle.run_id or 'n/a'}`")

st.subheader("Metrics")
metrics = lib.run_metrics(s.mlflow_tracking_uri, bundle.run_id) if bundle.run_id else {}
if metrics:
    names = sorted(metrics)
    for i in range(0, len(names), 4):
        for col, k in zip(st.columns(4), names[i:i + 4]):
            col.metric(k, lib.fmt_metric(metrics[k]))
else:
    st.caption("No metrics were logged with this model's run.")

st.subheader("Global feature importance")
st.caption("Mean absolute SHAP value (XGBoost TreeSHAP) over the reference sample saved with the model, "
           + ("in log-odds" if bundle.spec.task == "binary" else f"in the units of {bundle.spec.target}")
           + ": how much each feature moves a prediction on average.")
imp = lib.shap_importance(bundle, str(s.home), bundle.name, bundle.version)
fig = px.bar(imp.sort("mean_abs_shap").to_pandas(), x="mean_abs_shap", y="feature", orientation="h",
             labels={"mean_abs_shap": "mean |SHAP|", "feature": ""}, height=max(300, 24 * imp.height + 80))
fig.update_layout(margin=dict(l=10, r=10, t=10, b=10))
st.plotly_chart(fig, width="stretch")

st.subheader("Feature contract")
st.caption("Every request, batch and training set is checked against this contract.")
st.dataframe(lib.spec_table(bundle.spec), hide_index=True, width="stretch")
