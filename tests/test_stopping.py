"""Early stopping on the student's validation accuracy: patience, target, and its resume state."""

import math

from kdpipe.training.stopping import EarlyStop


def test_patience_counts_evaluations_without_improvement():
    stop = EarlyStop(patience=2, target=1.01)
    for metric in (0.5, 0.6, 0.6):  # 0.6 again is no improvement
        stop.update(metric)
    assert stop.reason is None and stop.evals_without_improvement == 1
    stop.update(0.55)
    assert stop.reason == "no improvement in 2 evaluations" and stop.best == 0.6


def test_an_improvement_resets_the_count_and_the_target_stops_at_once():
    stop = EarlyStop(patience=2, target=0.9)
    stop.update(0.5)
    stop.update(0.4)
    stop.update(0.7)
    assert stop.evals_without_improvement == 0 and stop.reason is None
    stop.update(0.95)
    assert stop.reason == "target_metric 0.9 reached (0.9500)"


def test_patience_zero_never_stops_and_nan_is_ignored():
    stop = EarlyStop(patience=0, target=1.01)
    for metric in (0.5, 0.4, 0.3, math.nan, 0.2):
        stop.update(metric)
    assert stop.reason is None and stop.evals_without_improvement == 3


def test_resume_state_round_trips():
    stop = EarlyStop(patience=3, target=1.01)
    for metric in (0.5, 0.4):
        stop.update(metric)
    again = EarlyStop(patience=3, target=1.01)
    again.load_state_dict(stop.state_dict())
    assert again == stop
