"""The adaptive augmentation schedule, checked step by step against the rules in docs/methods.md."""

from __future__ import annotations

import json

import pytest

from kdpipe.training.schedules import AugmentationSchedule, ScheduleState


def _adaptive(**kw):
    args = dict(rule="adaptive", p_max=0.8, total_epochs=4, delta=0.0, w_init=1.0, w_min=0.3, w_step=0.1)
    args.update(kw)
    return AugmentationSchedule(**args)


def test_initial_values_and_p2_formula():
    s = _adaptive()
    # p1_1 = 0, w_1 = 1.0, p2 = min(p_max, p1 + p_max/E) = 0 + 0.8/4 = 0.2
    assert s.current() == pytest.approx((0.0, 0.2, 1.0))
    assert s.p2(0.5) == pytest.approx(0.7)
    assert s.p2(0.7) == pytest.approx(0.8)  # 0.7 + 0.2 = 0.9 capped at p_max


def test_adaptive_improvement_raises_p1_to_p2_and_keeps_w():
    s = _adaptive()
    # epoch 1: m_0 = -inf, so any metric is an improvement -> p1_2 = p2_1 = 0.2, w unchanged
    assert s.step(0.1) == pytest.approx((0.2, 0.4, 1.0))
    # epoch 2: 0.5 > 0.1 + delta(0) -> p1_3 = 0.4
    assert s.step(0.5) == pytest.approx((0.4, 0.6, 1.0))


def test_adaptive_stall_lowers_w_and_keeps_p1():
    s = _adaptive()
    s.step(0.5)  # -> p1 = 0.2
    # equal metric is NOT an improvement (strict >): w 1.0 -> 0.9, p1 stays 0.2
    assert s.step(0.5) == pytest.approx((0.2, 0.4, 0.9))
    # worse -> w 0.8
    assert s.step(0.4) == pytest.approx((0.2, 0.4, 0.8))


def test_adaptive_delta_and_comparison_with_previous_epoch():
    s = _adaptive(delta=0.05)
    s.step(0.5)  # first epoch: improvement regardless of delta
    # 0.54 is not > 0.5 + 0.05 -> stall
    assert s.step(0.54) == pytest.approx((0.2, 0.4, 0.9))
    # compared with m_{e-1} = 0.54 (not the best): 0.6 > 0.59 -> improvement
    assert s.step(0.6) == pytest.approx((0.4, 0.6, 0.9))


def test_adaptive_clamps_w_min_and_p_max():
    s = _adaptive(w_min=0.75, w_step=0.1)
    s.step(0.5)
    for _ in range(5):
        s.step(0.5)  # stalls: 1.0 -> 0.9 -> 0.8 -> 0.75 (clamped) ...
    assert s.current()[2] == pytest.approx(0.75)
    s = _adaptive()
    for m in range(10):  # always improving: p1 climbs 0.2 per epoch, capped at 0.8
        s.step(float(m))
    assert s.current() == pytest.approx((0.8, 0.8, 1.0))


def test_adaptive_requires_metric():
    with pytest.raises(ValueError):
        _adaptive().step(None)


def test_linear_rule():
    s = AugmentationSchedule(rule="linear", p_max=0.6, total_epochs=3, w_init=0.7, w_min=0.3)
    seen = [s.current()]
    for _ in range(4):
        seen.append(s.step(None))  # the metric does not matter
    # p1 rises by 0.6/3 = 0.2 per epoch, capped at 0.6; w fixed at w_init
    assert [x[0] for x in seen] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.6])
    assert all(x[2] == pytest.approx(0.7) for x in seen)


def test_fixed_rule():
    s = AugmentationSchedule(rule="fixed", p_max=0.8, total_epochs=4)
    assert s.current() == pytest.approx((0.4, 0.6, 1.0))  # p_fixed defaults to p_max / 2
    for m in (0.9, 0.1, 0.5):
        assert s.step(m) == pytest.approx((0.4, 0.6, 1.0))
    s = AugmentationSchedule(rule="fixed", p_max=0.8, total_epochs=4, p_fixed=0.1)
    assert s.current()[0] == pytest.approx(0.1)


def test_history_records_each_epoch():
    s = _adaptive()
    s.step(0.3)
    s.step(0.2)
    assert [h["epoch"] for h in s.history] == [1, 2]
    assert s.history[0] == pytest.approx({"epoch": 1, "p1": 0.0, "p2": 0.2, "w": 1.0, "metric": 0.3})
    assert s.history[1] == pytest.approx({"epoch": 2, "p1": 0.2, "p2": 0.4, "w": 1.0, "metric": 0.2})


def test_state_round_trip_through_json_continues_identically():
    a = _adaptive()
    for m in (0.2, 0.3, 0.3):
        a.step(m)
    state = json.loads(json.dumps(a.state_dict()))
    b = _adaptive()
    b.load_state_dict(state)
    assert b.current() == a.current() and b.history == a.history
    for m in (0.1, 0.5):
        assert a.step(m) == b.step(m)
    assert a.state_dict() == b.state_dict()
    st = ScheduleState()
    st.load_state_dict(ScheduleState(epoch=3, p1=0.2, w=0.5, last_metric=None).state_dict())
    assert st.epoch == 3 and st.last_metric is None


def test_from_params_and_validation():
    from kdpipe.core.params import TrainParams

    s = AugmentationSchedule.from_params(TrainParams(), total_epochs=8)
    assert s.current() == pytest.approx((0.0, 0.1, 1.0))
    with pytest.raises(ValueError):
        AugmentationSchedule(rule="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AugmentationSchedule(total_epochs=0)
