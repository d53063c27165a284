"""Our parser against Megatron-LM's own flag table: nothing missing, implemented flags typed and defaulted alike."""

import dataclasses
import subprocess
import sys

import pytest

from megatron_lite.arguments import build_parser, parse_config
from megatron_lite.arguments.compat import policy
from megatron_lite.arguments.megatron_flags import flags_by_dest, megatron_flags
from megatron_lite.arguments.parser import base_type, field_types
from megatron_lite.arguments.report import format_arguments, megatron_args
from megatron_lite.config import config_fields
from megatron_lite.errors import UserError
from tests.helpers import ROOT, tiny_flags

# Where an implemented flag's default or type knowingly differs from Megatron-LM's, and why.
DEVIATIONS = {
    "distributed_backend": "default None picks nccl on GPUs and gloo on CPUs; Megatron always defaults to nccl",
    "distributed_timeout_minutes": "float: a superset of Megatron's int (tests use fractions of a minute)",
    "exit_duration_in_mins": "float: a superset of Megatron's int",
    "eval_interval": "core_v0.15.0's default 1000 (main's None turns periodic evaluation off)",
    "window_size": "a str parsed once in validation ('L,R', '(L,R)'); Megatron's type is its tuple_type function",
    "window_attn_skip_freq": "an int or a list-expression str parsed once in validation (no eval); Megatron's "
    "type is its moe_freq_type function",
    "exit_signal": "the signal's name as a str (same choices); Megatron converts it to a signal.Signals",
    "no_save_optim": "False, not None: the same for a store_true flag",
    "no_save_rng": "False, not None: the same for a store_true flag",
    "no_load_optim": "False, not None: the same for a store_true flag",
    "no_load_rng": "False, not None: the same for a store_true flag",
    "moe_layer_freq": "a str (or int) parsed once in validation without eval; Megatron's type is its moe_freq_type",
}


def _sample_values(flag) -> list[str]:
    if flag.choices:
        value = str(flag.choices[-1])
    elif flag.default not in (None, [], ""):
        value = str(flag.default[0] if isinstance(flag.default, list) else flag.default)
    else:
        value = {"int": "1", "float": "0.5", "bool": "true"}.get(flag.type or "", "x")
    return [value] * (flag.nargs if isinstance(flag.nargs, int) else 1)


def test_table_is_megatrons_whole_parser():
    flags = megatron_flags()
    old = [f for f in flags if "core_v0.15.0" in f.versions]
    new = [f for f in flags if "HEAD" in f.versions]
    # Counts of core_v0.15.0 (565 actions) and main (838) as extracted; a truncated table fails here.
    assert len(old) >= 560 and len(new) >= 830 and len(flags) >= 870
    for dest in (
        "num_layers",
        "log_num_zeros_in_grad",
        "moe_router_topk",
        "context_parallel_size",
        "yaml_cfg",
    ):
        assert dest in flags_by_dest()
    assert flags_by_dest()["attention_dropout"].default == 0.1
    assert flags_by_dest()["mmap_bin_files"].flags == ("--no-mmap-bin-files",)


def test_every_megatron_flag_parses():
    parser = build_parser()
    failures = []
    for flag in megatron_flags():
        if flag.dest == "yaml_cfg":
            continue
        for option in flag.flags:
            argv = [option] if not flag.takes_value else [option, *_sample_values(flag)]
            try:
                namespace = vars(parser.parse_args(argv))
            except UserError as err:
                failures.append(f"{argv}: {err}")
                continue
            if flag.dest not in namespace:
                failures.append(f"{argv}: set nothing")
    assert failures == []


def test_implemented_flags_have_megatrons_type_default_and_choices():
    hints = field_types()
    problems = []
    for f in config_fields():
        spec = flags_by_dest().get(f.name)
        if spec is None or f.name in DEVIATIONS:
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        kind = base_type(hints[f.name]).__name__
        want = "bool" if spec.action != "store" else (spec.type or "str")
        if default != spec.default:
            problems.append(f"{f.name}: default {default!r}, Megatron {spec.default!r}")
        if kind != want and not (want == "int" and kind == "float" and f.name in DEVIATIONS):
            problems.append(f"{f.name}: type {kind}, Megatron {want}")
    assert problems == []


def test_deviations_are_real():
    """Each allowed deviation still differs; one that Megatron now matches must leave the list."""
    hints = field_types()
    for name in DEVIATIONS:
        f = next(f for f in config_fields() if f.name == name)
        spec = flags_by_dest()[name]
        assert (f.default, base_type(hints[name]).__name__) != (spec.default, spec.type or "bool"), name


def test_allow_abbrev_is_off():
    with pytest.raises(UserError, match="unrecognized arguments: --num-layer 3"):
        parse_config(["--num-layer", "3"])


def test_exit_signal_takes_its_value():
    cfg = parse_config(["--exit-signal", "SIGTERM", "--num-layers", "2"])
    assert cfg.num_layers == 2
    assert getattr(cfg, "exit_signal", cfg.megatron_args.get("exit_signal")) in ("SIGTERM", 15)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--fp8-format", "hybrid"],
            "--fp8-format hybrid: FP8/FP4 training needs Transformer Engine on a GPU",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Et|tL"],
            "--pipeline-model-parallel-layout Et|tL: this pipeline-parallel option is not implemented yet (issue 13)",
        ),
        (
            ["--context-parallel-size", "2", "--hierarchical-context-parallel-sizes", "2", "1"],
            "--hierarchical-context-parallel-sizes 2 1: context parallelism is not implemented yet (issue 15)",
        ),
        (
            ["--num-experts", "8", "--moe-layer-recompute"],
            "--moe-layer-recompute: this mixture-of-experts option is not implemented yet (issue 14)",
        ),
        (["--enable-cuda-graph"], "--enable-cuda-graph: CUDA graphs are a GPU-only feature"),
        (
            ["--position-embedding-type", "mrope"],
            "--position-embedding-type mrope is not implemented in megatron-lite (implemented: ",
        ),
        (
            ["--vision-pretraining"],
            "--vision-pretraining: vision models only; megatron-lite trains decoder-only GPT models",
        ),
    ],
)
def test_refused_and_later_flags_stop_in_one_line(argv, message):
    with pytest.raises(UserError) as err:
        parse_config(argv)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_parallel_sizes_of_one_are_accepted_silently():
    cfg = parse_config(
        "--pipeline-model-parallel-size 1 --context-parallel-size 1 --expert-model-parallel-size 1".split()
    )
    assert cfg.startup_notices == []
    assert cfg.megatron_args == {}  # all three are config fields now


def test_switches_are_reported_once_even_at_megatrons_default():
    cfg = parse_config(["--transformer-impl", "transformer_engine", "--use-mcore-models", "--no-rope-fusion"])
    assert [n.split(":")[0] for n in cfg.startup_notices] == [
        "--transformer-impl transformer_engine",
        "--use-mcore-models",
        "--no-rope-fusion",
    ]
    assert "Transformer Engine is never used" in cfg.startup_notices[0]


def test_every_flag_has_a_class():
    fields = {f.name for f in config_fields()}
    kinds = {policy(f).kind for f in megatron_flags() if f.dest not in fields}
    assert kinds <= {"switch", "later", "refused"}


def test_arguments_block_is_megatrons_format():
    cfg = parse_config(["--num-layers", "3", "--use-mcore-models"])
    block = format_arguments(cfg).splitlines()
    assert block[0] == "------------------------ arguments ------------------------"
    assert block[-1] == "-------------------- end of arguments ---------------------"
    assert "  num_layers ...................................... 3" in block
    assert "  deprecated_use_mcore_models ..................... True" in block
    names = [line.split()[0] for line in block[1:-1]]
    assert names == sorted(names, key=str.lower)
    assert len(names) == len(megatron_args(cfg)) >= len(megatron_flags())


def test_pretrain_prints_the_block_and_notices(tmp_path):
    argv = [sys.executable, str(ROOT / "pretrain_gpt.py"), *tiny_flags(train_iters=1, vocab_size=64)]
    argv += ["--num-workers", "0", "--eval-iters", "0", "--use-flash-attn", "--log-interval", "1"]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "------------------------ arguments ------------------------"
    assert "> --use-flash-attn: attention runs through torch's scaled_dot_product_attention" in out.stdout
    assert sum("--use-flash-attn" in line for line in lines) == 1


def test_compatibility_page_is_up_to_date():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "megatron_compat_table.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
