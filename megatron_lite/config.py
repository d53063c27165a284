"""The one source of truth for a run: a typed dataclass of Megatron's settings, validated once."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from megatron_lite.errors import fail

# Each field's metadata holds its help text, and optionally "flag" (a flag name that differs from the
# field name) and "choices". Field names are Megatron's flag names with dashes turned into underscores.


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its help text; lists get a fresh default each time."""
    meta["help"] = help
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class MegatronConfig:
    """Every setting of a training run; filled from flags and YAML by `arguments.parse_config`."""

    # ---- model -------------------------------------------------------------------------------------
    num_layers: int | None = _f(None, "Number of transformer layers.", group="model")
    hidden_size: int | None = _f(None, "Transformer hidden size.", group="model")
    num_attention_heads: int | None = _f(None, "Number of attention heads.", group="model")
    ffn_hidden_size: int | None = _f(
        None, "MLP hidden size (default 4*hidden, or int(8h/3/64)*64 with --swiglu).", group="model"
    )
    kv_channels: int | None = _f(None, "Projection size per head (default hidden/heads).", group="model")
    group_query_attention: bool = _f(False, "Use grouped-query attention.", group="model")
    num_query_groups: int = _f(1, "Number of key/value groups with --group-query-attention.", group="model")
    seq_length: int | None = _f(None, "Sequence length of a training sample.", group="model")
    max_position_embeddings: int | None = _f(
        None, "Maximum sequence length the position embeddings cover.", group="model"
    )
    position_embedding_type: str = _f(
        "learned_absolute", "Position embedding.", choices=["learned_absolute", "rope", "none"], group="model"
    )
    rotary_base: int = _f(10000, "RoPE base.", group="model")
    rotary_percent: float = _f(1.0, "Fraction of each head's dimensions that RoPE rotates.", group="model")
    normalization: str = _f(
        "LayerNorm", "Normalization layer.", choices=["LayerNorm", "RMSNorm"], group="model"
    )
    norm_epsilon: float = _f(1e-5, "Epsilon of the normalization layers.", group="model")
    untie_embeddings_and_output_weights: bool = _f(
        False, "Give the output layer its own weights instead of the input embedding's.", group="model"
    )
    disable_bias_linear: bool = _f(False, "Drop the biases of all linear layers.", group="model")
    add_qkv_bias: bool = _f(
        False, "Keep the QKV bias even with --disable-bias-linear (Qwen-style).", group="model"
    )
    disable_qkv_bias: bool = _f(False, "Drop only the QKV projection's bias.", group="model")
    swiglu: bool = _f(False, "Use SwiGLU in the MLP instead of GELU.", group="model")
    attention_dropout: float = _f(0.1, "Dropout on attention probabilities.", group="model")
    hidden_dropout: float = _f(0.1, "Dropout on the embeddings and on each residual branch.", group="model")
    init_method_std: float = _f(
        0.02, "Std of the normal weight init (output projections: std/sqrt(2L)).", group="model"
    )
    make_vocab_size_divisible_by: int = _f(
        128, "Pad the vocabulary to a multiple of this times the TP size.", group="model"
    )
    vocab_size: int | None = _f(None, "Vocabulary size (default: the tokenizer's).", group="model")

    # ---- training ----------------------------------------------------------------------------------
    micro_batch_size: int | None = _f(
        None, "Samples per micro batch per data-parallel rank.", group="training"
    )
    global_batch_size: int | None = _f(
        None, "Samples per optimizer step (default micro-batch-size x data-parallel size).", group="training"
    )
    train_iters: int | None = _f(None, "Number of optimizer steps.", group="training")
    train_samples: int | None = _f(
        None, "Number of training samples (instead of --train-iters).", group="training"
    )
    lr: float | None = _f(None, "Peak learning rate.", group="training")
    min_lr: float = _f(0.0, "Learning rate at the end of decay.", group="training")
    lr_decay_style: str = _f(
        "linear", "Learning-rate decay.", choices=["constant", "linear", "cosine"], group="training"
    )
    lr_decay_iters: int | None = _f(
        None, "Iterations to decay over (default --train-iters).", group="training"
    )
    lr_decay_samples: int | None = _f(None, "Samples to decay over (with --train-samples).", group="training")
    lr_warmup_iters: int = _f(0, "Linear warmup iterations.", group="training")
    lr_warmup_samples: int = _f(0, "Linear warmup samples (with --train-samples).", group="training")
    lr_warmup_fraction: float | None = _f(None, "Warmup as a fraction of the decay span.", group="training")
    lr_warmup_init: float = _f(0.0, "Learning rate at the start of warmup.", group="training")
    optimizer: str = _f("adam", "Optimizer (AdamW-style Adam).", choices=["adam"], group="training")
    weight_decay: float = _f(
        0.01, "Decoupled weight decay (not applied to biases and norms).", group="training"
    )
    clip_grad: float = _f(1.0, "Clip the global gradient norm to this (0 disables).", group="training")
    adam_beta1: float = _f(0.9, "Adam beta1.", group="training")
    adam_beta2: float = _f(0.999, "Adam beta2.", group="training")
    adam_eps: float = _f(1e-8, "Adam epsilon.", group="training")
    bf16: bool = _f(False, "Train with bf16 autocast (CPU and GPU).", group="training")
    fp16: bool = _f(False, "Train with fp16 autocast and dynamic loss scaling (GPU).", group="training")
    loss_scale: float | None = _f(None, "Static loss scale for --fp16 (default dynamic).", group="training")
    initial_loss_scale: float = _f(2.0**32, "Initial dynamic loss scale.", group="training")
    min_loss_scale: float = _f(1.0, "Smallest dynamic loss scale.", group="training")
    loss_scale_window: int = _f(1000, "Good iterations before the loss scale grows.", group="training")
    hysteresis: int = _f(2, "Overflows tolerated before the loss scale shrinks.", group="training")
    max_consecutive_skipped_iterations: int = _f(
        20, "Stop the run after this many non-finite iterations in a row.", group="training"
    )
    seed: int = _f(1234, "Random seed of weights, dropout and data order.", group="training")
    device: str = _f(
        "auto",
        "Device: auto (cuda when available), cpu or cuda.",
        choices=["auto", "cpu", "cuda"],
        group="training",
    )
    compile: bool = _f(False, "Compile the model with torch.compile.", group="training")
    fp32_matmul_precision: str = _f(
        "auto",
        "fp32 matmul path: auto (a faster path only if measured faster and fp32-exact), or torch's "
        "highest, high or medium (see torch.set_float32_matmul_precision).",
        choices=["auto", "highest", "high", "medium"],
        group="training",
    )

    # ---- parallelism -------------------------------------------------------------------------------
    tensor_model_parallel_size: int = _f(1, "Tensor-parallel size.", group="parallel")
    pipeline_model_parallel_size: int = _f(
        1, "Pipeline-parallel size (only 1 is supported).", group="parallel"
    )
    sequence_parallel: bool = _f(
        False, "Shard activations outside the TP region along the sequence.", group="parallel"
    )
    use_distributed_optimizer: bool = _f(
        False, "Shard optimizer state over data-parallel ranks.", group="parallel"
    )
    recompute_activations: bool = _f(
        False, "Recompute the attention core in backward (selective).", group="parallel"
    )
    recompute_granularity: str | None = _f(
        None, "Activation recompute granularity.", choices=["full", "selective"], group="parallel"
    )
    recompute_method: str | None = _f(
        None, "How layers are chosen for full recompute.", choices=["uniform", "block"], group="parallel"
    )
    recompute_num_layers: int | None = _f(
        None, "Layers per recompute chunk (uniform) or recomputed (block).", group="parallel"
    )
    distributed_backend: str | None = _f(
        None,
        "torch.distributed backend (default: nccl on GPU, gloo on CPU).",
        choices=["nccl", "gloo"],
        group="parallel",
    )
    distributed_timeout_minutes: float = _f(10.0, "Timeout of collectives, in minutes.", group="parallel")

    # ---- data --------------------------------------------------------------------------------------
    data_path: list[str] | None = _f(
        None, "Dataset prefixes, optionally weighted: 0.3 A 0.7 B.", nargs="*", group="data"
    )
    split: str | None = _f(None, "Train/valid/test split of the documents (default 969,30,1).", group="data")
    train_data_path: list[str] | None = _f(
        None, "Training dataset prefixes (instead of --split).", nargs="*", group="data"
    )
    valid_data_path: list[str] | None = _f(None, "Validation dataset prefixes.", nargs="*", group="data")
    test_data_path: list[str] | None = _f(None, "Test dataset prefixes.", nargs="*", group="data")
    data_cache_path: str | None = _f(
        None, "Where dataset index caches go (default: next to the data).", group="data"
    )
    num_workers: int = _f(2, "Data loader worker processes.", group="data")
    mock_data: bool = _f(False, "Train on synthetic random tokens instead of --data-path.", group="data")
    tokenizer_type: str | None = _f(
        None, "Tokenizer.", choices=["GPT2BPETokenizer", "ByteTokenizer"], group="data"
    )
    vocab_file: str | None = _f(None, "GPT-2 encoder.json (default: the bundled one).", group="data")
    merge_file: str | None = _f(None, "GPT-2 vocab.bpe merges (default: the bundled one).", group="data")
    reset_position_ids: bool = _f(
        False, "Restart position ids after each end-of-document token.", group="data"
    )
    reset_attention_mask: bool = _f(False, "Do not attend across end-of-document tokens.", group="data")
    eod_mask_loss: bool = _f(False, "Exclude end-of-document tokens from the loss.", group="data")

    # ---- checkpointing -----------------------------------------------------------------------------
    save: str | None = _f(None, "Directory to save checkpoints to.", group="checkpointing")
    save_interval: int | None = _f(None, "Iterations between checkpoints.", group="checkpointing")
    load: str | None = _f(None, "Directory to load a checkpoint from.", group="checkpointing")
    no_save_optim: bool = _f(False, "Do not save the optimizer state.", group="checkpointing")
    no_save_rng: bool = _f(False, "Do not save the RNG state.", group="checkpointing")
    no_load_optim: bool = _f(False, "Do not load the optimizer state.", group="checkpointing")
    no_load_rng: bool = _f(False, "Do not load the RNG state.", group="checkpointing")
    finetune: bool = _f(False, "Load only the weights; start at iteration 0.", group="checkpointing")
    ckpt_format: str = _f("torch_dist", "Checkpoint format.", choices=["torch_dist"], group="checkpointing")
    exit_on_missing_checkpoint: bool = _f(False, "Exit if --load has no checkpoint.", group="checkpointing")
    save_keep_last: int | None = _f(None, "Keep only the newest K checkpoints.", group="checkpointing")

    # ---- logging and exit --------------------------------------------------------------------------
    log_interval: int = _f(100, "Iterations between console log lines.", group="logging")
    eval_interval: int = _f(1000, "Iterations between evaluations.", group="logging")
    eval_iters: int = _f(100, "Batches per evaluation.", group="logging")
    skip_train: bool = _f(False, "Only evaluate.", group="logging")
    tensorboard_dir: str | None = _f(None, "Write TensorBoard logs here.", group="logging")
    tensorboard_log_interval: int = _f(1, "Iterations between TensorBoard points.", group="logging")
    tensorboard_queue_size: int = _f(1000, "TensorBoard event queue size.", group="logging")
    log_throughput: bool = _f(False, "Print TFLOP/s in the log line.", group="logging")
    log_timers_to_tensorboard: bool = _f(
        False, "Write iteration time and throughput to TensorBoard.", group="logging"
    )
    log_validation_ppl_to_tensorboard: bool = _f(
        False, "Write validation perplexity to TensorBoard.", group="logging"
    )
    log_memory_to_tensorboard: bool = _f(False, "Write memory use to TensorBoard.", group="logging")
    log_params_norm: bool = _f(False, "Compute and log the parameter norm.", group="logging")
    peak_tflops: float | None = _f(
        None, "Device peak TFLOP/s for MFU (default: a table of GPUs, or measured on CPU).", group="logging"
    )
    exit_interval: int | None = _f(
        None, "Save and exit when the iteration is divisible by this.", group="logging"
    )
    exit_duration_in_mins: float | None = _f(None, "Save and exit after this many minutes.", group="logging")
    exit_signal_handler: bool = _f(
        True, "Save and exit on SIGTERM/SIGINT (always on in megatron-lite).", group="logging"
    )

    # ---- derived (filled by finalize(), not flags) -------------------------------------------------
    world_size: int = _f(1, "Number of processes.", derived=True)
    data_parallel_size: int = _f(1, "world / TP.", derived=True)
    padded_vocab_size: int | None = _f(None, "Vocabulary padded for TP and speed.", derived=True)

    # ------------------------------------------------------------------------------------------------
    @property
    def num_microbatches(self) -> int:
        """Micro batches per optimizer step on each data-parallel rank."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def add_bias_linear(self) -> bool:
        return not self.disable_bias_linear

    @property
    def qkv_bias(self) -> bool:
        """Whether the fused QKV projection has a bias."""
        if self.disable_qkv_bias:
            return False
        return self.add_bias_linear or self.add_qkv_bias

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view for checkpoints, TensorBoard and YAML."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MegatronConfig:
        """Rebuild a config saved by to_dict, ignoring keys that a newer or older version lacks."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def finalize(self, world_size: int = 1, vocab_size: int | None = None) -> MegatronConfig:
        """Fill derived values and check the whole config once; raises UserError naming the flag."""
        self.world_size = world_size
        if vocab_size is not None and self.vocab_size is None:
            self.vocab_size = vocab_size
        _derive_model(self)
        _derive_parallel(self)
        _derive_training(self)
        _check(self)
        return self


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _require(cfg: MegatronConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) is None:
            fail(f"{_flag(name)} is required")


def _derive_model(cfg: MegatronConfig) -> None:
    _require(cfg, "num_layers", "hidden_size", "num_attention_heads")
    if cfg.seq_length is None and cfg.max_position_embeddings is not None:
        cfg.seq_length = cfg.max_position_embeddings
    if cfg.max_position_embeddings is None and cfg.seq_length is not None:
        cfg.max_position_embeddings = cfg.seq_length
    _require(cfg, "seq_length")
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if getattr(cfg, name) <= 0:
            fail(f"{_flag(name)} must be positive, got {getattr(cfg, name)}")
    if cfg.kv_channels is None:
        if cfg.hidden_size % cfg.num_attention_heads != 0:
            fail(
                f"--hidden-size {cfg.hidden_size} is not divisible by --num-attention-heads "
                f"{cfg.num_attention_heads}; pick sizes that divide or set --kv-channels"
            )
        cfg.kv_channels = cfg.hidden_size // cfg.num_attention_heads
    if cfg.ffn_hidden_size is None:
        if cfg.swiglu:
            cfg.ffn_hidden_size = int((4 * cfg.hidden_size * 2 / 3) / 64) * 64
        else:
            cfg.ffn_hidden_size = 4 * cfg.hidden_size
    if not cfg.group_query_attention:
        cfg.num_query_groups = cfg.num_attention_heads
    if cfg.num_attention_heads % cfg.num_query_groups != 0:
        fail(
            f"--num-attention-heads {cfg.num_attention_heads} is not divisible by --num-query-groups "
            f"{cfg.num_query_groups}"
        )
    if cfg.seq_length > cfg.max_position_embeddings:
        fail(
            f"--seq-length {cfg.seq_length} is larger than --max-position-embeddings "
            f"{cfg.max_position_embeddings}; raise --max-position-embeddings or shorten --seq-length"
        )
    if cfg.position_embedding_type == "rope":
        rotary_dim = int(cfg.kv_channels * cfg.rotary_percent)
        if rotary_dim <= 0 or rotary_dim % 2 != 0:
            fail(
                f"--rotary-percent {cfg.rotary_percent} of head size {cfg.kv_channels} rotates {rotary_dim} "
                "dimensions; RoPE needs a positive even number"
            )
    for name in ("attention_dropout", "hidden_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            fail(f"{_flag(name)} must be in [0, 1), got {getattr(cfg, name)}")


def pad_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's padded vocabulary: the next multiple of divisible_by * tp_size."""
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def _derive_parallel(cfg: MegatronConfig) -> None:
    tp = cfg.tensor_model_parallel_size
    if tp < 1:
        fail(f"--tensor-model-parallel-size must be >= 1, got {tp}")
    if cfg.pipeline_model_parallel_size != 1:
        fail(
            "--pipeline-model-parallel-size > 1 is not supported by megatron-lite; use tensor and data parallelism"
        )
    if cfg.world_size % tp != 0:
        fail(f"world size {cfg.world_size} is not divisible by --tensor-model-parallel-size {tp}")
    cfg.data_parallel_size = cfg.world_size // tp
    if cfg.num_attention_heads % tp != 0:
        fail(
            f"--num-attention-heads {cfg.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}"
        )
    if cfg.num_query_groups % tp != 0:
        fail(
            f"--num-query-groups {cfg.num_query_groups} is not divisible by --tensor-model-parallel-size {tp}"
        )
    if cfg.ffn_hidden_size % tp != 0:
        fail(f"--ffn-hidden-size {cfg.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
    if tp == 1:
        cfg.sequence_parallel = False
    if cfg.sequence_parallel and cfg.seq_length % tp != 0:
        fail(f"--sequence-parallel needs --seq-length {cfg.seq_length} divisible by TP size {tp}")
    if cfg.vocab_size is not None:
        cfg.padded_vocab_size = pad_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
    if cfg.recompute_activations:
        cfg.recompute_granularity = "selective"
    if cfg.recompute_granularity == "full":
        if cfg.recompute_method is None:
            fail("--recompute-granularity full needs --recompute-method uniform or block")
        if cfg.recompute_num_layers is None:
            cfg.recompute_num_layers = 1
        if not 1 <= cfg.recompute_num_layers <= cfg.num_layers:
            fail(f"--recompute-num-layers must be between 1 and --num-layers {cfg.num_layers}")


def _derive_training(cfg: MegatronConfig) -> None:
    _require(cfg, "micro_batch_size")
    if cfg.micro_batch_size <= 0:
        fail(f"--micro-batch-size must be positive, got {cfg.micro_batch_size}")
    per_step = cfg.micro_batch_size * cfg.data_parallel_size
    if cfg.global_batch_size is None:
        cfg.global_batch_size = per_step
    if cfg.global_batch_size <= 0 or cfg.global_batch_size % per_step != 0:
        fail(
            f"--global-batch-size {cfg.global_batch_size} is not divisible by --micro-batch-size "
            f"{cfg.micro_batch_size} x data-parallel size {cfg.data_parallel_size}"
        )
    if (cfg.train_iters is None) == (cfg.train_samples is None):
        fail("give exactly one of --train-iters and --train-samples")
    if cfg.train_samples is not None:
        # Megatron trains on samples; we keep a fixed global batch, so samples map onto iterations.
        cfg.train_iters = cfg.train_samples // cfg.global_batch_size
        if cfg.lr_decay_samples is not None and cfg.lr_decay_iters is None:
            cfg.lr_decay_iters = cfg.lr_decay_samples // cfg.global_batch_size
        if cfg.lr_warmup_samples and not cfg.lr_warmup_iters:
            cfg.lr_warmup_iters = cfg.lr_warmup_samples // cfg.global_batch_size
    if cfg.train_iters < 0:
        fail(f"--train-iters must be >= 0, got {cfg.train_iters}")
    _require(cfg, "lr")
    if cfg.lr_decay_iters is None:
        cfg.lr_decay_iters = cfg.train_iters
    if cfg.lr_warmup_fraction is not None and cfg.lr_warmup_iters:
        fail("--lr-warmup-fraction and --lr-warmup-iters are exclusive; give one")
    if cfg.min_lr > cfg.lr:
        fail(f"--min-lr {cfg.min_lr} is larger than --lr {cfg.lr}")
    if cfg.bf16 and cfg.fp16:
        fail("--bf16 and --fp16 are exclusive; give one")
    if cfg.data_path is not None and len(cfg.data_path) == 0:
        cfg.data_path = None


def _check(cfg: MegatronConfig) -> None:
    split_paths = (cfg.train_data_path, cfg.valid_data_path, cfg.test_data_path)
    if not cfg.mock_data and cfg.data_path is None and all(p is None for p in split_paths):
        fail("no training data: give --data-path PREFIX (from tools/preprocess_data.py) or --mock-data")
    if cfg.data_path is not None and any(p is not None for p in split_paths):
        fail("--data-path and --train/valid/test-data-path are exclusive; give one kind")
    if cfg.split is not None and any(p is not None for p in split_paths):
        fail("--split applies to --data-path only, not to --train/valid/test-data-path")
    if cfg.save is not None and cfg.save_interval is None:
        fail("--save needs --save-interval")
    if cfg.save_interval is not None and cfg.save_interval <= 0:
        fail(f"--save-interval must be positive, got {cfg.save_interval}")
    for name in ("log_interval", "eval_interval", "tensorboard_log_interval"):
        if getattr(cfg, name) <= 0:
            fail(f"{_flag(name)} must be positive, got {getattr(cfg, name)}")
    if cfg.eval_iters < 0:
        fail(f"--eval-iters must be >= 0, got {cfg.eval_iters}")
    if cfg.save_keep_last is not None and cfg.save_keep_last < 1:
        fail(f"--save-keep-last must be >= 1, got {cfg.save_keep_last}")


def config_fields() -> list[dataclasses.Field]:
    """The user-settable fields (flags and YAML keys), in declaration order."""
    return [f for f in dataclasses.fields(MegatronConfig) if not f.metadata.get("derived")]
