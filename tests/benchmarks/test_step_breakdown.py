"""bench_train's profile split: the trainer's ops land in the right groups and the groups add up to the step."""

from __future__ import annotations

from types import SimpleNamespace

from benchmarks.step_breakdown import GROUPS, op_group, step_breakdown


def test_the_trainers_clip_and_the_blocked_kernel_are_grouped():
    # grad_utils.clip_grad_norm runs outside any marked region: its foreach ops still count as optimizer.
    assert op_group("aten::_foreach_norm", []) == "optimizer"
    assert op_group("aten::_foreach_mul_", []) == "optimizer"
    assert op_group("aten::exp_", ["_BlockedCausalAttentionBackward"]) == "attention"
    assert op_group("aten::mm", ["Optimizer.step#AdamW.step"]) == "optimizer"
    assert op_group("aten::mm", ["AddmmBackward0"]) == "matmul"
    assert op_group("aten::add", []) == "other"


def test_groups_and_the_untracked_rest_sum_to_the_wall_time():
    parent = SimpleNamespace(name="_BlockedCausalAttention", cpu_parent=None, self_cpu_time_total=10.0)
    events = [
        parent,
        SimpleNamespace(name="aten::bmm", cpu_parent=parent, self_cpu_time_total=30.0),
        SimpleNamespace(name="aten::mm", cpu_parent=None, self_cpu_time_total=40.0),
    ]
    totals = step_breakdown(events, wall_us=100.0)
    assert set(totals) == set(GROUPS)
    assert totals["attention"] == 40.0 and totals["matmul"] == 40.0 and totals["untracked"] == 20.0
    assert sum(totals.values()) == 100.0
