"""Process groups for tensor, context, data and pipeline parallelism, built from torchrun's environment."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_lite.errors import fail


@dataclass
class ParallelState:
    """Where this process sits in the (pp, dp, cp, tp) grid; in Megatron's rank order TP ranks are adjacent,
    then CP, then DP, then PP (rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank)))."""

    rank: int = 0
    world_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    pp_rank: int = 0
    pp_size: int = 1
    pp_group: dist.ProcessGroup | None = None
    # The first and last pipeline stage at this (dp, tp) place: they hold the tied word embeddings.
    embedding_group: dist.ProcessGroup | None = None
    # Context parallelism: the ranks holding the other chunks of the same sequences.
    cp_rank: int = 0
    cp_size: int = 1
    cp_group: dist.ProcessGroup | None = None
    # The ranks that hold the same weights and different data (DP x CP): gradients and the summed loss
    # are reduced over them (Megatron's data-parallel group with context parallelism). DP alone at CP=1.
    dp_cp_group: dist.ProcessGroup | None = None
    mesh: DeviceMesh | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_last_rank(self) -> bool:
        """Megatron logs from the last rank."""
        return self.rank == self.world_size - 1

    @property
    def is_first_rank(self) -> bool:
        return self.rank == 0

    @property
    def grad_group(self) -> dist.ProcessGroup | None:
        """The group gradients, loss sums and optimizer shards are reduced over: DP, or DP x CP."""
        return self.dp_cp_group if self.cp_size > 1 else self.dp_group

    @property
    def grad_size(self) -> int:
        return self.dp_size * self.cp_size

    @property
    def is_pipeline_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_pipeline_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def pick_device(choice: str = "auto") -> torch.device:
    """cuda when asked or available (auto), else cpu; under torchrun each rank takes its LOCAL_RANK GPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        fail("--device cuda was given but no CUDA GPU is visible; use --device cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    *,
    device: str = "auto",
    backend: str | None = None,
    timeout_minutes: float = 10.0,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
) -> ParallelState:
    """Join the process group torchrun describes (if any) and build the (pp, dp, cp, tp) mesh."""
    torch_device = pick_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and not dist.is_initialized():
        needed = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
        if needed != 1:
            fail(
                f"--tensor-model-parallel-size {tensor_model_parallel_size} x --pipeline-model-parallel-size "
                f"{pipeline_model_parallel_size} x --context-parallel-size {context_parallel_size} needs that "
                f"many processes; launch with torchrun --nproc_per_node={needed}"
            )
        return ParallelState(device=torch_device)
    if backend == "nccl" and torch_device.type != "cuda":
        fail("--distributed-backend nccl needs CUDA GPUs; leave it out (gloo is used on CPU) or pass gloo")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            device_id=torch_device if torch_device.type == "cuda" else None,
            **_restart_store(timeout),
        )
    world_size = dist.get_world_size()
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    if world_size % (tp * pp * cp) != 0:
        fail(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}" + (f" x --context-parallel-size {cp}" if cp > 1 else "")
        )
    dp = world_size // (tp * pp * cp)
    # Row-major over (pp, dp, cp, tp): Megatron's order, TP fastest.
    mesh = init_device_mesh(
        torch_device.type,
        (pp, dp, cp, tp),
        mesh_dim_names=("pp", "dp", "cp", "tp"),
        backend_override=_subgroup_timeouts(dist.get_backend(), timeout),
    )
    return ParallelState(
        rank=dist.get_rank(),
        world_size=world_size,
        tp_rank=mesh.get_local_rank("tp"),
        tp_size=tp,
        dp_rank=mesh.get_local_rank("dp"),
        dp_size=dp,
        tp_group=mesh["tp"].get_group(),
        dp_group=mesh["dp"].get_group(),
        pp_rank=mesh.get_local_rank("pp"),
        pp_size=pp,
        pp_group=mesh["pp"].get_group(),
        embedding_group=_embedding_group(mesh, timeout) if pp > 1 else None,
        cp_rank=mesh.get_local_rank("cp"),
        cp_size=cp,
        cp_group=mesh["cp"].get_group(),
        dp_cp_group=_dp_cp_group(mesh, timeout) if cp > 1 else None,
        mesh=mesh,
        device=torch_device,
    )


def _restart_store(timeout: datetime.timedelta) -> dict[str, object]:
    """Under torchrun's agent store, this attempt's own key space in it (init_process_group arguments).

    torchrun keeps one store for all restarts. Without a prefix a restarted rank can read a key a
    dead worker of the previous attempt left (its gloo address) and fail to connect; observed with
    torch 2.13 and both static and c10d rendezvous. Empty (torch's env:// default) outside torchrun.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {
        "store": dist.PrefixStore(f"megatron_lite/attempt_{attempt}/", store),
        "rank": int(os.environ["RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
    }


def _subgroup_timeouts(backend: str, timeout: datetime.timedelta) -> dict[str, tuple[str, object]] | None:
    """Give the mesh's TP and DP groups the run's collective timeout: without options torch creates
    them with its 30-minute default, and a stalled rank inside a TP collective would hang the others."""
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
    elif backend == "nccl" and hasattr(dist, "ProcessGroupNCCL"):
        options = dist.ProcessGroupNCCL.Options()
    else:
        return None
    options._timeout = timeout
    return {name: (backend, options) for name in ("pp", "dp", "cp", "tp")}


def _embedding_group(mesh: DeviceMesh, timeout: datetime.timedelta) -> dist.ProcessGroup:
    """Megatron's embedding group of this rank: the first and last pipeline stage at its (dp, tp) place.

    Every rank creates every group (new_group is collective), in the same order.
    """
    ranks = mesh.mesh  # [pp, dp, cp, tp] global ranks
    mine = None
    for d in range(ranks.shape[1]):
        for c in range(ranks.shape[2]):
            for t in range(ranks.shape[3]):
                members = [int(ranks[0, d, c, t]), int(ranks[-1, d, c, t])]
                group = dist.new_group(members, timeout=timeout)
                if dist.get_rank() in members:
                    mine = group
    return mine


def _dp_cp_group(mesh: DeviceMesh, timeout: datetime.timedelta) -> dist.ProcessGroup:
    """The DP x CP ranks at this rank's (pp, tp) place: one group per place, all created by every rank."""
    ranks = mesh.mesh  # [pp, dp, cp, tp]
    mine = None
    for p in range(ranks.shape[0]):
        for t in range(ranks.shape[3]):
            members = sorted(int(r) for r in ranks[p, :, :, t].flatten())
            group = dist.new_group(members, timeout=timeout)
            if dist.get_rank() in members:
                mine = group
    return mine


def destroy_parallel() -> None:
    """Leave the process group so the next run in this process starts clean."""
    if dist.is_initialized():
        dist.destroy_process_group()
