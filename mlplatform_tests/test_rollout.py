"""Staged rollout (issue 17): the statistics a canary is judged by."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from mlplatform.rollout.compare import delong, placements

LANE = "unit"
D = dt.date


def by_definition(labels, a, b):
    """DeLong's variance of AUC(B) - AUC(A) straight from the 1988 paper: O(m n) placement values."""
    labels = np.asarray(labels)

    def components(s):
        pos, neg = s[labels == 1], s[labels == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)

    auc_a, v10_a, v01_a = components(np.asarray(a))
    auc_b, v10_b, v01_b = components(np.asarray(b))
    m, n = len(v10_a), len(v01_a)
    s10, s01 = np.cov([v10_a, v10_b]), np.cov([v01_a, v01_b])
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    return auc_a, auc_b, np.sqrt(var)


def scored(n, strength_a, strength_b, seed, correlated=True):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    shared = rng.normal(size=n)
    a = strength_a * labels + shared + (0 if correlated else rng.normal(size=n))
    b = strength_b * labels + (shared if correlated else rng.normal(size=n)) + 0.5 * rng.normal(size=n)
    return labels.astype(int), np.round(a, 1), np.round(b, 1)  # rounded: ties, as scores have


def test_aucs_and_standard_error_are_those_of_the_definition():
    from sklearn.metrics import roc_auc_score

    labels, a, b = scored(600, 0.8, 1.2, seed=1)
    result = delong(labels, a, b)
    auc_a, auc_b, se = by_definition(labels, a, b)
    assert result.auc_a == pytest.approx(roc_auc_score(labels, a), abs=1e-12) == pytest.approx(auc_a, abs=1e-12)
    assert result.auc_b == pytest.approx(roc_auc_score(labels, b), abs=1e-12) == pytest.approx(auc_b, abs=1e-12)
    assert result.std_error == pytest.approx(se, rel=1e-9)
    assert (result.positives, result.negatives) == (labels.sum(), (labels == 0).sum())
    auc, positives, negatives = placements(labels, a)
    assert auc == pytest.approx(negatives.mean(), abs=1e-12)  # the AUC is the mean of either placements


def test_a_clearly_better_model_is_significant_and_the_test_is_symmetric():
    labels, a, b = scored(3000, 0.3, 1.5, seed=2)
    forward, backward = delong(labels, a, b), delong(labels, b, a)
    assert forward.better(0.05) and not forward.worse(0.05) and forward.p_value < 1e-6
    assert backward.worse(0.05) and backward.p_value == pytest.approx(forward.p_value)
    assert backward.z == pytest.approx(-forward.z)


def test_the_false_positive_rate_under_the_null_is_the_level():
    """Two equally good models: p < 0.05 in about 5% of 400 samples (binomial 95%: 2.9%-7.3%)."""
    rejections = 0
    for seed in range(400):
        rng = np.random.default_rng(seed)
        labels = (rng.random(400) < 0.3).astype(int)
        a = labels + rng.normal(size=400)
        b = labels + rng.normal(size=400)
        rejections += delong(labels, a, b).p_value < 0.05
    assert 0.029 <= rejections / 400 <= 0.073


def test_the_standard_error_agrees_with_scipys_paired_bootstrap():
    from scipy.stats import bootstrap
    from sklearn.metrics import roc_auc_score

    labels, a, b = scored(1500, 0.8, 1.0, seed=3)
    result = delong(labels, a, b)

    def difference(y, x1, x2):
        return roc_auc_score(y, x2) - roc_auc_score(y, x1)

    boot = bootstrap((labels, a, b), difference, paired=True, vectorized=False, n_resamples=1000,
                     method="percentile", random_state=0)
    assert boot.standard_error == pytest.approx(result.std_error, rel=0.15)
    low, high = boot.confidence_interval
    assert low < result.difference < high
    assert (low > 0) == result.better(0.05)


def test_identical_scores_are_no_evidence_and_bad_input_is_refused():
    labels, a, _ = scored(200, 1.0, 1.0, seed=4)
    same = delong(labels, a, a)
    assert same.difference == 0 and same.p_value == 1.0 and not same.better(0.05) and not same.worse(0.05)
    with pytest.raises(ValueError, match="at least two flights of each class"):
        delong([1, 0, 0], [0.2, 0.1, 0.3], [0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="differ in length"):
        delong([1, 0], [0.2], [0.3, 0.1])


def test_the_canary_gets_its_share_of_flights_and_each_flight_always_the_same_model():
    import datetime as dt

    from mlplatform import keys
    from mlplatform.rollout.traffic import DEFAULT_CANARY_SHARE, place, to_canary

    rng = np.random.default_rng(5)
    carriers = ["UA", "B6", "EV", "DL", "AA", "MQ", "US", "9E", "WN", "VX"]
    flights = {keys.flight_id(dt.date(2013, 1, 1) + dt.timedelta(days=int(d)), carriers[c], int(n), o, int(t))
               for d, c, n, o, t in zip(rng.integers(0, 365, 12_000), rng.integers(0, 10, 12_000),
                                        rng.integers(1, 6000, 12_000), rng.choice(["EWR", "JFK", "LGA"], 12_000),
                                        rng.integers(500, 2300, 12_000))}
    flights = sorted(flights)[:10_000]
    assert len(flights) == 10_000
    for share in (DEFAULT_CANARY_SHARE, 0.25, 0.5):
        got = np.mean([to_canary(f, share) for f in flights])
        assert abs(got - share) <= 0.02, (share, got)
    # sticky: the same answer every time, and a larger share keeps the flights a smaller one had
    assert [to_canary(f, 0.1) for f in flights] == [to_canary(f, 0.1) for f in flights]
    assert all(to_canary(f, 0.2) for f in flights if to_canary(f, 0.1))
    assert not any(to_canary(f, 0.0) for f in flights) and all(to_canary(f, 1.0) for f in flights)
    assert place(flights[0]) == place(str(flights[0]))
    with pytest.raises(ValueError, match="within 0..1"):
        to_canary(flights[0], 1.5)


def canary_days(n, champion_strength, canary_strength, seed, carriers=("UA", "B6", "EV", "DL")):
    """Labelled flights scored by two versions: a shared part (what both models know) and noise."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.25).astype(int)
    shared = rng.normal(size=n)
    carrier = rng.choice(np.array(carriers, dtype=object), size=n)

    def version(strength):
        raw = strength * labels + shared + 0.8 * rng.normal(size=n)
        return 1 / (1 + np.exp(-(raw - 1.2)))

    return labels, carrier, version(champion_strength), version(canary_strength)


def test_a_worse_canary_is_rolled_back_at_once_and_a_better_one_promoted():
    from mlplatform.rollout.judge import PROMOTE, ROLLBACK, CanaryRule, judge

    rule = CanaryRule()
    labels, carriers, champion, worse = canary_days(4000, 1.2, 0.5, seed=6)
    verdict = judge(labels, carriers, champion, worse, days=1, rule=rule)  # at once: one day is enough to roll back
    assert verdict.action == ROLLBACK and verdict.reason.startswith("worse") and verdict.final
    assert verdict.evidence["delong"]["p_value"] < 0.05
    labels, carriers, champion, better = canary_days(4000, 1.0, 1.6, seed=7)
    verdict = judge(labels, carriers, champion, better, days=3, rule=rule)
    assert verdict.action == PROMOTE and "better" in verdict.reason
    assert verdict.evidence["canary"]["roc_auc"] > verdict.evidence["champion"]["roc_auc"]
    assert set(verdict.evidence["canary"]["carriers"]) == {"UA", "B6", "EV", "DL"}


def test_a_canary_waits_for_labels_then_is_rejected_when_never_better():
    from mlplatform.rollout.judge import REJECT, WAIT, CanaryRule, judge

    rule = CanaryRule(min_labelled_flights=2000, min_days=3, max_days=10)
    labels, carriers, champion, better = canary_days(4000, 1.0, 1.6, seed=8)
    assert judge(labels[:1000], carriers[:1000], champion[:1000], better[:1000], days=3, rule=rule).action == WAIT
    assert judge(labels, carriers, champion, better, days=2, rule=rule).action == WAIT
    labels, carriers, champion, same = canary_days(4000, 1.0, 1.0, seed=9)
    waiting = judge(labels, carriers, champion, same, days=5, rule=rule)
    assert waiting.action == WAIT and "not better" in waiting.reason and not waiting.final
    assert judge(labels, carriers, champion, same, days=10, rule=rule).action == REJECT


def test_approval_holds_a_passing_canary_but_not_a_rollback():
    from mlplatform.rollout.judge import AWAIT_APPROVAL, ROLLBACK, CanaryRule, judge

    rule = CanaryRule(approval_required=True)
    labels, carriers, champion, better = canary_days(4000, 1.0, 1.6, seed=10)
    assert judge(labels, carriers, champion, better, days=3, rule=rule).action == AWAIT_APPROVAL
    labels, carriers, champion, worse = canary_days(4000, 1.2, 0.5, seed=11)
    assert judge(labels, carriers, champion, worse, days=1, rule=rule).action == ROLLBACK


def test_serving_errors_or_latency_roll_a_better_canary_back():
    from mlplatform.rollout.judge import PROMOTE, ROLLBACK, CanaryRule, ServingStats, judge

    rule = CanaryRule()
    labels, carriers, champion, better = canary_days(4000, 1.0, 1.6, seed=12)
    fine = (ServingStats(9000, 2, 6.0), ServingStats(1000, 1, 7.0))
    assert judge(labels, carriers, champion, better, 3, rule, serving=fine).action == PROMOTE
    failing = judge(labels, carriers, champion, better, 3, rule, serving=(ServingStats(9000, 2, 6.0),
                                                                          ServingStats(1000, 40, 7.0)))
    assert failing.action == ROLLBACK and "serving errors 4.00%" in failing.reason
    slow = judge(labels, carriers, champion, better, 3, rule, serving=(ServingStats(9000, 2, 6.0),
                                                                       ServingStats(1000, 1, 12.0)))
    assert slow.action == ROLLBACK and "p99 12.0 ms" in slow.reason


def test_a_carrier_that_regresses_holds_an_overall_gain():
    from mlplatform.rollout.judge import WAIT, CanaryRule, judge

    labels, carriers, champion, better = canary_days(12000, 1.0, 1.6, seed=13)
    hurt = carriers == "EV"
    rng = np.random.default_rng(14)
    better = better.copy()
    better[hurt] = rng.random(hurt.sum())  # the canary knows nothing of EV's flights
    verdict = judge(labels, carriers, champion, better, days=4, rule=CanaryRule())
    assert verdict.action == WAIT and "EV" in verdict.reason and "carriers regress" in verdict.reason


def test_early_windows_wait_or_are_rejected_and_small_samples_roll_nothing_back():
    from mlplatform.rollout.judge import REJECT, WAIT, CanaryRule, ServingStats, judge

    rule = CanaryRule(max_days=14)
    # one labelled class only: nothing to compare yet, no error
    assert judge([0, 0, 0], ["UA"] * 3, [0.1, 0.2, 0.3], [0.3, 0.2, 0.1], days=1, rule=rule).action == WAIT
    assert judge([0, 0, 0], ["UA"] * 3, [0.1, 0.2, 0.3], [0.3, 0.2, 0.1], days=14, rule=rule).action == REJECT
    # a worse canary on 300 flights: below min_rollback_flights, it waits for more labels
    labels, carriers, champion, worse = canary_days(300, 2.0, 0.0, seed=15)
    assert judge(labels, carriers, champion, worse, days=1, rule=rule).action == WAIT
    # one error in one request is no error rate
    labels, carriers, champion, better = canary_days(4000, 1.0, 1.6, seed=16)
    verdict = judge(labels, carriers, champion, better, 3, rule,
                    serving=(ServingStats(9000, 0, 6.0), ServingStats(1, 1, 7.0)))
    assert verdict.action != "rollback"
    assert verdict.evidence["level"] == pytest.approx(0.05 / 14)  # each daily look


def test_calibration_error_on_known_values():
    from mlplatform.rollout.judge import calibration_error, version_metrics

    labels = np.array([0, 0, 1, 1, 0, 1, 0, 0, 0, 1])
    assert calibration_error(labels, np.full(10, 0.4)) == pytest.approx(0.0)  # one bin, rate 0.4
    assert calibration_error(labels, np.full(10, 0.9)) == pytest.approx(0.5)
    # two bins of five: rates 0.4 and 0.4, predicted 0.1 and 0.7 -> 0.5 * 0.3 + 0.5 * 0.3
    p = np.array([0.1] * 5 + [0.7] * 5)
    assert calibration_error(labels, p) == pytest.approx(0.3)
    m = version_metrics(labels, p, ["AA"] * 10, min_carrier_flights=5)
    assert m.flights == 10 and m.delay_rate == 0.4 and m.mean_predicted == pytest.approx(0.4) and "AA" in m.carriers


def test_stages_are_recorded_and_only_allowed_moves_happen():
    import datetime as dt

    import duckdb

    from mlplatform.rollout import stages as st

    conn = duckdb.connect()
    assert st.current_stage(conn, "flight_delay", "1") is None and st.history(conn, "flight_delay") == []
    t = [dt.datetime(2013, 3, 1, 6) + dt.timedelta(days=i) for i in range(6)]
    st.move(conn, "flight_delay", "1", st.CHAMPION, "gate", "first model beats the baseline", moved_at=t[0])
    st.move(conn, "flight_delay", "2", st.SHADOW, "gate", "passed the offline gate", {"roc_auc": 0.74}, moved_at=t[1])
    st.move(conn, "flight_delay", "2", st.CANARY, "judge", "shadow scores sane", moved_at=t[2])
    assert st.versions_in(conn, "flight_delay", st.CANARY) == ["2"]
    st.move(conn, "flight_delay", "2", st.CHAMPION, "Ada Lovelace", "approved: better on 3 days", moved_at=t[3])
    # promoting 2 retired 1, in the same transaction
    assert st.current_stage(conn, "flight_delay", "1") == st.RETIRED
    assert st.versions_in(conn, "flight_delay", st.CHAMPION) == ["2"]
    # which stage was version 2 in when it answered a flight on day 2 and on day 4
    assert st.stage_at(conn, "flight_delay", "2", t[2] + dt.timedelta(hours=3)) == st.CANARY
    assert st.stage_at(conn, "flight_delay", "2", t[4]) == st.CHAMPION
    assert st.stage_at(conn, "flight_delay", "2", t[0]) is None
    st.move(conn, "flight_delay", "3", st.SHADOW, "gate", "passed", moved_at=t[4])
    st.move(conn, "flight_delay", "3", st.CANARY, "judge", "shadow scores sane", moved_at=t[4])
    st.move(conn, "flight_delay", "3", st.ROLLED_BACK, "judge", "worse: p = 0.001", moved_at=t[5])
    assert st.versions_in(conn, "flight_delay", st.CHAMPION) == ["2"]  # a rollback leaves the champion
    with pytest.raises(st.InvalidMove, match="cannot go from rolled_back to canary"):
        st.move(conn, "flight_delay", "3", st.CANARY, "someone", "try again")
    with pytest.raises(st.InvalidMove, match="from nowhere to canary"):
        st.move(conn, "flight_delay", "9", st.CANARY, "judge", "skipping the shadow")
    with pytest.raises(ValueError, match="who or what decided"):
        st.move(conn, "flight_delay", "4", st.SHADOW, "", "no one")
    with pytest.raises(st.InvalidMove, match="without a shadow and a canary"):
        st.move(conn, "flight_delay", "5", st.CHAMPION, "gate", "straight to champion")
    st.move(conn, "flight_delay", "6", st.SHADOW, "gate", "passed", {"log_loss": float("nan")})  # JSON has no NaN
    assert st.current_stage(conn, "flight_delay", "9") is None  # a refused move writes nothing
    moves = st.history(conn, "flight_delay", "2")
    assert [(m.stage, m.previous, m.decided_by) for m in moves] == [
        ("shadow", None, "gate"), ("canary", "shadow", "judge"), ("champion", "canary", "Ada Lovelace")]
    evidence = conn.execute("SELECT evidence->>'roc_auc' FROM monitoring.rollout_history WHERE version = '2' "
                            "AND stage = 'shadow'").fetchone()[0]
    assert evidence == "0.74"


def test_two_moves_at_once_cannot_both_commit():
    import duckdb

    from mlplatform.rollout import stages as st

    conn = duckdb.connect()
    st.move(conn, "flight_delay", "1", st.CHAMPION, "gate", "first model")
    st.move(conn, "flight_delay", "2", st.SHADOW, "gate", "passed")
    st.move(conn, "flight_delay", "2", st.CANARY, "judge", "sane")
    other = conn.cursor()  # another connection to the same database, mid-move
    other.execute("BEGIN TRANSACTION")
    other.execute("UPDATE monitoring.rollout_lock SET moves = moves + 1 WHERE model_name = 'flight_delay'")
    with pytest.raises(duckdb.TransactionException):
        st.move(conn, "flight_delay", "2", st.ROLLED_BACK, "judge", "worse")
    other.execute("ROLLBACK")
    assert st.current_stage(conn, "flight_delay", "2") == st.CANARY  # the refused move left nothing
    st.move(conn, "flight_delay", "2", st.CHAMPION, "judge", "better")
    assert st.versions_in(conn, "flight_delay", st.CHAMPION) == ["2"]


def test_serving_statistics_are_read_from_the_inference_log(tmp_path):
    """The canary's serving budget comes from the server's JSONL log: answers per version (shadow
    records are not answers), its error records, its p99 latency, since the canary began."""
    import json

    from mlplatform.rollout.assets import serving_stats

    since = dt.datetime(2026, 12, 3, 10, 0)
    records = [{"ts": "2026-12-03T09:59:00+00:00", "model_version": "2", "stage": "canary", "latency_ms": 900.0}]
    records += [{"ts": f"2026-12-03T10:{i // 60:02d}:{i % 60:02d}+00:00", "model_version": "1", "stage": "champion",
                 "latency_ms": float(i % 10)} for i in range(100)]
    records += [{"ts": "2026-12-03T10:05:00+00:00", "model_version": "2", "stage": "canary", "latency_ms": 3.0}] * 10
    records += [{"ts": "2026-12-03T10:05:00+00:00", "model_version": "2", "stage": "canary", "latency_ms": 3.0,
                 "error": "ValueError: boom"}] * 2
    records += [{"ts": "2026-12-03T10:05:00+00:00", "model_version": "2", "stage": "shadow", "latency_ms": 50.0}] * 40
    (tmp_path / "2026-12-03.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = serving_stats(tmp_path, ["1", "2", "9"], since)
    assert (stats["1"].requests, stats["1"].errors) == (100, 0) and stats["1"].p99_ms == pytest.approx(9.0)
    assert (stats["2"].requests, stats["2"].errors, stats["2"].p99_ms) == (12, 2, 3.0)
    assert stats["9"].requests == 0 and serving_stats(tmp_path / "none", ["1"], since) is None

    # the same log as a view of the warehouse: which version answered a flight, at what stage
    import duckdb

    from mlplatform.rollout.assets import served_view

    (tmp_path / "2026-12-03.jsonl").open("a").write(json.dumps(
        {"ts": "2026-12-03T11:00:00+00:00", "request_id": "r1", "flight_id": "2013-02-02_UA1545_EWR_0515",
         "model_version": "2", "stage": "canary", "delay_probability": 0.25, "latency_ms": 2.0}) + "\n")
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as conn:
        assert served_view(conn, tmp_path) and not served_view(conn, tmp_path / "none")
        assert conn.execute("SELECT model_version, stage, delay_probability FROM monitoring.served "
                            "WHERE flight_id = ?", ["2013-02-02_UA1545_EWR_0515"]).fetchall() == [("2", "canary", 0.25)]


# --- end to end: real days, labels landing, the jobs the daemon would run ------------------------

def _stages(settings) -> dict[str, str]:
    import duckdb

    with duckdb.connect(str(settings.warehouse), read_only=True) as conn:
        return {v: s for v, s in conn.execute(
            "SELECT version, stage FROM monitoring.rollout_stages ORDER BY version").fetchall()}


def _aliases(settings) -> dict[str, str]:
    from mlplatform.training.tracking import tracking_from

    model = tracking_from(settings).client().get_registered_model("flight_delay")
    return {alias: str(version) for alias, version in sorted(model.aliases.items())}


@pytest.mark.integration
def test_a_challenger_goes_through_shadow_and_canary_to_champion_and_a_worse_one_is_rolled_back(
        features_home, instance):
    """From five weeks of features: a weak first champion (trained on 300 flights); a real challenger
    passes the offline gate into the shadow, takes the canary share after a labelled day, waits
    for an approval once it is better, is promoted by a named person; a deliberately worse
    version put in the canary by an operator is rolled back on its first labelled day, approval or
    not. Every move is a row of the history; the aliases and the predictions' versions follow."""
    import dataclasses

    import duckdb

    from mlplatform import keys
    from mlplatform.rollout.assets import apply_move
    from mlplatform.training.tracking import tracking_from
    from mlplatform_tests.conftest import CHAMPION_TRAINING, failures, run_job

    settings = dataclasses.replace(features_home, rollout_overrides=(
        ("min_days", 2), ("min_labelled_flights", 1000), ("approval_required", True)))

    def run(job, day=None, config=None):
        result = run_job(instance, job, day, day, config, settings)
        assert result.success, f"{job} {day}: {failures(result)}"
        return result

    def day(d):  # a day's labels have landed: score it, then monitor it (what automation runs)
        run("predictions_job", d)
        run("monitoring_job", d)

    def train(**config):
        return run("training_job", config={"ops": {"flight_delay_model": {"config": {**CHAMPION_TRAINING, **config}}}})

    train(max_train_rows=300, max_iter=20)  # v1, weak, the first champion (it beats the baseline)
    assert _stages(settings) == {"1": "champion"} and _aliases(settings) == {"challenger": "1", "champion": "1"}
    gated = train()  # v2: better; the gate passes it into the shadow, not to the traffic
    evaluation = gated.asset_materializations_for_node("model_evaluation")[0].metadata
    assert evaluation["decision"].value == "SHADOW", evaluation["reason"]
    assert _stages(settings) == {"1": "champion", "2": "shadow"} and _aliases(settings)["shadow"] == "2"

    # (days chosen on which the challenger's AUC is not lower than the weak champion's: on 01-31 it
    # is 0.547 against 0.650, and the shadow would rightly be rejected; README, Staged rollout)
    day(D(2013, 2, 1))  # a day in the shadow, not worse: into the canary
    with duckdb.connect(str(settings.warehouse), read_only=True) as conn:
        scored = dict(conn.execute("SELECT stage, count(*) FROM predictions.flight_delay WHERE flight_date = "
                                   "'2013-02-01' GROUP BY stage").fetchall())
    assert scored["shadow"] == scored["champion"] > 800, scored  # every flight, by both
    assert _stages(settings)["2"] == "canary" and _aliases(settings)["canary"] == "2"
    assert "shadow" not in _aliases(settings)

    day(D(2013, 2, 2))  # better, but one day of the two required
    early = run_job(instance, "approve_canary_job", run_config={"ops": {"approve_canary": {"config": {
        "approver": "Ada Lovelace", "reason": "too soon"}}}}, settings=settings)
    assert not early.success and "is not awaiting an approval: its latest verdict is wait" in failures(early)
    day(D(2013, 2, 3))  # better with two days: waits for an approval, and nothing moves
    with duckdb.connect(str(settings.warehouse), read_only=True) as conn:
        verdicts = conn.execute("SELECT evaluation_date, stage, action, p_value, roc_auc, champion_roc_auc FROM "
                                "monitoring.online_evaluation WHERE version = '2' ORDER BY evaluation_date").fetchall()
    assert [(str(d), s, a) for d, s, a, *_ in verdicts] == [
        ("2013-02-01", "shadow", "to_canary"), ("2013-02-02", "canary", "wait"),
        ("2013-02-03", "canary", "await_approval")], verdicts
    assert verdicts[-1][3] < 0.05 / 14 and verdicts[-1][4] > verdicts[-1][5]
    assert _stages(settings) == {"1": "champion", "2": "canary"}

    approved = run("approve_canary_job", config={"ops": {"approve_canary": {"config": {
        "approver": "Ada Lovelace", "reason": "better on two days of labels"}}}})
    assert approved.success
    assert _stages(settings) == {"1": "retired", "2": "champion"} and _aliases(settings)["champion"] == "2"
    champion = instance.get_latest_materialization_event(keys.CHAMPION_MODEL).asset_materialization
    assert champion.metadata["model_version"].value == "2"

    # a deliberately worse version (200 flights, one tree), rejected by the gate, put in the canary by an operator
    rejected = train(max_train_rows=200, max_iter=1, random_state=7)  # one tree of at most two leaves
    assert rejected.asset_materializations_for_node("model_evaluation")[0].metadata["decision"].value == "REJECTED"
    with duckdb.connect(str(settings.warehouse)) as conn:
        mlflow = tracking_from(settings)
        apply_move(conn, mlflow, "3", "shadow", "Grace Hopper", "see how the small model does live")
        apply_move(conn, mlflow, "3", "canary", "Grace Hopper", "see how the small model does live")
    day(D(2013, 2, 4))  # scored by the new champion (v2) and the canary; worse: rolled back at once
    with duckdb.connect(str(settings.warehouse), read_only=True) as conn:
        scored = dict(conn.execute("SELECT model_version, stage FROM predictions.flight_delay WHERE flight_date = "
                                   "'2013-02-04' GROUP BY ALL").fetchall())
        history = conn.execute("SELECT version, stage, decided_by FROM monitoring.rollout_history ORDER BY move").fetchall()
    assert scored == {"2": "champion", "3": "canary"}
    assert _stages(settings)["3"] == "rolled_back" and "canary" not in _aliases(settings)
    assert history == [("1", "champion", "gate"), ("2", "shadow", "gate"), ("2", "canary", "judge"),
                       ("1", "retired", "Ada Lovelace"), ("2", "champion", "Ada Lovelace"),
                       ("3", "shadow", "Grace Hopper"), ("3", "canary", "Grace Hopper"), ("3", "rolled_back", "judge")]


@pytest.mark.integration
def test_an_approval_from_the_command_line_with_nothing_awaiting_is_refused_before_any_run(features_home):
    from dagster import DagsterInstance

    from mlplatform.cli import main

    with pytest.raises(SystemExit, match="not approved: no canary to approve \\(in the canary: none\\)"):
        main(["rollout", "approve", "--by", "Ada Lovelace", "--reason", "looks good"])
    with pytest.raises(SystemExit, match="give the approver's name"):
        main(["rollout", "approve", "--by", " ", "--reason", "looks good"])
    with DagsterInstance.from_config(str(features_home.dagster_home)) as instance:
        assert not instance.get_runs()  # refused before a run was launched
