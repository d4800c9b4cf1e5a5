"""The quality campaign's statistics (benchmarks/_stats.py, quality.statistics): Student-t quantiles
against a printed table and against a float64 brute-force integration of the t density, the paired
interval on a small example computed by hand, the readings of the recipe differences, and the report
and plot from synthetic summaries of 3 seeds."""
import json
import math
import os

import pytest

from benchmarks import _stats, quality

# two-sided 95% and 99% critical values t_{0.975, df}, t_{0.995, df}, as printed in the usual tables
# (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2), 3 decimals
TABLE = {1: (12.706, 63.657), 2: (4.303, 9.925), 3: (3.182, 5.841), 4: (2.776, 4.604), 5: (2.571, 4.032),
         6: (2.447, 3.707), 10: (2.228, 3.169), 20: (2.086, 2.845), 30: (2.042, 2.750)}


def test_t_quantiles_match_the_printed_table():
    for df, (q975, q995) in TABLE.items():
        assert _stats.t_quantile(0.975, df) == pytest.approx(q975, abs=5e-4), df
        assert _stats.t_quantile(0.995, df) == pytest.approx(q995, abs=5e-4), df


def _t_density(x, df):
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
        * (1 + x * x / df) ** (-(df + 1) / 2)


def _integral(f, a, b, n=20000):
    """Composite Simpson's rule in float64 (the t density is smooth: error ~ (b-a) h^4 max|f''''| / 180,
    below 1e-12 here)."""
    h = (b - a) / n
    total = f(a) + f(b) + sum((4 if i % 2 else 2) * f(a + i * h) for i in range(1, n))
    return total * h / 3


def test_t_quantiles_against_a_brute_force_integral_of_the_density():
    for df in (1, 2, 3, 4, 7, 12):
        for p in (0.9, 0.975, 0.995):
            q = _stats.t_quantile(p, df)
            assert 0.5 + _integral(lambda x: _t_density(x, df), 0.0, q) == pytest.approx(p, abs=1e-9), (df, p)
        # the closed-form two-sided probability itself, at a few points
        for t in (0.3, 1.0, 2.5):
            assert _stats.t_two_sided(t, df) == pytest.approx(2 * _integral(lambda x: _t_density(x, df), 0.0, t),
                                                              abs=1e-10)


def test_paired_interval_on_a_hand_computed_example():
    # differences 0.01, 0.03, 0.02 -> mean 0.02, sample sd sqrt((0.01^2 + 0.01^2 + 0) / 2) = 0.01,
    # half-width t_{0.975, 2} * 0.01 / sqrt(3) = 4.302653 * 0.01 / 1.7320508 = 0.0248414
    a = {1: 3.10, 2: 3.13, 3: 3.12, 4: 9.0}          # seed 4 has no partner: not used
    b = {1: 3.09, 2: 3.10, 3: 3.10}
    ci = _stats.paired_ci(a, b)
    assert ci["seeds"] == [1, 2, 3] and ci["n"] == 3
    assert ci["mean"] == pytest.approx(0.02, abs=1e-12) and ci["sd"] == pytest.approx(0.01, rel=1e-9)
    assert ci["half"] == pytest.approx(0.0248414, abs=1e-7)
    assert (ci["lo"], ci["hi"]) == (pytest.approx(-0.0048414, abs=1e-7), pytest.approx(0.0448414, abs=1e-7))
    one = _stats.mean_ci([0.5])
    assert one["mean"] == 0.5 and one["half"] is None and _stats.mean_ci([])["mean"] is None
    with pytest.raises(ValueError, match="positive integer"):
        _stats.t_two_sided(1.0, 0)


def test_readings_of_an_interval():
    ci = lambda lo, hi: {"lo": lo, "hi": hi, "half": (hi - lo) / 2}   # noqa: E731
    assert _stats.verdict(ci(-0.03, -0.01), 0.05) == "below 0"
    assert _stats.verdict(ci(0.001, 0.02), 0.05) == "above 0"
    assert _stats.verdict(ci(-0.007, 0.007), 0.05) == "no difference at this scale"     # width 0.014 < 0.015
    assert _stats.verdict(ci(-0.008, 0.008), 0.05) == "unresolved"                     # width 0.016
    assert _stats.verdict({"half": None}, 0.05).startswith("unresolved")


def _write(out, name, final, steps=10, losses=None, device="NVIDIA H100 80GB HBM3"):
    os.makedirs(os.path.join(out, name), exist_ok=True)
    valid = [[5, final + 0.5], [steps, final]]
    with open(os.path.join(out, name, "summary.json"), "w") as fh:
        json.dump({"losses": losses or [[1, 6.0], [steps, final]], "valid": valid, "device": device}, fh)


# final validation losses of a synthetic campaign: recipe -> (seed 1, seed 2, seed 3)
FINALS = {"bf16": (3.00, 3.02, 3.01), "nvidia": (3.05, 3.08, 3.06), "tetrajet2": (3.04, 3.07, 3.05),
          "quartet2": (3.02, 3.05, 3.03), "quartet2-plus": (3.03, 3.04, 3.02)}


def test_statistics_report_and_plot_of_a_three_seed_campaign(tmp_path):
    out = str(tmp_path)
    for recipe, values in FINALS.items():
        for k, v in enumerate(values, 1):
            _write(out, quality.run_name(recipe, k), v)
    # a NaN run is reported (excluded from the numbers, listed), a diverged one counts
    _write(out, "tetrajet2-full", float("nan"))
    _write(out, "tetrajet2-full-seed2", 3.03, losses=[[1, 2.0], [10, 3.03]])
    names = [quality.run_name(r, k) for k in (1, 2, 3) for r in quality.CAMPAIGN_RECIPES]
    st = quality.statistics({n: quality.load_summary(out, n) for n in names}, steps=10)
    # nvidia's gaps 0.05, 0.06, 0.05: mean 0.053333, sd 0.0057735, half 4.302653 * 0.0057735 / sqrt(3) = 0.0143422
    nv = st["gaps"]["nvidia"]
    assert nv["seeds"] == [1, 2, 3] and nv["mean"] == pytest.approx(0.0533333, abs=1e-6)
    assert nv["half"] == pytest.approx(0.0143422, abs=1e-6)
    # quartet2 - nvidia per seed: -0.03, -0.03, -0.03: sd 0 -> a zero-width interval below 0
    d = st["diffs"][("quartet2", "nvidia")]
    assert d["mean"] == pytest.approx(-0.03, abs=1e-9) and d["hi"] == pytest.approx(-0.03, abs=1e-9)
    assert d["reading"] == "below 0"
    # quartet2 - tetrajet2: -0.02 each -> below 0; tetrajet2 - nvidia: -0.01 each -> below 0: resolved
    assert st["order"] == "resolved at 95%: quartet2 < tetrajet2 < nvidia"
    # quartet2-plus - quartet2: +0.01, -0.01, -0.01: mean -0.003333, sd 0.011547, half 0.0286844: unresolved
    plus = st["diffs"][("quartet2-plus", "quartet2")]
    assert plus["half"] == pytest.approx(0.0286844, abs=1e-6) and plus["reading"] == "unresolved"
    assert st["excluded"] == {"tetrajet2-full": "NaN/Inf"}            # (seed 3 has no run yet: "missing" above)
    assert st["gaps"]["tetrajet2-full"]["seeds"] == [2]               # the diverged seed-2 run counts

    table = quality.report(out, 10, names)
    assert "| nvidia | 1,2,3 | +0.0500, +0.0600, +0.0500 | +0.0533 [+0.0390, +0.0677] |" in table
    assert "| quartet2 - nvidia | 1,2,3 | -0.0300, -0.0300, -0.0300 |" in table
    assert "Published order quartet2 < tetrajet2 < nvidia: resolved at 95%" in table
    assert "tetrajet2-full (NaN/Inf)" in table                         # reported, never dropped
    assert "| tetrajet2-full | NaN/Inf |" in table and "| tetrajet2-full-seed2 (vs bf16-seed2) | diverged |" in table
    assert "| tetrajet2-full-seed3 | missing |" in table
    assert os.path.getsize(os.path.join(out, "gap.png")) > 1000 and open(os.path.join(out, "table.md")).read()


def test_gap_bands_are_the_seed_means_with_t_intervals(tmp_path):
    out = str(tmp_path)
    for recipe, values in FINALS.items():
        for k, v in enumerate(values, 1):
            _write(out, quality.run_name(recipe, k), v)
    bands = quality.gap_bands({n: quality.load_summary(out, n) for n in os.listdir(out)})
    (it5, m5, lo5, hi5, n5), (it10, m10, lo10, hi10, n10) = bands["nvidia"]
    assert (it5, it10, n5, n10) == (5, 10, 3, 3)
    ci = _stats.mean_ci([0.05, 0.06, 0.05])
    assert (m10, lo10, hi10) == (pytest.approx(ci["mean"]), pytest.approx(ci["lo"]), pytest.approx(ci["hi"]))
    assert "bf16" not in bands


def test_order_reading_when_no_difference_or_contradicted():
    def diffs(values):
        return {pair: {"reading": r} for pair, r in zip([("quartet2", "tetrajet2"), ("tetrajet2", "nvidia"),
                                                          ("quartet2", "nvidia")], values)}
    assert quality.order_verdict(diffs(["no difference at this scale"] * 3)).startswith("no difference at this scale")
    assert quality.order_verdict(diffs(["below 0", "above 0", "unresolved"])) == \
        "contradicted at 95%: tetrajet2 - nvidia above 0"
    assert quality.order_verdict(diffs(["below 0", "unresolved", "below 0"])).startswith("not resolved at 95%")
    assert quality.order_verdict({}, {"quartet2"}) == "not testable: no final validation of nvidia, tetrajet2 yet"
