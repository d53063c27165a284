"""Validation and derived values of the mixture-of-experts settings (Megatron's validate_args and
TransformerConfig rules), and --moe-layer-freq's pattern language parsed without eval."""

from __future__ import annotations

import re
from typing import Any

from megatron_lite.config.fields import fail, flag_name

# MoE fields whose non-default value means nothing without --num-experts (Megatron asserts on some of them;
# here every one is refused so that a forgotten --num-experts cannot silently train a dense model).
_MOE_DEFAULTS: dict[str, Any] = {
    "moe_ffn_hidden_size": None,
    "moe_router_topk": 2,
    "moe_router_load_balancing_type": "aux_loss",
    "moe_aux_loss_coeff": 0.0,
    "moe_router_bias_update_rate": 1e-3,
    "moe_token_drop_policy": "probs",
    "moe_token_dispatcher_type": "allgather",
    "moe_router_score_function": "softmax",
    "moe_router_pre_softmax": False,
    "moe_router_topk_scaling_factor": None,
    "moe_router_num_groups": None,
    "moe_router_group_topk": None,
    "moe_router_dtype": None,
    "moe_z_loss_coeff": None,
    "moe_router_enable_expert_bias": False,
    "moe_expert_capacity_factor": None,
    "moe_pad_expert_input_to_capacity": False,
    "moe_shared_expert_intermediate_size": None,
    "moe_shared_expert_gate": False,
    "moe_grouped_gemm": False,
    "moe_per_layer_logging": False,
    "expert_tensor_parallel_size": None,
    "save_tokens_per_expert_interval": None,
}
AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")


def parse_moe_layer_freq(value: Any, num_layers: int) -> list[int]:
    """--moe-layer-freq as the per-layer pattern (1 = MoE layer): an int N puts MoE at layers 0, N, 2N, ...;
    a string is Megatron's list expression, e.g. "([0]*1+[1]*3)" or "([1]*3+[0]*2)*2", read by a small
    parser of lists, '+', '*' and parentheses (Megatron evals it)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]  # a YAML or flag value that arrived as a one-element list
    if isinstance(value, list):
        if not all(isinstance(v, int) or (isinstance(v, str) and v.isdigit()) for v in value):
            fail(f"--moe-layer-freq {value}: a list pattern holds only 0 (dense) and 1 (MoE)")
        pattern = [int(v) for v in value]
    elif isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        freq = int(value)
        if freq < 1:
            fail(f"--moe-layer-freq {value}: an integer frequency must be >= 1")
        return [1 if i % freq == 0 else 0 for i in range(num_layers)]
    else:
        pattern = parse_list_expression(str(value), "--moe-layer-freq")
    if any(v not in (0, 1) for v in pattern):
        fail(f"--moe-layer-freq {value}: the pattern may only hold 0 (dense) and 1 (MoE)")
    if len(pattern) != num_layers:
        fail(
            f"--moe-layer-freq {value}: the pattern has {len(pattern)} entries but --num-layers is {num_layers}"
        )
    return pattern


def parse_list_expression(text: str, flag: str) -> list[int]:
    """A Megatron list expression of 0/1 patterns such as "([0]*1+[1]*3)" or "[1,1,1,0]*3" (Megatron evals
    it): lists joined by '+' and repeated by '*', with parentheses. A malformed one fails naming `flag`."""
    return _PatternParser(text, flag).parse()


class _PatternParser:
    """expr := term ('+' term)*;  term := atom ('*' INT)*;  atom := '[' INT (',' INT)* ']' | '(' expr ')'."""

    def __init__(self, text: str, flag: str = "--moe-layer-freq") -> None:
        self.text = text
        self.flag = flag
        self.tokens = re.findall(r"\d+|[\[\](),+*]|\S", text)
        self.pos = 0

    def _bad(self) -> None:
        fail(
            f"{self.flag} {self.text}: expected an integer or a pattern such as ([0]*1+[1]*3) "
            "(lists of 0/1 joined by + and repeated by *)"
        )

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self, want: str | None = None) -> str:
        token = self._peek()
        if token is None or (want is not None and token != want):
            self._bad()
        self.pos += 1
        return token

    def parse(self) -> list[int]:
        result = self._expr()
        if self._peek() is not None:
            self._bad()
        return result

    def _expr(self) -> list[int]:
        result = self._term()
        while self._peek() == "+":
            self._take("+")
            result = result + self._term()
        return result

    def _term(self) -> list[int]:
        result = self._atom()
        while self._peek() == "*":
            self._take("*")
            count = self._take()
            if not count.isdigit():
                self._bad()
            result = result * int(count)
        return result

    def _atom(self) -> list[int]:
        token = self._take()
        if token == "(":
            inner = self._expr()
            self._take(")")
            return inner
        if token != "[":
            self._bad()
        values = [self._int()]
        while self._peek() == ",":
            self._take(",")
            values.append(self._int())
        self._take("]")
        return values

    def _int(self) -> int:
        token = self._take()
        if not token.isdigit():
            self._bad()
        return int(token)


def aux_loss_coeff(cfg: Any, loss_type: str) -> float:
    """The coefficient of one load-balancing loss type (0 when it is not selected), as Megatron's router."""
    types = cfg.moe_router_load_balancing_type
    coeffs = cfg.moe_aux_loss_coeff
    if isinstance(types, str):
        return float(coeffs) if types == loss_type else 0.0
    return float(coeffs[types.index(loss_type)]) if loss_type in types else 0.0


def derive_moe(cfg: Any) -> None:
    """Megatron's MoE checks, each failing in one line that names the flag."""
    if cfg.num_experts == 0:
        cfg.num_experts = None  # Megatron: 0 experts means a dense model
    # nargs="+" flags: a single value is stored as a scalar, as Megatron's validate_args does.
    for name in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):
        value = getattr(cfg, name)
        if isinstance(value, (list, tuple)) and len(value) == 1:
            setattr(cfg, name, value[0])
    if cfg.num_experts is None:
        for name, default in _MOE_DEFAULTS.items():
            if getattr(cfg, name) != default:
                fail(f"{flag_name(name)} is a mixture-of-experts setting: it needs --num-experts")
        if str(cfg.moe_layer_freq) != "1":
            fail(f"{flag_name('moe_layer_freq')} is a mixture-of-experts setting: it needs --num-experts")
        if cfg.expert_model_parallel_size != 1:
            fail("--expert-model-parallel-size needs --num-experts (expert parallelism splits the experts)")
        return
    e, topk = cfg.num_experts, cfg.moe_router_topk
    if e < 0:
        fail(f"--num-experts must be positive, got {e}")
    if not 1 <= topk <= e:
        fail(f"--moe-router-topk {topk} must be between 1 and --num-experts {e}")
    if cfg.moe_ffn_hidden_size is None:
        cfg.moe_ffn_hidden_size = cfg.ffn_hidden_size
    if cfg.moe_ffn_hidden_size <= 0:
        fail(f"--moe-ffn-hidden-size must be positive, got {cfg.moe_ffn_hidden_size}")
    cfg.moe_layer_freq = parse_moe_layer_freq(cfg.moe_layer_freq, cfg.num_layers)
    _check_router(cfg)
    _check_parallel(cfg)


def _check_router(cfg: Any) -> None:
    e, topk = cfg.num_experts, cfg.moe_router_topk
    types = cfg.moe_router_load_balancing_type
    coeffs = cfg.moe_aux_loss_coeff
    if isinstance(types, (list, tuple)) != isinstance(coeffs, (list, tuple)) or (
        isinstance(types, (list, tuple)) and len(types) != len(coeffs)
    ):
        fail(
            "--moe-aux-loss-coeff must give one coefficient per --moe-router-load-balancing-type "
            f"({types} vs {coeffs})"
        )
    if cfg.moe_router_group_topk is not None or cfg.moe_router_num_groups is not None:
        groups, group_topk = cfg.moe_router_num_groups, cfg.moe_router_group_topk
        if groups is None or group_topk is None:
            fail("group-limited routing needs both --moe-router-num-groups and --moe-router-group-topk")
        if groups <= 0 or e % groups != 0:
            fail(f"--moe-router-num-groups {groups} must divide --num-experts {e}")
        if not 1 <= group_topk <= groups:
            fail(
                f"--moe-router-group-topk {group_topk} must be between 1 and --moe-router-num-groups {groups}"
            )
        if topk % group_topk != 0 or topk // group_topk > e // groups:
            fail(
                f"--moe-router-topk {topk} must be a multiple of --moe-router-group-topk {group_topk} and pick "
                f"at most {e // groups} experts per group"
            )
    if cfg.moe_router_enable_expert_bias and cfg.moe_router_score_function != "sigmoid":
        fail("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid (as in Megatron)")
    if cfg.moe_expert_capacity_factor is not None and cfg.moe_expert_capacity_factor < 0:
        cfg.moe_expert_capacity_factor = None  # Megatron: a negative factor means dropless
    if cfg.moe_pad_expert_input_to_capacity and cfg.moe_expert_capacity_factor is None:
        fail("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
    size = cfg.moe_shared_expert_intermediate_size
    if size is not None and size <= 0:
        fail(f"--moe-shared-expert-intermediate-size must be positive, got {size}")
    if size is not None and cfg.add_bias_linear:
        fail(
            "--moe-shared-expert-intermediate-size: shared experts have no biases (as in Megatron); add --disable-bias-linear"
        )
    if cfg.moe_shared_expert_gate and size is None:
        fail("--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size")


def _check_parallel(cfg: Any) -> None:
    e, ep = cfg.num_experts, cfg.expert_model_parallel_size
    tp = cfg.tensor_model_parallel_size
    if cfg.expert_tensor_parallel_size is None:
        cfg.expert_tensor_parallel_size = tp
    etp = cfg.expert_tensor_parallel_size
    if ep < 1 or etp < 1:
        fail("--expert-model-parallel-size and --expert-tensor-parallel-size must be >= 1")
    if e % ep != 0:
        fail(f"--num-experts {e} is not divisible by --expert-model-parallel-size {ep}")
    if cfg.world_size % (ep * etp) != 0:
        fail(
            f"--expert-model-parallel-size {ep} x --expert-tensor-parallel-size {etp} = {ep * etp} ranks per "
            f"expert group does not divide the world size {cfg.world_size}"
        )
    if etp not in (1, tp):
        fail(
            f"--expert-tensor-parallel-size {etp}: only 1 or the --tensor-model-parallel-size {tp} is implemented "
            "yet (issue 14)"
        )
    if cfg.moe_ffn_hidden_size % etp != 0:
        fail(
            f"--moe-ffn-hidden-size {cfg.moe_ffn_hidden_size} is not divisible by --expert-tensor-parallel-size {etp}"
        )
    if etp > 1 and cfg.add_bias_linear:
        fail("expert biases need --expert-tensor-parallel-size 1 (as in Megatron); add --disable-bias-linear")
    if tp > 1 and not cfg.sequence_parallel:
        fail("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel (as in Megatron)")
    if ep > 1 and cfg.fp16:
        fail("expert parallelism does not support --fp16 (as in Megatron); use --bf16")
