"""--save-tokens-per-expert-interval: Megatron's tokens_per_expert/rank{R}.jsonl lines and the expert-load
TensorBoard scalars equal a direct count of the routers' top-k choices, over 2 gloo ranks with EP=2."""

from __future__ import annotations

import json

import pytest
import torch
from dist_utils import run_distributed

from megatron_lite.arguments import parse_config
from megatron_lite.errors import UserError
from megatron_lite.parallel_state import initialize_parallel
from megatron_lite.training.training import pretrain

# Two MoE layers, 4 experts, top-2; 2 micro batches per rank per step. (All layers MoE: a checkpoint of a
# model mixing dense and MoE layers cannot be saved at DP 2 yet, and the run ends with a save.)
FLAGS = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --mock-data --vocab-size 250 "
    "--micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --train-iters 2 --num-workers 0 --eval-iters 0 "
    "--log-interval 1 --peak-tflops 1 --num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 24 "
    "--swiglu --disable-bias-linear --moe-aux-loss-coeff 0.01 --moe-per-layer-logging "
    "--save-tokens-per-expert-interval 2 --save-interval 100"
)
MOE_LAYERS, MICRO_BATCHES = (0, 1), 2


def _count_choices(direct: list[tuple[int, list[int]]]):
    """A global forward hook that recounts, independently of the logger, each router's top-k choices over
    all experts from its input: (layer, counts [E]) appended in forward order."""
    from megatron_lite.core.transformer.moe.router import TopKRouter

    def hook(module, args, output):
        if isinstance(module, TopKRouter) and torch.is_grad_enabled():
            hidden = args[0].reshape(-1, args[0].shape[-1])
            logits = hidden.float() @ module.weight.float().t()
            logits = logits + (module.bias.float() if module.bias is not None else 0.0)
            chosen = torch.topk(logits, module.topk, dim=-1).indices
            counts = torch.bincount(chosen.reshape(-1), minlength=module.num_experts)
            direct.append((module.layer_number - 1, counts.tolist()))

    return torch.nn.modules.module.register_module_forward_hook(hook)


def _worker(rank: int, world_size: int, save: str, tensorboard: str) -> list[tuple[int, list[int]]]:
    """Train with EP=2, recounting the routers' choices."""
    direct: list[tuple[int, list[int]]] = []
    handle = _count_choices(direct)
    try:
        flags = f"{FLAGS} --expert-model-parallel-size 2 --save {save} --tensorboard-dir {tensorboard}"
        pretrain(parse_config(flags.split()), initialize_parallel(1))
    finally:
        handle.remove()
    return direct


@pytest.mark.slow
def test_tokens_per_expert_files_and_scalars_equal_the_routers_choices(tmp_path):
    save, tensorboard = tmp_path / "ckpt", tmp_path / "tb"
    direct = run_distributed(_worker, 2, str(save), str(tensorboard), timeout=600)

    per_step = len(MOE_LAYERS) * MICRO_BATCHES
    assert all(len(d) == 2 * per_step for d in direct)  # 2 iterations, no recompute
    # Iteration 2's choices (the saving one): [rank][micro batch][layer] -> counts over all experts.
    choices = [
        {(i // len(MOE_LAYERS), layer): torch.tensor(c) for i, (layer, c) in enumerate(d[per_step:])}
        for d in direct
    ]
    files = {}
    for rank in range(2):
        lines = [json.loads(line) for line in (save / "tokens_per_expert" / f"rank{rank}.jsonl").open()]
        assert [(x["iter"], x["block"], x["layer"]) for x in lines] == [(2, "decoder", 0), (2, "decoder", 1)]
        files[rank] = {x["layer"]: x["tpe"] for x in lines}
    for layer in MOE_LAYERS:
        for mb in range(MICRO_BATCHES):
            # Rank r holds experts 2r, 2r+1 and receives them from both ranks' micro batch mb.
            global_counts = choices[0][mb, layer] + choices[1][mb, layer]
            written = files[0][layer][mb] + files[1][layer][mb]
            assert written == global_counts.tolist()
            assert sum(written) == 2 * 2 * 16 * 2  # ranks x micro batch x seq x top-k
    assert files[0][0] != files[1][0]  # the ranks wrote their own experts' counts

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    ratios = {}
    for layer in MOE_LAYERS:
        step = sum(choices[r][mb, layer] for r in range(2) for mb in range(MICRO_BATCHES)).double()
        ratios[layer] = (step.max() / step.mean()).item(), (step.min() / step.mean()).item()
        for tag, value in zip(("max", "min"), ratios[layer]):
            scalars = events.Scalars(f"moe/tokens_per_expert_{tag}_over_mean_layer_{layer}")
            assert [s.step for s in scalars] == [2]
            assert scalars[0].value == pytest.approx(value, rel=1e-6)
    assert events.Scalars("moe/tokens_per_expert_max_over_mean")[0].value == pytest.approx(
        max(r[0] for r in ratios.values()), rel=1e-6
    )
    assert events.Scalars("moe/tokens_per_expert_min_over_mean")[0].value == pytest.approx(
        min(r[1] for r in ratios.values()), rel=1e-6
    )


class _Writers:
    def __init__(self) -> None:
        self.points: dict[str, tuple[int, float]] = {}

    def scalar(self, tag: str, value: float, iteration: int) -> None:
        self.points[tag] = (iteration, value)


def test_one_process_logger_counts_each_micro_batch_of_the_saving_iterations(tmp_path):
    """Dense layer 1 between MoE layers 0 and 2; only iteration 2 of 1..3 is written; the model's
    forward in training mode, as the trainer runs it."""
    from megatron_lite.core.models.gpt import GPTModel
    from megatron_lite.core.transformer.moe.tokens_per_expert import TokensPerExpertLogger

    flags = (
        "--num-layers 3 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --mock-data --lr 1e-3 "
        "--micro-batch-size 2 --train-iters 3 --num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 24 "
        f"--moe-layer-freq 2 --swiglu --save {tmp_path} --save-interval 10 --save-tokens-per-expert-interval 2"
    )
    torch.manual_seed(0)
    cfg = parse_config(flags.split()).finalize(1, 250)
    model = GPTModel(cfg).train()
    logger = TokensPerExpertLogger(cfg, model)
    writers, direct, written = _Writers(), [], {}
    handle = _count_choices(direct)
    try:
        for iteration in (1, 2, 3):
            logger.start(iteration)
            for _ in range(2):
                model(torch.randint(0, 250, (2, 16)))
            result = logger.finish(writers)
            assert (result is not None) == (iteration == 2)
            written = result or written
    finally:
        handle.remove()
    # Iteration 2's choices: [micro batch][layer] -> counts over the 4 experts (all local at EP 1).
    chosen = [{layer: c for layer, c in direct[4 + 2 * mb : 6 + 2 * mb]} for mb in range(2)]
    assert len(direct) == 12 and sorted(chosen[0]) == [0, 2]
    lines = [json.loads(line) for line in (tmp_path / "tokens_per_expert" / "rank0.jsonl").open()]
    assert [(x["iter"], x["layer"]) for x in lines] == [(2, 0), (2, 2)]
    for line in lines:
        assert line["tpe"] == [mb[line["layer"]] for mb in chosen]
        assert all(sum(mb) == 2 * 16 * 2 for mb in line["tpe"])
    totals = {layer: torch.tensor(chosen[0][layer]) + torch.tensor(chosen[1][layer]) for layer in (0, 2)}
    assert sorted(written) == [0, 2] and all(written[i].tolist() == totals[i].tolist() for i in (0, 2))
    high = max((t.max() / t.double().mean()).item() for t in totals.values())
    low = min((t.min() / t.double().mean()).item() for t in totals.values())
    assert writers.points["moe/tokens_per_expert_max_over_mean"] == (2, pytest.approx(high))
    assert writers.points["moe/tokens_per_expert_min_over_mean"] == (2, pytest.approx(low))


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            "--num-experts 4 --save-tokens-per-expert-interval 1",
            "--save-tokens-per-expert-interval writes under --save; give --save DIR",
        ),
        ("--save-tokens-per-expert-interval 1", "it needs --num-experts"),
        ("--num-experts 4 --save x --save-interval 1 --save-tokens-per-expert-interval 0", "interval"),
    ],
)
def test_bad_tokens_per_expert_settings_are_one_line(flags, message):
    base = "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --mock-data --lr 1e-3"
    with pytest.raises(UserError) as err:
        parse_config(f"{base} --micro-batch-size 1 --train-iters 1 {flags}".split()).finalize(1, 250)
    assert message in str(err.value) and "\n" not in str(err.value)
