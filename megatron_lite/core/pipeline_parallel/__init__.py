"""Pipeline parallelism: which layers a stage builds, the stage modules, tied embeddings, the schedules."""

# How it composes (see docs/pipeline-parallelism.md):
# - layers.py: Megatron's split (even, uneven first/last, embedding/loss counted, virtual stages).
# - stage.py: a stage is a GPTModel with a layer range and pre_process/post_process; schedule.py runs the
#   chunks with torch.distributed.pipelining (Schedule1F1B, ScheduleInterleaved1F1B) and the trainer's
#   own loss function; embedding_group.py sums the tied embeddings' gradient of the first and last stage.
# - checkpoint_view.py names a rank's parameters as in the whole model, for checkpoints.

from megatron_lite.core.pipeline_parallel.layers import PipelineSplit

__all__ = ["PipelineSplit"]
