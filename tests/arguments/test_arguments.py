"""parse_config: Megatron's flags, --yaml-cfg files, flag-over-YAML precedence, and one-line errors."""

import pytest

from megatron_lite.arguments import load_yaml, parse_config
from megatron_lite.errors import UserError


def write(tmp_path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def error_of(argv) -> str:
    with pytest.raises(UserError) as err:
        parse_config(argv)
    return str(err.value)


def test_flags_fill_fields_and_unset_ones_keep_defaults():
    cfg = parse_config(
        "--num-layers 12 --hidden-size 768 --lr 6e-4 --bf16 --data-path 0.3 A 0.7 B --lr-decay-style cosine".split()
    )
    assert (cfg.num_layers, cfg.hidden_size, cfg.lr, cfg.bf16, cfg.lr_decay_style) == (
        12,
        768,
        6e-4,
        True,
        "cosine",
    )
    assert cfg.data_path == ["0.3", "A", "0.7", "B"]
    assert (cfg.weight_decay, cfg.clip_grad, cfg.adam_beta2, cfg.seed, cfg.log_interval) == (
        0.01,
        1.0,
        0.999,
        1234,
        100,
    )
    assert (cfg.initial_loss_scale, cfg.hysteresis, cfg.make_vocab_size_divisible_by) == (2.0**32, 2, 128)


def test_megatron_seed_command_parses():
    argv = (
        "--tensor-model-parallel-size 1 --num-layers 12 --hidden-size 768 --num-attention-heads 12 "
        "--seq-length 1024 --max-position-embeddings 1024 --data-path my_data_text_document "
        "--micro-batch-size 4 --global-batch-size 8 --lr 0.00015 --train-iters 500000 --lr-decay-iters 320000 "
        "--lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 1e-2 --lr-warmup-fraction .01 --clip-grad 1.0 "
        "--vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --split 949,50,1 --log-interval 100 "
        "--save-interval 10000 --eval-interval 1000 --eval-iters 10 --distributed-backend nccl"
    ).split()
    cfg = parse_config(argv).finalize(1, 50257)
    assert (cfg.num_microbatches, cfg.padded_vocab_size, cfg.lr_warmup_fraction, cfg.split) == (
        2,
        50304,
        0.01,
        "949,50,1",
    )


def test_yaml_values_with_sections_aliases_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_ROOT", "/data/ckpt")
    path = write(
        tmp_path,
        "language_model:\n  num_layers: 6\n  hidden-size: 384\n  layernorm_epsilon: 1.0e-6\n"
        "model_parallel:\n  tensor_model_parallel_size: 2\n"
        "micro_batch_size: 4\nlr: 1e-3\nbf16: true\nsave: ${CKPT_ROOT}/run1\ndata_path: 0.5 A 0.5 B\nsplit: 98,1,1\n",
    )
    cfg = parse_config(["--yaml-cfg", path])
    assert (cfg.num_layers, cfg.hidden_size, cfg.layernorm_epsilon, cfg.tensor_model_parallel_size) == (
        6,
        384,
        1e-6,
        2,
    )
    assert (cfg.micro_batch_size, cfg.lr, cfg.bf16, cfg.save) == (4, 1e-3, True, "/data/ckpt/run1")
    assert (cfg.data_path, cfg.split) == (["0.5", "A", "0.5", "B"], "98,1,1")


def test_explicit_flags_override_yaml_even_at_default_values(tmp_path):
    path = write(tmp_path, "num_layers: 6\nseed: 7\nlr: 1.0e-3\nmicro_batch_size: 4\n")
    cfg = parse_config(["--num-layers", "2", "--yaml-cfg", path, "--seed", "1234"])
    assert (cfg.num_layers, cfg.seed, cfg.lr, cfg.micro_batch_size) == (2, 1234, 1e-3, 4)


def test_unknown_flag_and_bad_value_are_one_line_errors():
    assert error_of(["--num-layerz", "2"]) == "unrecognized arguments: --num-layerz 2 (see --help)"
    assert error_of(["--num-layers", "abc"]) == "argument --num-layers: invalid int value: 'abc' (see --help)"
    # argparse's quoting of the choices differs between Python versions; the flag and the value do not.
    message = error_of(["--lr-decay-style", "steps"])
    assert message.startswith("argument --lr-decay-style: invalid choice: 'steps' (choose from ")
    assert message.endswith(" (see --help)")


@pytest.mark.parametrize(
    "text, message",
    [
        ("num_layer: 2\n", "unknown key 'num_layer'; see `python pretrain_gpt.py --help` for the settings"),
        ("world_size: 2\n", "unknown key 'world_size'; see `python pretrain_gpt.py --help` for the settings"),
        ("num_layers: abc\n", "key 'num_layers' must be int, got 'abc'"),
        ("hidden_size: 768.5\n", "key 'hidden_size' must be int, got 768.5"),
        ("bf16: 'yes'\n", "key 'bf16' must be true or false, got 'yes'"),
        (
            "normalization: BatchNorm\n",
            "key 'normalization' must be one of LayerNorm, RMSNorm, got 'BatchNorm'",
        ),
        ("data_path: 5\n", "key 'data_path' must be a list, got 5"),
        (
            "save: ${MEGATRON_LITE_UNSET_VAR}/x\n",
            "${MEGATRON_LITE_UNSET_VAR} is used but the environment variable MEGATRON_LITE_UNSET_VAR is not set",
        ),
        ("- 1\n- 2\n", "expected a mapping of settings at the top level"),
    ],
)
def test_yaml_errors_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    assert error_of(["--yaml-cfg", path]) == f"{path}: {message}"


def test_yaml_syntax_error_and_missing_file(tmp_path):
    path = write(tmp_path, "num_layers: 2\nlr: [1\n")
    assert error_of(["--yaml-cfg", path]).startswith(f"{path}: line 3 is not valid YAML (")
    missing = str(tmp_path / "nope.yaml")
    assert error_of(["--yaml-cfg", missing]) == f"--yaml-cfg {missing}: no such file"


def test_empty_yaml_is_no_settings(tmp_path):
    assert load_yaml(write(tmp_path, "")) == ({}, {}, [])


def test_yaml_boolean_for_a_number_is_an_error(tmp_path):
    path = write(tmp_path, "num_layers: yes\n")
    assert error_of(["--yaml-cfg", path]) == f"{path}: key 'num_layers' must be int, got True"


def test_yaml_null_means_unset_as_in_megatron(tmp_path):
    path = write(tmp_path, "lr_warmup_iters: null\nnum_layers: null\nfp8: null\n")
    cfg = parse_config(["--yaml-cfg", path])
    assert (cfg.lr_warmup_iters, cfg.num_layers, cfg.megatron_args) == (0, None, {})


def test_nccl_backend_on_cpu_is_a_one_line_error(monkeypatch):
    from megatron_lite.errors import UserError
    from megatron_lite.parallel_state import initialize_parallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--distributed-backend nccl needs CUDA GPUs"):
        initialize_parallel(1, device="cpu", backend="nccl")
