"""Picks the fastest fp32 matmul path of this machine whose error stays at fp32 level, and says which."""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

# torch.set_float32_matmul_precision values. "highest" is torch's default: MKL sgemm for fp32 on CPU,
# IEEE fp32 on GPUs. "high"/"medium" let torch pick a faster path: TF32 on NVIDIA GPUs; on CPUs whose
# oneDNN build takes them, oneDNN's matmul, which on some CPUs is fp32 (about 2x MKL's rate on AVX-512
# AMD parts) and on others rounds the inputs to bf16. Only a measurement tells which, hence this module.
PRECISIONS = ("highest", "high", "medium")
POLICIES = ("auto", *PRECISIONS)

# Relative error (max |error| / max |exact|) of an fp32 product against float64 is ~1e-7..1e-6 for
# k = 1024; TF32 gives ~1e-3 and bf16 ~3e-3. Anything above this is not fp32 arithmetic.
FP32_MAX_RELATIVE_ERROR = 1e-5
# A faster path must win by this much to be chosen, so a noisy measurement does not flip the choice.
MIN_SPEEDUP = 1.10

# (m, k, n) of the timed products, the three a linear layer runs per step: forward x @ W^T, and in
# backward grad @ W and grad^T @ x. Training-sized, ~2 GFLOP each.
_SHAPE = (2048, 1024, 512)

LinearFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# measure(precision, device, timed) -> PathMeasurement; injectable for tests.
Measure = Callable[[str, torch.device, bool], "PathMeasurement"]


@dataclass(frozen=True)
class PathMeasurement:
    """One fp32 matmul path as measured here: its error against float64, a digest of its result bits
    (equal digests: the setting did not change the kernel), and, when timed, its best time."""

    precision: str
    relative_error: float
    digest: str
    seconds: float = math.nan

    @property
    def gflops(self) -> float:
        m, k, n = _SHAPE
        return 3 * 2 * m * k * n / self.seconds / 1e9


@dataclass(frozen=True)
class MatmulChoice:
    precision: str
    description: str
    measurements: tuple[PathMeasurement, ...]


_CACHE: dict[tuple, MatmulChoice] = {}


def configure_matmul_precision(
    device: torch.device | str, policy: str = "auto", group: dist.ProcessGroup | None = None
) -> str:
    """Set torch's fp32 matmul precision by `policy` and return a one-line description to log.

    auto: keep torch's default ("highest") unless "high" or "medium" changes the kernel, keeps the error
    against float64 at fp32 level (<= FP32_MAX_RELATIVE_ERROR) AND measures at least MIN_SPEEDUP times
    faster on training-shaped products; a TF32- or bf16-level path is never picked silently. Settings
    that leave the results bit-identical (the same kernel) are not timed, so on most machines this
    costs a few small products. highest / high / medium: set exactly that; its error is reported.
    With a process group, rank 0's choice is used on every rank, so replicas compute alike.
    Measured once per (device, thread count, policy) and process.
    """
    device = torch.device(device)
    choice = select_matmul_precision(device, policy)
    precision, description = choice.precision, choice.description
    if group is not None and dist.get_world_size(group) > 1:
        index = torch.tensor([PRECISIONS.index(precision)], device=device)
        dist.broadcast(index, src=dist.get_global_rank(group, 0), group=group)
        if PRECISIONS[int(index.item())] != precision:
            precision = PRECISIONS[int(index.item())]
            description = (
                f"fp32 matmul precision: {precision} (rank 0's choice; this rank alone: {description})"
            )
    torch.set_float32_matmul_precision(precision)
    return description


def select_matmul_precision(
    device: torch.device, policy: str = "auto", measure: Measure | None = None
) -> MatmulChoice:
    """The choice configure_matmul_precision makes, without applying it (`measure` is for tests)."""
    if policy not in POLICIES:
        raise ValueError(f"fp32 matmul precision policy {policy!r} is not one of {', '.join(POLICIES)}")
    key = (str(device), torch.get_num_threads(), policy)
    if measure is None and key in _CACHE:
        return _CACHE[key]
    with matmul_precision(torch.get_float32_matmul_precision()):  # restored after the probes
        choice = _select(device, policy, measure or measure_matmul_path)
    if measure is None:
        _CACHE[key] = choice
    return choice


def _select(device: torch.device, policy: str, measure: Measure) -> MatmulChoice:
    if policy != "auto":
        m = measure(policy, device, False)
        quality = "fp32-level" if m.relative_error <= FP32_MAX_RELATIVE_ERROR else "NOT fp32-level"
        text = f"fp32 matmul precision: {policy} (set explicitly; {_describe(m)}, {quality} error)"
        return MatmulChoice(policy, text, (m,))
    probes = [measure(p, device, False) for p in PRECISIONS]
    baseline = probes[0]
    contenders = [
        m.precision
        for m in probes[1:]
        if m.digest != baseline.digest and m.relative_error <= FP32_MAX_RELATIVE_ERROR
    ]
    if contenders:
        # Interleave the timed paths twice and keep each one's best, so a burst of load on a shared
        # machine does not decide the comparison.
        timed: dict[str, PathMeasurement] = {}
        for _ in range(2):
            for precision in ("highest", *contenders):
                m = measure(precision, device, True)
                if precision not in timed or m.seconds < timed[precision].seconds:
                    timed[precision] = m
        probes = [timed.get(m.precision, m) for m in probes]
    return choose_matmul_precision(probes[0], probes[1:])


def choose_matmul_precision(
    baseline: PathMeasurement,
    candidates: list[PathMeasurement],
    min_speedup: float = MIN_SPEEDUP,
    max_error: float = FP32_MAX_RELATIVE_ERROR,
) -> MatmulChoice:
    """The fastest candidate that beats the baseline by min_speedup with fp32-level error, else baseline.

    A candidate whose results are bit-identical to the baseline's runs the same kernel and is never
    chosen, whatever a noisy timing says.
    """
    winner, notes = baseline, []
    for m in candidates:
        if m.digest == baseline.digest:
            notes.append(f"{m.precision} not chosen: same results as {baseline.precision} (same kernel)")
        elif m.relative_error > max_error:
            notes.append(f"{m.precision} rejected: {_describe(m)}, error above fp32's {max_error:.0e}")
        elif not baseline.seconds / m.seconds >= min_speedup:  # also when either was not timed
            speedup = baseline.seconds / m.seconds
            notes.append(f"{m.precision} not chosen: {_describe(m)}, {speedup:.2f}x < {min_speedup:.2f}x")
        elif m.seconds < winner.seconds:
            winner = m
    if winner is not baseline:
        speedup = baseline.seconds / winner.seconds
        notes.insert(0, f"{winner.precision} chosen: {_describe(winner)}, {speedup:.2f}x")
    base = f"{baseline.precision} (torch default): {_describe(baseline)}"
    description = f"fp32 matmul precision: {winner.precision} (auto; {base}; {'; '.join(notes)})"
    return MatmulChoice(winner.precision, description, (baseline, *candidates))


def measure_matmul_path(precision: str, device: torch.device, timed: bool = True) -> PathMeasurement:
    """Error and result digest of F.linear under `precision`, and with `timed` its probe-product time."""
    with matmul_precision(precision):
        error, digest = _error_and_digest(F.linear, device)
        seconds = _time_linear_products(device) if timed else math.nan
    return PathMeasurement(precision, error, digest, seconds)


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """torch's fp32 matmul precision set to `precision` inside the block, the previous one after it."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def relative_error(linear: LinearFn, device: torch.device) -> float:
    """max |linear(a, b) - a @ b^T| / max |a @ b^T| for random fp32 a, b, the exact product in float64."""
    return _error_and_digest(linear, device)[0]


def _error_and_digest(linear: LinearFn, device: torch.device, size: int = 1024) -> tuple[float, str]:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size // 2, size, generator=generator)
    b = torch.randn(size // 2, size, generator=generator)
    exact = a.double() @ b.double().t()
    got = linear(a.to(device), b.to(device)).float().cpu()
    error = ((got.double() - exact).abs().max() / exact.abs().max()).item()
    return error, hashlib.sha256(got.numpy().tobytes()).hexdigest()


def _time_linear_products(device: torch.device, repeats: int = 3) -> float:
    m, k, n = _SHAPE
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=generator).to(device)
    w = torch.randn(n, k, generator=generator).to(device)
    g = torch.randn(m, n, generator=generator).to(device)

    def products() -> None:
        F.linear(x, w)  # forward
        torch.mm(g, w)  # input gradient
        torch.mm(g.t(), x)  # weight gradient

    products()  # warm-up: kernel selection, page faults
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        products()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _describe(m: PathMeasurement) -> str:
    speed = "" if math.isnan(m.seconds) else f"{m.gflops:.0f} GFLOP/s, "
    return f"{speed}rel. error {m.relative_error:.1e}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
