"""Megatron-layout `torch_dist` checkpoints: DCP shards that load at any TP/DP size, written atomically."""

# On disk (Megatron's layout):
#   {dir}/latest_checkpointed_iteration.txt    the newest whole checkpoint's iteration
#   {dir}/iter_{it:07d}/__{rank}_0.distcp       torch.distributed.checkpoint shards, one file per rank
#   {dir}/iter_{it:07d}/.metadata               DCP's index of the shards
#   {dir}/iter_{it:07d}/common.pt               iteration, data position, scheduler, config, tensor layouts
#   {dir}/iter_{it:07d}/rng_state_{rank}.pt     each rank's RNG streams
#   {dir}/iter_{it:07d}/metadata.json           Megatron's backend description
#   {dir}/iter_{it:07d}/checksums.json          size and CRC-32 of every file above, written last
#
# The modules: names (directory and file names, the pointer), keys (which tensors, under which keys),
# layout (how a tensor is sharded on disk), state_dict (model and optimizer as DCP shards and targets),
# common (common.pt, metadata.json), rng, verify (checksums, intact-checkpoint fallback), publish
# (fsync, renames, leftovers), commit (finishing a save on every rank), save, async_save (--async-save)
# and load.

from megatron_lite.training.checkpointing.async_save import (
    abandon_async_save,
    async_save_pending,
    finalize_async_save,
)
from megatron_lite.training.checkpointing.common import CHECKPOINT_VERSION, load_saved_config
from megatron_lite.training.checkpointing.keys import VOCAB_PARAM_SUFFIXES
from megatron_lite.training.checkpointing.load import load_checkpoint, load_model_weights, read_full_tensors
from megatron_lite.training.checkpointing.names import (
    CHECKSUMS_FILENAME,
    COMMON_FILENAME,
    DCP_METADATA_FILENAME,
    METADATA_FILENAME,
    TRACKER_FILENAME,
    iteration_dir_name,
    read_latest_iteration,
    rng_file_name,
)
from megatron_lite.training.checkpointing.rng import reseed_value
from megatron_lite.training.checkpointing.save import save_checkpoint
from megatron_lite.training.checkpointing.verify import file_checksum, verify_checkpoint

__all__ = [
    "CHECKPOINT_VERSION",
    "CHECKSUMS_FILENAME",
    "COMMON_FILENAME",
    "DCP_METADATA_FILENAME",
    "METADATA_FILENAME",
    "TRACKER_FILENAME",
    "VOCAB_PARAM_SUFFIXES",
    "abandon_async_save",
    "async_save_pending",
    "file_checksum",
    "finalize_async_save",
    "iteration_dir_name",
    "load_checkpoint",
    "load_model_weights",
    "load_saved_config",
    "read_full_tensors",
    "read_latest_iteration",
    "reseed_value",
    "rng_file_name",
    "save_checkpoint",
    "verify_checkpoint",
]
