"""The per-layer tracker of MoE auxiliary losses for logging (Megatron's save_to_aux_losses_tracker and
track_moe_metrics): summed over a step's micro batches, reduced over ranks, averaged over MoE layers."""

from __future__ import annotations

import torch
import torch.distributed as dist

# name -> {"values": [num_layers] tensor, "reduce_tp": bool, "reduce_has_dp": bool}
_TRACKER: dict[str, dict] = {}


def save(
    name: str,
    loss: torch.Tensor,
    layer_number: int,
    num_layers: int,
    *,
    reduce_tp: bool = False,
    reduce_has_dp: bool = False,
) -> None:
    """Add one micro batch's value of a loss (without its coefficient) to layer `layer_number` (1-based).

    Not when activation recompute reruns the forward inside backward: that micro batch was counted."""
    if in_recompute():
        return
    entry = _TRACKER.get(name)
    if entry is None:
        entry = _TRACKER[name] = {"values": torch.zeros(num_layers, device=loss.device)}
    entry["values"][layer_number - 1] += loss.detach().float()
    entry["reduce_tp"] = reduce_tp
    entry["reduce_has_dp"] = reduce_has_dp


def in_recompute() -> bool:
    """Whether this forward is a recomputation inside backward (a backward graph task is running)."""
    return torch._C._current_graph_task_id() != -1


def clear() -> None:
    for entry in _TRACKER.values():
        entry["values"].zero_()


def report(
    track_names: list[str],
    num_layers: int,
    num_moe_layers: int,
    loss_scale: float,
    tp_group: dist.ProcessGroup | None = None,
    dp_group: dist.ProcessGroup | None = None,
) -> dict[str, torch.Tensor]:
    """Each tracked loss per layer [num_layers], times loss_scale (1 / micro batches), then clears.

    As Megatron: the balancing losses are summed over the TP group (each TP rank's share of a sequence-
    parallel batch) and averaged over DP (the global-batch loss already covers DP); the z-loss is the
    logging rank's own. Collective over TP and DP when those have more than one rank. The value Megatron
    logs is the sum over layers / num_moe_layers.
    """
    out = {}
    for name in track_names:
        entry = _TRACKER.get(name)
        values = entry["values"].clone() if entry is not None else torch.zeros(num_layers)
        if entry is not None and entry.get("reduce_tp"):
            if tp_group is not None and dist.get_world_size(tp_group) > 1:
                dist.all_reduce(values, group=tp_group)
            if dp_group is not None and dist.get_world_size(dp_group) > 1:
                # global_aux_loss's group already spans DP (a sum); the others are averaged over it.
                dist.all_reduce(values, group=dp_group)
                if not entry.get("reduce_has_dp"):
                    values /= dist.get_world_size(dp_group)
        out[name] = values * loss_scale
    clear()
    return out


def track_names(cfg) -> list[str]:
    """The losses Megatron's training_log tracks for this config."""
    types = cfg.moe_router_load_balancing_type
    types = types if isinstance(types, list) else [types]
    names = []
    for loss_type, name in (
        ("aux_loss", "load_balancing_loss"),
        ("seq_aux_loss", "seq_load_balancing_loss"),
        ("global_aux_loss", "global_load_balancing_loss"),
    ):
        if loss_type in types:
            names.append(name)
    if cfg.moe_z_loss_coeff is not None:
        names.append("z_loss")
    return names
