"""Which global layers each pipeline stage builds (Megatron's rules), the stage models, the flag checks."""

import pytest
import torch
from helpers import tiny_config

from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.core.pipeline_parallel import PipelineSplit
from megatron_lite.errors import UserError


def _ranges(split: PipelineSplit) -> dict[tuple[int, int], list[int]]:
    return {(p, v): list(split.layer_range(p, v)) for v, p in split.model_chunk_order()}


def test_even_split_gives_contiguous_layers():
    split = PipelineSplit(num_layers=8, pipeline_size=4)
    assert _ranges(split) == {(0, 0): [0, 1], (1, 0): [2, 3], (2, 0): [4, 5], (3, 0): [6, 7]}


def test_interleaved_split_is_megatrons_example():
    # Megatron's transformer_block comment: 8 layers, 2 stages, 2 virtual stages.
    split = PipelineSplit(num_layers=8, pipeline_size=2, virtual_size=2)
    assert _ranges(split) == {(0, 0): [0, 1], (1, 0): [2, 3], (0, 1): [4, 5], (1, 1): [6, 7]}
    split = PipelineSplit(num_layers=8, pipeline_size=2, virtual_size=4)
    assert [list(split.layer_range(0, v)) for v in range(4)] == [[0], [2], [4], [6]]


def test_uneven_first_and_last_stage():
    split = PipelineSplit(num_layers=10, pipeline_size=4, first_stage_layers=1, last_stage_layers=3)
    assert _ranges(split) == {(0, 0): [0], (1, 0): [1, 2, 3], (2, 0): [4, 5, 6], (3, 0): [7, 8, 9]}
    only_last = PipelineSplit(num_layers=5, pipeline_size=2, last_stage_layers=1)
    assert _ranges(only_last) == {(0, 0): [0, 1, 2, 3], (1, 0): [4]}


def test_uneven_interleaved_matches_megatrons_offsets():
    split = PipelineSplit(
        num_layers=12, pipeline_size=3, virtual_size=2, first_stage_layers=2, last_stage_layers=2
    )
    # Megatron's offset for (pp 1, vp 1): vp * (1 + 4 + 1) + 1 = 7.
    assert _ranges(split) == {
        (0, 0): [0],
        (1, 0): [1, 2, 3, 4],
        (2, 0): [5],
        (0, 1): [6],
        (1, 1): [7, 8, 9, 10],
        (2, 1): [11],
    }


def test_embedding_and_loss_counted_as_layers():
    split = PipelineSplit(num_layers=6, pipeline_size=4, account_for_embedding=True, account_for_loss=True)
    assert _ranges(split) == {(0, 0): [0], (1, 0): [1, 2], (2, 0): [3, 4], (3, 0): [5]}
    assert split.problem() is None


@pytest.mark.parametrize(
    "split, words",
    [
        (PipelineSplit(num_layers=5, pipeline_size=2), "--num-layers 5 is not divisible"),
        (PipelineSplit(num_layers=8, pipeline_size=2, virtual_size=3), "not divisible by its 3 virtual"),
        (PipelineSplit(num_layers=8, pipeline_size=4, first_stage_layers=3), "5 layers left"),
        (
            PipelineSplit(num_layers=4, pipeline_size=2, first_stage_layers=1, last_stage_layers=2),
            "do not add up",
        ),
        (
            PipelineSplit(num_layers=4, pipeline_size=2, first_stage_layers=1, account_for_loss=True),
            "cannot be combined",
        ),
    ],
)
def test_problems_name_the_cause(split, words):
    assert words in split.problem()


BAD_FLAGS = [
    (
        {"num_layers": 4, "pipeline_model_parallel_size": 2, "overlap_grad_reduce": True},
        2,
        "--overlap-grad-reduce with --pipeline-model-parallel-size 2: pipeline parallelism with it is not "
        "implemented yet (issue 13)",
    ),
    # P not dividing the layers, without uneven flags
    ({"num_layers": 3, "pipeline_model_parallel_size": 2}, 2, "--num-layers 3 is not divisible by"),
    # virtual stages that do not divide a stage's layers
    (
        {"num_layers": 4, "pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 3},
        2,
        "--num-layers-per-virtual-pipeline-stage 3 does not divide",
    ),
    (
        {"num_layers": 4, "pipeline_model_parallel_size": 2, "num_virtual_stages_per_pipeline_rank": 4},
        2,
        "not divisible by its 4 virtual stages",
    ),
    # world size not divisible by TP x PP
    (
        {"num_layers": 4, "pipeline_model_parallel_size": 2, "tensor_model_parallel_size": 2},
        6,
        "world size 6 is not divisible by --tensor-model-parallel-size 2 x --pipeline-model-parallel-size 2",
    ),
    # interleaving with fewer micro batches than Megatron requires (a multiple of PP)
    (
        {
            "num_layers": 4,
            "pipeline_model_parallel_size": 2,
            "num_virtual_stages_per_pipeline_rank": 2,
            "global_batch_size": 2,
        },
        2,
        "needs the micro batches per step (1) to be a multiple of --pipeline-model-parallel-size 2",
    ),
    (
        {"num_layers": 4, "pipeline_model_parallel_size": 2, "decoder_first_pipeline_num_layers": 5},
        2,
        "do not add up to --num-layers 4",
    ),
]


@pytest.mark.parametrize("overrides, world, message", BAD_FLAGS)
def test_bad_pipeline_flags_fail_in_one_line(overrides, world, message):
    with pytest.raises(UserError) as err:
        tiny_config(world, **overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_config_derives_dp_and_virtual_size():
    cfg = tiny_config(
        8,
        num_layers=8,
        pipeline_model_parallel_size=2,
        tensor_model_parallel_size=2,
        num_layers_per_virtual_pipeline_stage=2,
        global_batch_size=8,
    )
    assert cfg.data_parallel_size == 2 and cfg.virtual_pipeline_model_parallel_size == 2
    assert cfg.num_microbatches == 2
    one_chunk = tiny_config(
        2, num_layers=4, pipeline_model_parallel_size=2, num_virtual_stages_per_pipeline_rank=1
    )
    assert one_chunk.virtual_pipeline_model_parallel_size is None


@pytest.mark.parametrize("untie", [False, True])
def test_stages_keep_the_whole_models_weights(untie):
    cfg = tiny_config(num_layers=4, untie_embeddings_and_output_weights=untie)
    whole = GPTModel(cfg).state_dict()
    first = GPTModel(cfg, pre_process=True, post_process=False, layers=range(0, 1))
    middle = GPTModel(cfg, pre_process=False, post_process=False, layers=range(1, 3))
    last = GPTModel(cfg, pre_process=False, post_process=True, layers=range(3, 4))
    assert [layer.layer_number for layer in middle.decoder.layers] == [1, 2]
    assert middle.embedding is None and middle.output_layer is None and middle.decoder.final_layernorm is None
    assert last.embedding is None and first.output_layer is None
    for stage in (first, middle, last):
        for name, value in stage.state_dict().items():
            parts = name.split(".")
            if parts[:2] == ["decoder", "layers"]:
                parts[2] = str(stage.decoder.layers[int(parts[2])].layer_number)
            assert torch.equal(value, whole.get(".".join(parts), whole["embedding.word_embeddings.weight"]))
    # The tied copy on the last stage is Megatron's `shared` weight; untied, it is the output layer's own.
    assert getattr(last.output_layer.weight, "shared", False) is not untie
    if not untie:
        assert torch.equal(last.output_layer.weight, whole["embedding.word_embeddings.weight"])
    else:
        assert not torch.equal(last.output_layer.weight, whole["embedding.word_embeddings.weight"])


def test_stages_chain_to_the_whole_models_loss():
    cfg = tiny_config(num_layers=4, hidden_dropout=0.0, attention_dropout=0.0)
    tokens = torch.randint(0, 257, (2, 16))
    labels = torch.randint(0, 257, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    whole = GPTModel(cfg)(tokens, labels=labels)
    first = GPTModel(cfg, post_process=False, layers=range(0, 2))
    last = GPTModel(cfg, pre_process=False, layers=range(2, 4))
    hidden = first(tokens, position_ids=positions)
    assert hidden.shape == (16, 2, 32)
    chained = last(None, position_ids=positions, labels=labels, decoder_input=hidden)
    torch.testing.assert_close(chained, whole, rtol=1e-6, atol=0)


def test_stage_flops_shares_add_up_to_the_model():
    from megatron_lite.core.pipeline_parallel.flops_share import stage_flops_share
    from megatron_lite.training.flops import num_floating_point_operations

    cfg = tiny_config(4, num_layers=4, pipeline_model_parallel_size=4)
    whole = num_floating_point_operations(cfg, 8)
    shares = [stage_flops_share(cfg, whole, 8, rank) for rank in range(4)]
    assert sum(shares) == pytest.approx(1.0, rel=1e-12)
    # Equal layers; the last rank also computes the logits (6 B s h V).
    logits = 6.0 * 8 * cfg.seq_length * cfg.hidden_size * cfg.padded_vocab_size / whole
    assert shares[0] == shares[1] == shares[2] == pytest.approx((1 - logits) / 4)
    assert shares[3] == pytest.approx((1 - logits) / 4 + logits)
    assert stage_flops_share(tiny_config(num_layers=4), whole, 8, 0) == 1.0
