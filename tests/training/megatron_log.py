"""Megatron's console line as a regex, written from the reference's example line, for tests to parse logs."""

import re

# Field order and formats of Megatron's training_log line; our throughput fields sit after the elapsed
# time (where Megatron puts its own TFLOP/s), each " name: value |".
MEGATRON_LINE = re.compile(
    r"^ \[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\] iteration +(?P<iteration>\d+)/ +(?P<train_iters>\d+) \|"
    r" consumed samples: +(?P<consumed>\d+) \|"
    r" elapsed time per iteration \(ms\): (?P<ms>\d+\.\d) \|"
    r"(?: throughput per GPU \(TFLOP/s/GPU\): (?P<megatron_tflops>\d+\.\d) \|)?"
    r"(?: tokens per second: (?P<tokens_per_second>\d+\.\d) \|)?"
    r"(?: tokens per second per rank: (?P<tokens_per_rank>\d+\.\d) \|)?"
    r"(?: TFLOP/s: (?P<tflops>\d+\.\d+) \|)?"
    r"(?: MFU: (?P<mfu>\d+\.\d)% \|)?"
    r" learning rate: (?P<lr>\d\.\d{6}E[+-]\d{2}) \|"
    r" global batch size: +(?P<gbs>\d+) \|"
    r"(?: lm loss: (?P<loss>\d\.\d{6}E[+-]\d{2}) \|)?"
    r" loss scale: (?P<loss_scale>\d+\.\d) \|"
    r"(?: grad norm: (?P<grad_norm>(?:\d+\.\d{3}|nan|inf)) \|)?"
    r"(?: num zeros: (?P<num_zeros>\d+\.\d+(?:e\+\d+)?) \|)?"
    r"(?: params norm: (?P<params_norm>\d+\.\d{3}) \|)?"
    r" number of skipped iterations: +(?P<skipped>\d+) \|"
    r" number of nan iterations: +(?P<nan>\d+) \|$"
)

# The example from Megatron-LM issue #1570, quoted in the reference (section 5).
REFERENCE_EXAMPLE = (
    " [2025-05-09 06:11:17] iteration        1/      10 | consumed samples:           32 | elapsed time per "
    "iteration (ms): 21847.9 | throughput per GPU (TFLOP/s/GPU): 4.5 | learning rate: 3.333333E-05 | global "
    "batch size:    32 | lm loss: 1.186396E+01 | loss scale: 1.0 | grad norm: 6.321 | number of skipped "
    "iterations:   0 | number of nan iterations:   0 |"
)

VALIDATION_LINE = re.compile(
    r"^ validation loss at (?P<where>.+?) \| lm loss value: (?P<loss>\d\.\d{6}E[+-]\d{2}) \|"
    r" lm loss PPL: (?P<ppl>\d\.\d{6}E[+-]\d{2}) \| $"
)


def parse_lines(text: str) -> list[dict]:
    """Every Megatron training line in `text`, as a dict of its fields (strings)."""
    return [m.groupdict() for m in map(MEGATRON_LINE.match, text.splitlines()) if m]


# Megatron's timer report after the log line (--timing-log-level 1 or 2) and after one-off events.
TIMERS_HEADER = {"max": "max time across ranks (ms):", "minmax": "(min, max) time across ranks (ms):"}
MINMAX_TIMER_LINE = re.compile(r"^    (?P<name>\S+) \.+: \((?P<min>\d+\.\d{2}), (?P<max>\d+\.\d{2})\)$")
MAX_TIMER_LINE = re.compile(r"^    (?P<name>\S+) \.+: (?P<max>\d+\.\d{2})$")


def parse_timer_blocks(text: str) -> list[dict[str, tuple[float, ...]]]:
    """Each minmax or max timer block in `text`: {timer name: (min, max)} or {timer name: (max,)}."""
    blocks, current, pattern = [], None, None
    for line in text.splitlines():
        if line in TIMERS_HEADER.values():
            current, pattern = {}, MINMAX_TIMER_LINE if line == TIMERS_HEADER["minmax"] else MAX_TIMER_LINE
            blocks.append(current)
            continue
        match = pattern.match(line) if current is not None else None
        if match is None:
            current = None
            continue
        fields = match.groupdict()
        current[fields["name"]] = tuple(float(fields[k]) for k in ("min", "max") if k in fields)
    return blocks
