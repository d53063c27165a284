"""Megatron-layout `torch_dist` checkpoints: DCP shards that load at any TP/DP size, written atomically."""

# On disk (Megatron-LM's torch_dist layout, readable by megatron-core's dist_checkpointing.load):
#   {dir}/latest_checkpointed_iteration.txt    the newest whole checkpoint's iteration ("release": release/)
#   {dir}/iter_{it:07d}/__{rank}_0.distcp       torch.distributed.checkpoint shards, one file per rank
#   {dir}/iter_{it:07d}/.metadata               DCP's index: Megatron's keys (no "model." prefix, layers
#                                               stacked on a leading global-layer axis, TE norm names,
#                                               padded vocabulary), optimizer.state.<moment>.<key>,
#                                               rng_state and _extra_state ShardedObjects
#   {dir}/iter_{it:07d}/common.pt               Megatron's common state (args Namespace, iteration,
#                                               scheduler, param groups) plus our extras ("megatron_lite")
#   {dir}/iter_{it:07d}/rng_state_{rank}.pt     each rank's RNG streams (ours, beside Megatron's files)
#   {dir}/iter_{it:07d}/metadata.json           Megatron's backend description
#   {dir}/iter_{it:07d}/checksums.json          size and CRC-32 of every file above, written last
#
# The modules: names (directory and file names, the pointer), megatron_keys (Megatron's key and pieces of
# each parameter), chunks (those pieces as DCP entries, and the planners), megatron_state (model and
# optimizer as DCP entries and targets), megatron_common (common.pt, Megatron's args), megatron_load,
# checkpoint_args (--use-checkpoint-args), rng, verify (checksums, intact-checkpoint fallback), publish
# (fsync, renames, leftovers), commit (finishing a save on every rank), save, async_save (--async-save)
# and load. keys, layout, state_dict and common.build_previous_common are this project's previous layout
# ("model." keys, layouts in common.pt), which load still reads.

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
