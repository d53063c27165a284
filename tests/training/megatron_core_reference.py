"""megatron-core's own OptimizerParamScheduler and ramp-up calculator, run in one child process per test module
(importing megatron.core takes seconds and changes process-wide state), as the reference our numbers must equal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

# Reads {key: request} as JSON on stdin and prints {key: values}; floats survive JSON exactly (repr).
_SCRIPT = r"""
import json, sys, types
try:
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core import num_microbatches_calculator as calculators
except ImportError as err:
    print(json.dumps({"missing": str(err)}))
    sys.exit(0)

def scheduler(request):
    groups = [dict(group, params=[]) for group in request["groups"]]
    sched = OptimizerParamScheduler(types.SimpleNamespace(param_groups=groups), **request["kwargs"])
    values = [[[g["lr"], g["weight_decay"]] for g in groups]]
    for increment in request["increments"]:
        sched.step(increment)
        values.append([[g["lr"], g["weight_decay"]] for g in groups])
    return values

def rampup(request):
    calc = calculators.RampupBatchsizeNumMicroBatchesCalculator(*request["args"])
    batches = []
    for consumed in request["consumed"]:
        calc.update(consumed, consistency_check=False)
        batches.append([calc.get(), calc.get_current_global_batch_size(),
                        calc.get_current_running_global_batch_size()])
    # Megatron's (core_v0.15) update_train_iters with a ramp-up, on megatron-core's calculator.
    iters = []
    for train_samples in request["train_samples"]:
        iterations = consumed = 0
        while consumed <= calc.ramup_samples and consumed <= train_samples:
            calc.update(consumed, consistency_check=False)
            consumed += calc.get_current_global_batch_size()
            iterations += 1
        if train_samples > consumed:
            iterations += (train_samples - consumed) // calc.global_batch_size
        iters.append(iterations)
    return {"batches": batches, "train_iters": iters}

out = {}
for key, request in json.load(sys.stdin).items():
    out[key] = scheduler(request) if request["kind"] == "scheduler" else rampup(request)
print(json.dumps(out))
"""


def megatron_core_reference(requests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Megatron-core's values for every request (skips the caller when megatron-core is not installed)."""
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        input=json.dumps(requests),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"megatron-core reference failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "missing" in result:
        pytest.skip(f"megatron-core is not installed: {result['missing']}")
    return result
