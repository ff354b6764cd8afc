"""Small synthetic tables for the own-data tests (issue 14), generated deterministically: `python tests/data/make_tables.py`.

Each table is one kind of input a user brings; the committed CSVs are this script's output (seed 14)."""
from pathlib import Path
import numpy as np, polars as pl

HERE = Path(__file__).parent

def churn(n: int = 600, seed: int = 14) -> pl.DataFrame:
    "A yes/no target without a timestamp: numeric, categorical and boolean-free features."
    rng = np.random.default_rng(seed)
    tenure = rng.uniform(0, 60, n).round(1)
    monthly = rng.uniform(10, 120, n).round(2)
    plan = rng.choice(["basic", "plus", "pro"], n)
    logit = -0.08 * tenure + 0.03 * monthly + np.where(plan == "basic", 1.0, -0.5) + rng.normal(0, 0.5, n)
    return pl.DataFrame({"tenure": tenure, "monthly": monthly, "plan": plan,
                         "churn": np.where(logit > np.median(logit), "yes", "no")})

def shop_sales(n: int = 500, seed: int = 15) -> pl.DataFrame:
    "A regression target in another table of the same project."
    rng = np.random.default_rng(seed)
    x, shop = rng.normal(size=n).round(3), rng.choice(["north", "south"], n)
    return pl.DataFrame({"x": x, "shop": shop, "amount": (2 * x + (shop == "north") + rng.normal(0, 0.1, n)).round(3)})

def messy(n: int = 600, seed: int = 17) -> str:
    "CSV text of a table as users have it: NA/N/A/empty markers in a numeric column, a boolean, a date column."
    df = churn(n, seed)
    rng = np.random.default_rng(seed)
    active = rng.random(n) < 0.5
    signup = [f"2020-{1 + i % 12:02d}-{1 + i % 28:02d}" for i in range(n)]
    markers = ["NA", "N/A", ""]
    tenure = [markers[i % 3] if i % 10 == 0 else str(v) for i, v in enumerate(df["tenure"].to_list())]
    lines = ["tenure,monthly,plan,active,signup,churn"]
    lines += [",".join([t, str(m), p, str(a).lower(), d, c]) for t, m, p, a, d, c in
              zip(tenure, df["monthly"], df["plan"], active, signup, df["churn"])]
    return "\n".join(lines) + "\n"

def monthly_text(n: int = 400, seed: int = 18) -> pl.DataFrame:
    "A regression whose time column is text such as Mar-2018."
    rng = np.random.default_rng(seed)
    months = [f"{m}-{2010 + i // 12 % 30}" for i, m in enumerate(["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug",
                                                                  "Sep", "Oct", "Nov", "Dec"] * (n // 12 + 1))][:n]
    x = rng.normal(size=n).round(3)
    return pl.DataFrame({"month": months, "x": x, "y": (3 * x + rng.normal(0, 0.1, n)).round(3)})

def tables() -> dict[str, pl.DataFrame]:
    base = churn()
    n = base.height
    null_every = np.arange(n) % 25 == 0                     # 4% of the targets missing
    late = np.arange(n) >= int(n * 0.8)                      # the last 20% of rows: one class only
    return {
        "churn_yesno": base,
        "churn_bool": base.with_columns(churned=pl.col("churn") == "yes").drop("churn"),
        "churn_nulltarget": base.with_columns(churn=pl.when(pl.Series(null_every)).then(None).otherwise(pl.col("churn"))),
        "churn_mostlynull": base.with_columns(churn=pl.when(pl.Series(np.arange(n) % 2 == 0)).then(None).otherwise(pl.col("churn"))),
        "churn_oneclass": base.with_columns(churn=pl.lit("no")),
        "churn_extra": base.with_columns(region=pl.Series(np.random.default_rng(16).choice(["e", "w"], n))),
        "shop_sales": shop_sales(),
        "monthly_text": monthly_text(),
        "badnames": base.rename({"tenure": "tenure[months]", "monthly": "entity"}),
        "with_inf": base.with_columns(monthly=pl.when(pl.Series(np.arange(n) % 50 == 0)).then(float("inf")).otherwise(pl.col("monthly"))),
        "churn_leaky": base.with_columns(cancel_code=pl.when(pl.col("churn") == "yes").then(pl.lit("C1")).otherwise(pl.lit("none"))),
        "churn_lateoneclass": base.with_columns(churn=pl.when(pl.Series(late)).then(pl.lit("no")).otherwise(pl.col("churn"))),
    }

if __name__ == "__main__":
    for name, df in tables().items(): df.write_csv(HERE/f"{name}.csv")
    (HERE/"messy.csv").write_text(messy())
