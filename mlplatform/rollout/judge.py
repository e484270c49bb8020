"""Judging a canary on what actually happened: plain functions over labelled flights.

Once a day's labels land, the flights both versions scored (the champion and the canary, on the
same flights: the batch predictions score every flight with both) are compared over the
evaluation window so far:

- per version: ROC AUC, log loss and calibration (the mean predicted probability against the
  observed delay rate, and the expected calibration error over ten bins), overall and per carrier;
- paired: DeLong's test of the canary's AUC against the champion's (``compare.delong``).

``judge`` turns that into a verdict (``CanaryRule``, every threshold configurable):

- **roll back**, at once: its serving error rate (over at least ``min_requests``) or p99 latency
  breaks its budget against the champion's; or, over at least ``min_rollback_flights``, it is
  worse with p < the level;
- **wait** while there are fewer than ``min_labelled_flights`` or ``min_days`` of labels, or it is
  not (yet) better with p < the level, or a carrier with ``min_carrier_flights`` regresses by more
  than ``carrier_tolerance`` of AUC;
- **reject** when ``max_days`` of labels have not shown it better, however few (the champion stays,
  the canary stops taking traffic);
- **promote** when it is better with p < ``level`` and nothing above holds it back; or **await
  approval** instead when ``approval_required`` (a passing canary waits for a named person; a
  regressing one is still rolled back without waiting).

The canary is tested again every day its labels land, up to ``max_days`` looks: each look uses
``level / max_days`` (Bonferroni), so that over the whole window the chance of promoting or rolling
back a canary that is in truth no different stays within ``level``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from mlplatform.rollout.traffic import DEFAULT_CANARY_SHARE

if TYPE_CHECKING:  # (numpy and the test are imported where a canary is judged, not by the code location)
    import numpy as np

    from mlplatform.rollout.compare import AucComparison

PROMOTE, ROLLBACK, WAIT, REJECT, AWAIT_APPROVAL = "promote", "rollback", "wait", "reject", "await_approval"


@dataclass(frozen=True)
class CanaryRule:
    share: float = DEFAULT_CANARY_SHARE   # of live traffic the canary answers
    min_labelled_flights: int = 2_000     # before any decision but a rollback
    min_days: int = 3                     # days of labels, likewise
    max_days: int = 14                    # not better by then: rejected
    level: float = 0.05                   # significance over the whole window (each daily look: level / max_days)
    min_rollback_flights: int = 500       # labelled flights before the AUC alone can roll back
    min_requests: int = 200               # canary requests before its error rate can roll it back
    carrier_tolerance: float = 0.02       # AUC a carrier may lose
    min_carrier_flights: int = 300        # carriers with fewer labelled flights are not judged alone
    error_rate_margin: float = 0.005      # the canary's serving error rate at most the champion's + this
    latency_ratio: float = 1.5            # the canary's serving p99 at most this times the champion's
    approval_required: bool = False


@dataclass(frozen=True)
class VersionMetrics:
    flights: int
    roc_auc: float
    log_loss: float
    mean_predicted: float
    delay_rate: float
    calibration_error: float              # expected calibration error, ten equal-width bins
    carriers: dict[str, float] = field(default_factory=dict)  # AUC of carriers with enough flights


@dataclass(frozen=True)
class ServingStats:
    """What the inference log says of a version's requests over the window."""

    requests: int
    errors: int
    p99_ms: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def serving_breach(rule: "CanaryRule", champion: ServingStats, canary: ServingStats) -> str | None:
    """Why the canary's requests break their budget against the champion's, or None."""
    if canary.requests < rule.min_requests:
        return None
    if canary.error_rate > champion.error_rate + rule.error_rate_margin:
        return (f"serving errors {canary.error_rate:.2%} against the champion's {champion.error_rate:.2%} "
                f"(margin {rule.error_rate_margin:.2%})")
    if champion.p99_ms and canary.p99_ms > rule.latency_ratio * champion.p99_ms:
        return (f"serving p99 {canary.p99_ms:.1f} ms against the champion's {champion.p99_ms:.1f} ms "
                f"(at most {rule.latency_ratio}x)")
    return None


@dataclass(frozen=True)
class Verdict:
    action: str   # PROMOTE | ROLLBACK | WAIT | REJECT | AWAIT_APPROVAL
    reason: str
    evidence: dict

    @property
    def final(self) -> bool:
        """Whether the canary's stage ends here (anything but waiting)."""
        return self.action != WAIT


def calibration_error(labels: np.ndarray, probability: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the flights-weighted mean |observed rate - mean predicted| over
    equal-width probability bins."""
    import numpy as np

    which = np.minimum((probability * bins).astype(int), bins - 1)
    total, error = len(labels), 0.0
    for b in np.unique(which):
        inside = which == b
        error += inside.sum() / total * abs(labels[inside].mean() - probability[inside].mean())
    return float(error)


def version_metrics(labels, probability, carriers, min_carrier_flights: int) -> VersionMetrics:
    import numpy as np
    from sklearn.metrics import log_loss, roc_auc_score

    labels, probability, carriers = np.asarray(labels).astype(int), np.asarray(probability, float), np.asarray(carriers)
    per_carrier = {}
    for carrier in sorted(set(carriers.tolist())):
        inside = carriers == carrier
        if inside.sum() >= min_carrier_flights and 0 < labels[inside].sum() < inside.sum():
            per_carrier[str(carrier)] = float(roc_auc_score(labels[inside], probability[inside]))
    return VersionMetrics(
        flights=len(labels), roc_auc=float(roc_auc_score(labels, probability)),
        log_loss=float(log_loss(labels, np.clip(probability, 1e-6, 1 - 1e-6), labels=[0, 1])),
        mean_predicted=float(probability.mean()), delay_rate=float(labels.mean()),
        calibration_error=calibration_error(labels, probability), carriers=per_carrier)


def judge(labels, carriers, champion, canary, days: int, rule: CanaryRule,
          serving: tuple[ServingStats, ServingStats] | None = None) -> Verdict:
    """The verdict on a canary from the labelled flights both versions scored (see the module):
    ``champion`` and ``canary`` are their probabilities for the same flights, ``days`` how many
    days of labels those are, ``serving`` the (champion, canary) request statistics."""
    import numpy as np

    from mlplatform.rollout.compare import delong

    labels = np.asarray(labels).astype(int)
    evidence: dict = {"days": days, "flights": len(labels), "rule": asdict(rule)}
    if serving is not None:
        evidence["serving"] = {"champion": asdict(serving[0]), "canary": asdict(serving[1])}
        breach = serving_breach(rule, *serving)
        if breach:
            return Verdict(ROLLBACK, breach, evidence)
    if min(int(labels.sum()), int((labels == 0).sum())) < 2:  # nothing to compare AUCs on yet
        if days >= rule.max_days:
            return Verdict(REJECT, f"after {days} days, too few labelled flights to judge ({len(labels)})", evidence)
        return Verdict(WAIT, f"too few labelled flights to judge ({len(labels)})", evidence)
    level = rule.level / rule.max_days
    ours = version_metrics(labels, champion, carriers, rule.min_carrier_flights)
    theirs = version_metrics(labels, canary, carriers, rule.min_carrier_flights)
    test: AucComparison = delong(labels, champion, canary)
    evidence.update(champion=asdict(ours), canary=asdict(theirs), delong=asdict(test), level=level)
    versus = (f"ROC AUC {test.auc_b:.4f} against the champion's {test.auc_a:.4f} ({test.difference:+.4f}, "
              f"p = {test.p_value:.3g}, {test.positives + test.negatives:,} flights, {days} days)")
    if test.worse(level) and len(labels) >= rule.min_rollback_flights:
        return Verdict(ROLLBACK, f"worse: {versus}", evidence)
    held = None
    if len(labels) < rule.min_labelled_flights or days < rule.min_days:
        held = f"too few labels yet (at least {rule.min_labelled_flights:,} flights and {rule.min_days} days): {versus}"
    elif not test.better(level):
        held = f"not better with p < {level:.3g}: {versus}"
    else:
        regressions = {c: theirs.carriers[c] - auc for c, auc in ours.carriers.items()
                       if c in theirs.carriers and theirs.carriers[c] - auc < -rule.carrier_tolerance}
        if regressions:
            worst = ", ".join(f"{c} {d:+.4f}" for c, d in sorted(regressions.items(), key=lambda kv: kv[1]))
            held = f"better overall, but carriers regress beyond {rule.carrier_tolerance}: {worst}"
    if held:
        if days >= rule.max_days:
            return Verdict(REJECT, f"after {days} days, {held}", evidence)
        return Verdict(WAIT, held, evidence)
    if rule.approval_required:
        return Verdict(AWAIT_APPROVAL, f"better: {versus}; waits for an approval", evidence)
    return Verdict(PROMOTE, f"better: {versus}", evidence)
