"""MegatronConfig.finalize: derived values and the one-line errors for inconsistent settings."""

import pytest

from megatron_lite.arguments import parse_config
from megatron_lite.config import MegatronConfig, pad_vocab_size
from megatron_lite.errors import UserError
from tests.helpers import tiny_config, tiny_flags

BASE = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 "
    "--lr 1e-3 --train-iters 10 --mock-data"
)


def finalized(extra: str = "", world: int = 1, vocab: int | None = 50257) -> MegatronConfig:
    return parse_config(f"{BASE} {extra}".split()).finalize(world, vocab)


def error_of(extra: str, world: int = 1, vocab: int | None = 50257) -> str:
    with pytest.raises(UserError) as err:
        finalized(extra, world, vocab)
    return str(err.value)


def test_derived_model_sizes():
    cfg = finalized()
    assert (cfg.kv_channels, cfg.ffn_hidden_size, cfg.num_query_groups) == (16, 256, 4)
    assert cfg.max_position_embeddings == 32  # follows --seq-length when not given
    assert finalized("--swiglu").ffn_hidden_size == 128  # int(8*64/3/64)*64
    assert finalized("--hidden-size 4096 --num-attention-heads 32 --swiglu").ffn_hidden_size == 10880
    gqa = finalized("--group-query-attention --num-query-groups 2")
    assert gqa.num_query_groups == 2
    assert finalized("--num-query-groups 2").num_query_groups == 4  # ignored without --group-query-attention


def test_padded_vocab_follows_megatron():
    assert finalized().padded_vocab_size == 50304
    assert finalized("--tensor-model-parallel-size 2", world=2).padded_vocab_size == 50432
    assert finalized(vocab=257).padded_vocab_size == 384
    assert finalized("--make-vocab-size-divisible-by 1", vocab=257).padded_vocab_size == 257
    assert pad_vocab_size(50257, 128, 4) == 50688
    assert finalized("--vocab-size 1000").vocab_size == 1000  # an explicit --vocab-size wins


def test_batch_sizes_and_schedule_defaults():
    cfg = finalized(world=2)
    assert (cfg.data_parallel_size, cfg.global_batch_size, cfg.num_microbatches) == (2, 4, 1)
    cfg = finalized("--global-batch-size 16 --tensor-model-parallel-size 2", world=4)
    assert (cfg.data_parallel_size, cfg.num_microbatches) == (2, 4)
    assert finalized().lr_decay_iters == 10


def test_train_samples_become_iterations():
    cfg = parse_config(
        BASE.replace(
            "--train-iters 10", "--train-samples 100 --lr-decay-samples 60 --lr-warmup-samples 8"
        ).split()
    ).finalize(1, 257)
    assert (cfg.train_iters, cfg.lr_decay_iters, cfg.lr_warmup_iters) == (50, 30, 4)


def test_finalize_twice_gives_the_same_config():
    cfg = finalized("--global-batch-size 8")
    before = cfg.to_dict()
    cfg.finalize(1, 50257)
    assert cfg.to_dict() == before


@pytest.mark.parametrize(
    "extra, world, message",
    [
        (
            "--hidden-size 66",
            1,
            "--hidden-size 66 is not divisible by --num-attention-heads 4; pick sizes that divide or set --kv-channels",
        ),
        (
            "--max-position-embeddings 16",
            1,
            "--seq-length 32 is larger than --max-position-embeddings 16; raise --max-position-embeddings or shorten --seq-length",
        ),
        (
            "--global-batch-size 5",
            1,
            "--global-batch-size 5 is not divisible by --micro-batch-size 2 x data-parallel size 1",
        ),
        (
            "--global-batch-size 6",
            2,
            "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2",
        ),
        ("--fp16 --bf16", 1, "--bf16 and --fp16 are exclusive; give one"),
        ("--train-samples 10", 1, "give exactly one of --train-iters and --train-samples"),
        (
            "--lr-warmup-fraction 0.1 --lr-warmup-iters 3",
            1,
            "--lr-warmup-fraction and --lr-warmup-iters are exclusive; give one",
        ),
        ("--min-lr 1", 1, "--min-lr 1.0 is larger than --lr 0.001"),
        ("--save /tmp/x", 1, "--save needs --save-interval"),
        ("--micro-batch-size 0", 1, "--micro-batch-size must be positive, got 0"),
        ("--hidden-dropout 1.0", 1, "--hidden-dropout must be in [0, 1), got 1.0"),
        (
            "--tensor-model-parallel-size 3",
            4,
            "world size 4 is not divisible by --tensor-model-parallel-size 3",
        ),
        (
            "--num-attention-heads 2 --hidden-size 64 --tensor-model-parallel-size 4",
            4,
            "--num-attention-heads 2 is not divisible by --tensor-model-parallel-size 4",
        ),
        (
            "--pipeline-model-parallel-size 2",
            1,
            "world size 1 is not divisible by --tensor-model-parallel-size 1 x --pipeline-model-parallel-size 2",
        ),
        (
            "--group-query-attention --num-query-groups 3",
            1,
            "--num-attention-heads 4 is not divisible by --num-query-groups 3",
        ),
        (
            "--data-path a --train-data-path b",
            1,
            "--data-path and --train/valid/test-data-path are exclusive; give one kind",
        ),
        ("--log-interval 0", 1, "--log-interval must be positive, got 0"),
        (
            "--recompute-granularity full",
            1,
            "--recompute-granularity full needs --recompute-method uniform or block",
        ),
        (
            "--position-embedding-type rope --kv-channels 3",
            1,
            "--rotary-percent 1.0 of head size 3 rotates 3 dimensions; RoPE needs a positive even number",
        ),
    ],
)
def test_config_errors_name_the_flag(extra, world, message):
    assert error_of(extra, world) == message


def test_required_values_and_data():
    cfg = parse_config(BASE.replace("--lr 1e-3", "").split())
    with pytest.raises(UserError, match=r"^--lr is required$"):
        cfg.finalize(1, 257)
    cfg = parse_config(BASE.replace("--mock-data", "").split())
    with pytest.raises(
        UserError,
        match=r"^no training data: give --data-path PREFIX \(from tools/preprocess_data.py\) or --mock-data$",
    ):
        cfg.finalize(1, 257)
    with pytest.raises(UserError, match=r"^--num-layers is required$"):
        MegatronConfig(micro_batch_size=1, lr=1.0, train_iters=1, mock_data=True).finalize(1, 257)


def test_round_trip_through_dict_ignores_unknown_keys():
    cfg = finalized("--global-batch-size 8")
    data = cfg.to_dict()
    data["a_key_from_a_newer_version"] = 1
    assert MegatronConfig.from_dict(data) == cfg


def test_padded_vocab_size_sets_the_embedding_rows_and_is_checked():
    from megatron_lite.core.models.gpt.gpt_model import GPTModel

    cfg = tiny_config(vocab_size=64, padded_vocab_size=72)
    assert cfg.padded_vocab_size == 72
    assert GPTModel(cfg).embedding.word_embeddings.weight.shape == (72, 32)
    assert tiny_config(vocab_size=64).padded_vocab_size == 128  # default: a multiple of 128 x TP
    with pytest.raises(UserError, match=r"^--padded-vocab-size 60 must be at least the vocabulary size 64"):
        tiny_config(vocab_size=64, padded_vocab_size=60)


def test_legacy_ckpt_format_is_written_as_torch_dist_and_says_so():
    # Megatron's functional tests ask for --ckpt-format torch; the run goes on, writing torch_dist.
    cfg = parse_config(
        tiny_flags(train_iters=4) + ["--ckpt-format", "torch", "--save", "ckpt", "--save-interval", "2"]
    )
    cfg.finalize(1, 257)
    assert any(
        n.startswith("--ckpt-format torch: checkpoints are written as torch_dist")
        for n in cfg.startup_notices
    )
    with pytest.raises(UserError) as caught:
        parse_config(tiny_flags(train_iters=4) + ["--ckpt-format", "torch", "--async-save"]).finalize(1, 257)
    assert str(caught.value) == "--async-save works with --ckpt-format torch_dist only, not torch"
