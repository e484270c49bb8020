"""Drift measures on known distributions, through real whylogs profiles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ks_2samp

from mlplatform.monitoring import drift, profiles

LANE = "unit"

N = 200_000
rng = np.random.default_rng(7)


def frame(mean=0.0, weights=(0.4, 0.3, 0.2, 0.1), n=N):
    return pd.DataFrame({"x": rng.normal(mean, 1.0, n), "c": rng.choice(list("abcd"), n, p=list(weights))})


@pytest.fixture(scope="module")
def reference():
    return profiles.profile(frame())


def report(reference, current):
    return drift.compare(reference, profiles.profile(current), ["x"], ["c"], drift.Thresholds())


def test_identical_large_samples_do_not_drift(reference):
    out = report(reference, frame())
    assert not out.drifted.any()
    psi = out.set_index(["feature", "metric"]).value
    assert psi["x", "psi"] < 0.01 and psi["c", "psi"] < 0.01
    assert drift.drifted_share(out) == 0.0


def test_a_real_shift_drifts(reference):
    out = report(reference, frame(mean=1.0, weights=(0.1, 0.2, 0.3, 0.4)))
    assert drift.drifted_features(out) == ["c", "x"] or set(drift.drifted_features(out)) == {"c", "x"}
    assert drift.drifted_share(out) == 1.0


def test_small_shift_on_a_large_sample_is_not_flagged(reference):
    """A p-value would call 0.05 standard deviations on 200,000 rows significant; PSI does not."""
    shifted = frame(mean=0.05)
    assert ks_2samp(rng.normal(0, 1, N), shifted.x).pvalue < 1e-6
    assert not report(reference, shifted).drifted.any()


def test_sketch_ks_statistic_matches_scipy(reference):
    current = frame(mean=0.5)
    ks = report(reference, current).set_index(["feature", "metric"]).value["x", "ks_statistic"]
    assert ks == pytest.approx(ks_2samp(rng.normal(0, 1, N), current.x).statistic, abs=0.02)


def test_psi_is_symmetric_kl_and_js_is_bounded():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    expected = (0.9 - 0.5) * np.log(0.9 / 0.5) + (0.1 - 0.5) * np.log(0.1 / 0.5)
    assert drift.psi(p, q) == pytest.approx(expected)
    assert drift.psi(p, p) == 0.0
    assert 0 < drift.js_distance(p, q) < 1 and drift.js_distance(p, p) == pytest.approx(0.0)


def test_profiles_merge_and_round_trip(tmp_path):
    a, b = frame(n=1000), frame(n=500)
    merged = profiles.merge([profiles.profile(a), profiles.profile(b)])
    path = profiles.save(merged, tmp_path / "p.bin")
    loaded = profiles.load(path)
    assert profiles.row_count(loaded, "x") == 1500
    assert profiles.frequencies(loaded, "c")["a"] == pytest.approx((a.c == "a").sum() + (b.c == "a").sum())
    summary = profiles.summary(loaded).set_index("feature")
    assert summary.loc["x", "rows"] == 1500 and summary.loc["x", "mean"] == pytest.approx(pd.concat([a, b]).x.mean())


def test_judged_features_decide_the_share():
    out = pd.DataFrame({
        "feature": ["a", "b", "w"], "metric": "psi", "value": [0.5, 0.1, 3.0], "threshold": 0.25,
        "drifted": [True, False, True], "judged": [True, True, False],
    })
    assert drift.drifted_features(out) == ["a"] and drift.drifted_share(out) == 0.5


def test_a_feature_that_vanishes_is_drift_not_silence(reference):
    current = frame(n=5000).assign(x=np.nan)
    out = report(reference, current)
    assert "x" in drift.drifted_features(out)
    assert out.set_index(["feature", "metric"]).value["x", "psi"] == float("inf")


def test_fast_profile_counts_what_whylogs_counts():
    """profiles.profile() sorts values with pandas instead of whylogs' per-value Python: its counts,
    nulls, moments, extremes and frequent items are whylogs' own (why.log) on a frame with nulls in
    numbers and text, an all-null column and an integer column."""
    import whylogs as why

    n = 5_000
    data = frame(n=n).assign(
        x=lambda f: f.x.where(rng.random(n) > 0.2),
        c=lambda f: f.c.astype(object).where(rng.random(n) > 0.1, None),
        gone=np.nan,
        k=rng.integers(0, 50, n),
    )
    fast, slow = profiles.profile(data), why.log(data).view()
    ours, theirs = profiles.summary(fast).set_index("feature"), profiles.summary(slow).set_index("feature")
    assert ours.loc["x", "nulls"] == data.x.isna().sum() > 0 and ours.loc["c", "nulls"] == data.c.isna().sum() > 0
    assert ours.loc["gone", "nulls"] == ours.loc["gone", "rows"] == n
    numbers = ["gone", "k", "x"]  # (whylogs gives text a KLL sketch too, with nothing in it)
    for column in ("rows", "nulls", "mean", "stddev", "min", "max"):
        rows = ["c", *numbers] if column in ("rows", "nulls") else numbers
        pd.testing.assert_series_equal(ours.loc[rows, column], theirs.loc[rows, column], rtol=1e-9)
    assert profiles.frequencies(fast, "c") == profiles.frequencies(slow, "c")
    assert profiles.quantiles(fast, "x", [0.5])[0] == pytest.approx(data.x.median(), abs=0.05)


def test_daily_performance_is_the_training_metrics_per_day_and_version():
    """Per day and version: the day's metrics, and the ROC AUC of its trailing window, pooled over
    the flights the same version scored, never reaching into the version's training window."""
    import datetime as dt

    from mlplatform.monitoring.assets import daily_performance
    from mlplatform.training import model as m

    n = 8_000
    days = pd.to_datetime(["2013-03-01", "2013-03-02", "2013-03-03", "2013-03-04"])
    scores = pd.DataFrame({"flight_date": rng.choice(days, n), "model_version": rng.choice(["1", "2"], n),
                           "label": (rng.random(n) < 0.3).astype(int)})
    scores["score"] = np.clip(scores["label"] * 0.3 + rng.random(n) * 0.7, 0, 1)
    train_ends = {"1": dt.date(2013, 2, 28), "2": dt.date(2013, 3, 1)}  # version 2 trained on March 1
    out = daily_performance(scores, dt.date(2013, 3, 2), dt.date(2013, 3, 4), train_ends, trailing_days=2)
    out = out.set_index(["performance_date", "model_version"])
    assert len(out) == 6 and out["rows"].sum() == (scores.flight_date > days[0]).sum()  # March 1 is before start
    for (day, version), group in scores.groupby([scores.flight_date.dt.date, "model_version"]):
        if day == dt.date(2013, 3, 1):
            continue
        expected = m.metrics(group["label"], group["score"])
        assert out.loc[(day, version), "roc_auc"] == pytest.approx(expected["roc_auc"])
        assert out.loc[(day, version), "log_loss"] == pytest.approx(expected["log_loss"])
        first = max(day - dt.timedelta(days=1), train_ends[version] + dt.timedelta(days=1))
        window = scores[(scores.model_version == version) & (scores.flight_date.dt.date >= first)
                        & (scores.flight_date.dt.date <= day)]
        assert out.loc[(day, version), "window_start"] == first
        assert out.loc[(day, version), "window_rows"] == len(window)
        assert out.loc[(day, version), "window_roc_auc"] == pytest.approx(
            m.metrics(window["label"], window["score"])["roc_auc"])
    # version 2's window on March 2 is March 2 alone: March 1 is its training data
    assert out.loc[(dt.date(2013, 3, 2), "2"), "window_rows"] == out.loc[(dt.date(2013, 3, 2), "2"), "rows"]


def test_a_saved_profile_reads_back_from_memory_until_the_file_changes(tmp_path):
    path = tmp_path / "day.bin"
    first = profiles.profile(frame(n=100))
    profiles.save(first, path)
    assert profiles.load(path) is first  # what this process just wrote
    other = profiles.profile(frame(n=300))
    path.write_bytes(other.serialize())  # rewritten by someone else
    again = profiles.load(path)
    assert again is not first and profiles.row_count(again, "x") == 300
    assert profiles.load(path) is again


def test_profiles_of_groups_are_the_profiles_of_each_group():
    """profile_groups() (one pass over the columns, a slice per day) gives each group the profile
    that profile() gives its rows alone, whatever the order of the labels."""
    n = 3_000
    data = frame(n=n).assign(x=lambda f: f.x.where(rng.random(n) > 0.1),
                             c=lambda f: f.c.astype(object).where(rng.random(n) > 0.1, None))
    labels = rng.choice(["2013-01-03", "2013-01-01", "2013-01-02"], n)  # unsorted
    groups = profiles.profile_groups(data, labels)
    assert [label for label, _ in groups] == ["2013-01-01", "2013-01-02", "2013-01-03"]
    for label, view in groups:
        alone = profiles.profile(data[labels == label])
        pd.testing.assert_frame_equal(profiles.summary(view), profiles.summary(alone))
        assert profiles.frequencies(view, "c") == profiles.frequencies(alone, "c")
        assert profiles.row_count(view, "x") == (labels == label).sum()


def test_profile_refuses_what_it_cannot_sketch():
    with pytest.raises(TypeError, match="'flag'"):
        profiles.profile(pd.DataFrame({"flag": [True, False]}))


def test_a_reference_computed_once_compares_as_the_view_does(reference):
    """drift_report compares many days with one drift.Reference (its bins computed once): the
    same report as with the profile view itself, day after day."""
    once = drift.Reference(reference)
    for current in (frame(), frame(mean=0.3, weights=(0.1, 0.2, 0.3, 0.4))):
        view = profiles.profile(current)
        expected = drift.compare(reference, view, ["x"], ["c"], drift.Thresholds())
        pd.testing.assert_frame_equal(drift.compare(once, view, ["x"], ["c"], drift.Thresholds()), expected)


def test_a_day_is_judged_after_the_models_window_with_enough_labelled_flights():
    import datetime as dt

    from mlplatform.monitoring.assets import MIN_LABELLED_FLIGHTS, drift_verdict, not_judged

    day, end = dt.date(2013, 2, 7), dt.date(2013, 1, 30)
    assert not_judged(day, 900, end, MIN_LABELLED_FLIGHTS) == ""
    assert not_judged(end, 900, end, 200) == "inside the model's training window (up to 2013-01-30)"
    assert not_judged(day, 150, end, 200) == "fewer than 200 labelled flights"
    assert not_judged(day, 900, None, 200) == "the model's training window is unknown"

    out = pd.DataFrame({
        "feature": ["a", "b", "c", "w"], "metric": "psi", "value": [0.5, 0.4, 0.1, 3.0], "threshold": 0.25,
        "drifted": [True, True, False, True], "judged": [True, True, True, False],
    })
    assert drift.judged_features(out) == 3
    verdict = drift_verdict(day, out, 900, end, drift.Thresholds(), 200)
    assert verdict["judged"] and verdict["drift_detected"] and verdict["note"] == ""
    assert (verdict["judged_features"], verdict["drifted_features"]) == (3, 2)
    assert verdict["drifted_share"] == pytest.approx(2 / 3) and verdict["threshold"] == 0.3
    # the same report on a day of the training window, or with few labels: reported, not judged
    for inside in (drift_verdict(end, out, 900, end, drift.Thresholds(), 200),
                   drift_verdict(day, out, 20, end, drift.Thresholds(), 200)):
        assert not inside["judged"] and not inside["drift_detected"] and inside["note"]
        assert inside["drifted_share"] == pytest.approx(2 / 3)
