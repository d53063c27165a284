"""What the training loop does for MoE models: expert-gradient reduction, the auxiliary-loss backward
scale, the aux-loss-free bias update, and the values Megatron logs (losses, tokens per expert)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config.moe_checks import parse_moe_layer_freq
from megatron_lite.core.transformer.moe import aux_losses
from megatron_lite.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_updated_expert_bias
from megatron_lite.core.transformer.moe.parallel import ExpertParallelState
from megatron_lite.core.transformer.moe.tokens_per_expert import TokensPerExpertLogger


def expert_parameter_names(module: nn.Module) -> list[str]:
    """Names of the routed experts' parameters: DDP leaves them out, they are reduced over expert DP."""
    return [name for name, p in module.named_parameters() if getattr(p, "is_expert", False)]


def set_aux_loss_scale(scale: float) -> None:
    """The gradient the auxiliary losses of the next backward get (the lm loss's factor: loss scale /
    micro batches, Megatron's MoEAuxLossAutoScaler.set_loss_scale)."""
    MoEAuxLossAutoScaler.set_loss_scale(scale)


def reduce_expert_gradients(module: nn.Module, ep: ExpertParallelState) -> None:
    """Sum the experts' gradients over their expert-data-parallel group and divide by the dense DP size
    (Megatron's expert_gradient_scaling_factor): each expert already saw the tokens of every EP rank."""
    grads = [p.grad for p in module.parameters() if getattr(p, "is_expert", False) and p.grad is not None]
    if not grads or ep.dp_size == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).div_(ep.dp_size)
    if ep.edp_size > 1:
        dist.all_reduce(flat, group=ep.edp_group)
    for grad, chunk in zip(grads, torch.split(flat, [g.numel() for g in grads])):
        grad.copy_(chunk.view_as(grad))


def routers(module: nn.Module) -> list[nn.Module]:
    from megatron_lite.core.transformer.moe.router import TopKRouter

    return [m for m in module.modules() if isinstance(m, TopKRouter)]


def update_expert_bias(module: nn.Module, cfg, tp_group, dp_group) -> None:
    """After a step's backward: the routers' token counts summed over TP x DP move each expert bias by
    +-rate (DeepSeek-V3's aux-loss-free balancing); the counts restart."""
    found = [r for r in routers(module) if r.enable_expert_bias]
    if not found:
        return
    counts = torch.stack([r.local_tokens_per_expert for r in found])
    for group in (tp_group, dp_group):
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
    with torch.no_grad():
        for router, c in zip(found, counts):
            router.expert_bias.copy_(
                get_updated_expert_bias(c, router.expert_bias, cfg.moe_router_bias_update_rate)
            )
            router.local_tokens_per_expert.zero_()


def reset_global_aux_loss(module: nn.Module) -> None:
    for router in routers(module):
        router.reset_global_aux_loss_tracker()


def num_moe_layers(cfg) -> int:
    return sum(parse_moe_layer_freq(cfg.moe_layer_freq, cfg.num_layers))


def moe_step_losses(cfg, num_microbatches: int, tp_group, dp_group, pp_group=None) -> dict[str, torch.Tensor]:
    """This step's tracked losses per layer [num_layers], as Megatron's track_moe_metrics computes them
    (collective over TP, DP and PP)."""
    losses = aux_losses.report(
        aux_losses.track_names(cfg),
        cfg.num_layers,
        num_moe_layers(cfg),
        1.0 / num_microbatches,
        tp_group=tp_group if cfg.sequence_parallel else None,
        dp_group=dp_group,
    )
    if pp_group is not None and losses:
        # Each pipeline stage tracked only its own layers (the others are zero): the sum has every layer,
        # on every stage, as Megatron reduces the tracker over the pipeline group.
        stacked = torch.stack(list(losses.values()))
        dist.all_reduce(stacked, group=pp_group)
        losses = dict(zip(losses, stacked.unbind(0)))
    return losses


def expert_parallel_state(module: nn.Module, dp_size: int) -> ExpertParallelState:
    """The expert groups the model was built with (any chunk's: the stages share them), or the trivial ones."""
    for sub in module.modules():
        state = getattr(sub, "expert_parallel", None)
        if state is not None:
            return state
    return ExpertParallelState(dp_size=dp_size)


def tokens_per_expert(module: nn.Module) -> dict[int, torch.Tensor]:
    """The last forward's tokens per local expert of each MoE layer (layer number -> [local experts])."""
    from megatron_lite.core.transformer.moe.moe_layer import MoELayer

    return {
        m.layer_number: m.tokens_per_expert
        for m in module.modules()
        if isinstance(m, MoELayer) and m.tokens_per_expert is not None
    }


class MoETrainingHooks:
    """The MoE steps of one run's training loop, in the order the trainer calls them."""

    def __init__(self, cfg, pstate, module: nn.Module) -> None:
        self.cfg = cfg
        self.module = module
        self.ep = expert_parallel_state(module, pstate.dp_size)
        self.tp_group = pstate.tp_group if pstate.tp_size > 1 else None
        self.dp_group = pstate.dp_group if pstate.dp_size > 1 else None
        self.pp_group = pstate.pp_group if getattr(pstate, "pp_size", 1) > 1 else None
        for router in routers(module):
            router.dp_group = self.dp_group
        self.tokens_per_expert = TokensPerExpertLogger.build(cfg, module)  # --save-tokens-per-expert-interval

    @classmethod
    def build(cls, cfg, pstate, module: nn.Module) -> MoETrainingHooks | None:
        return cls(cfg, pstate, module) if cfg.num_experts is not None else None

    def ignore_in_ddp(self, ddp_module: nn.Module) -> None:
        """DDP must neither average the experts' gradients over all DP ranks (EP ranks hold different
        experts) nor broadcast the routers' per-rank token counts."""
        names = [n for n, p in ddp_module.named_parameters() if getattr(p, "is_expert", False)]
        names += [
            n for n, _ in ddp_module.named_buffers() if n.rsplit(".", 1)[-1].endswith("tokens_per_expert")
        ]
        names += [n for n, _ in ddp_module.named_buffers() if n.endswith(".ga_steps")]
        from torch.nn.parallel import DistributedDataParallel

        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(ddp_module, names)

    def before_backward(self, loss_factor: float, iteration: int | None = None) -> None:
        """Before the step's micro batches; `iteration` is the step's number (1-based)."""
        set_aux_loss_scale(loss_factor)
        if self.tokens_per_expert is not None and iteration is not None:
            self.tokens_per_expert.start(iteration)

    def after_backward(self) -> None:
        reduce_expert_gradients(self.module, self.ep)
        update_expert_bias(self.module, self.cfg, self.tp_group, self.dp_group)

    def after_step(self, num_microbatches: int, writers=None) -> dict[str, torch.Tensor]:
        """This step's MoE losses per layer (for the log line and TensorBoard); on the saving iterations of
        --save-tokens-per-expert-interval the tokens per expert go to their files and `writers`."""
        reset_global_aux_loss(self.module)
        if self.tokens_per_expert is not None:
            self.tokens_per_expert.finish(writers)
        return moe_step_losses(self.cfg, num_microbatches, self.tp_group, self.dp_group, self.pp_group)
