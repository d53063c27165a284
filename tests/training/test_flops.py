"""Megatron's FLOPs formula against hand-computed values, and the device peak table and measurement."""

import pytest
import torch

from megatron_lite.config import MegatronConfig
from megatron_lite.errors import UserError
from megatron_lite.training import flops
from megatron_lite.training.flops import (
    device_peak_flops,
    flops_per_token,
    gpu_peak_flops_from_name,
    num_floating_point_operations,
)


def _cfg(vocab: int, **model) -> MegatronConfig:
    cfg = MegatronConfig(micro_batch_size=1, train_iters=1, lr=1e-4, mock_data=True, **model)
    return cfg.finalize(world_size=1, vocab_size=vocab)


def gpt2_124m() -> MegatronConfig:
    return _cfg(50257, num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=1024)


def test_gpt2_124m_flops_match_hand_computation():
    # L=12, h=768, a=g=12, kv=64, ffn=3072, s=1024, V padded to 50304 (multiple of 128):
    # 12·s·L·h² = 12·1024·12·589824 = 86,973,087,744 per sample;
    # bracket = (1 + 1 + 1024/768)·1 + 3072/768 + 50304/(2·12·768) = 10/3 + 4 + 131/48 = 10.0625.
    cfg = gpt2_124m()
    assert cfg.padded_vocab_size == 50304
    assert num_floating_point_operations(cfg, 1) == 875_166_695_424
    assert num_floating_point_operations(cfg, 8) == 8 * 875_166_695_424
    assert flops_per_token(cfg) == 854_654_976  # 875,166,695,424 / 1024


def test_gqa_swiglu_flops_match_hand_computation():
    # LLaMA-2-7B-like with 8 KV groups: L=32, h=4096, a=32, g=8, ffn=11008 (SwiGLU), s=4096, V=32000
    # (already a multiple of 128). bracket = (1 + 8/32 + 1)·1 + (11008/4096)·1.5 + 32000/(2·32·4096)
    # = 2.25 + 4.03125 + 0.1220703125 = 6.4033203125; 12·s·L·h² = 26,388,279,066,624.
    cfg = _cfg(
        32000,
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        group_query_attention=True,
        num_query_groups=8,
        ffn_hidden_size=11008,
        swiglu=True,
        seq_length=4096,
    )
    assert num_floating_point_operations(cfg, 1) == 168_972_603_359_232


def test_flops_need_a_finalized_config():
    cfg = MegatronConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32)
    with pytest.raises(ValueError, match="finalized config"):
        num_floating_point_operations(cfg, 1)


@pytest.mark.parametrize(
    "name, dtype, tf32, tflops",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, True, 989.4),
        ("NVIDIA H100 80GB HBM3", torch.float32, True, 494.7),
        ("NVIDIA H100 80GB HBM3", torch.float32, False, 66.9),
        ("NVIDIA H100 PCIe", torch.bfloat16, True, 756.0),
        ("NVIDIA H100 NVL", torch.float16, True, 835.5),
        ("NVIDIA H200", torch.bfloat16, True, 989.4),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, True, 312.0),
        ("NVIDIA A100 80GB PCIe", torch.float32, True, 156.0),
        ("NVIDIA A100-PCIE-40GB", torch.float32, False, 19.5),
        ("NVIDIA A10G", torch.bfloat16, True, 125.0),
        ("NVIDIA L4", torch.bfloat16, True, 121.0),
        ("NVIDIA L40S", torch.bfloat16, True, 366.0),
        ("NVIDIA L40", torch.bfloat16, True, 181.0),
        ("Tesla V100-SXM2-16GB", torch.float16, True, 125.0),
        ("Tesla V100-SXM2-16GB", torch.bfloat16, True, 15.7),
        ("Tesla V100-PCIE-32GB", torch.float16, True, 112.0),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, True, 165.2),
        ("NVIDIA GeForce RTX 3090", torch.bfloat16, True, 71.0),
        ("NVIDIA GeForce RTX 3090 Ti", torch.bfloat16, True, 80.0),
        ("Tesla T4", torch.float16, True, 65.0),
    ],
)
def test_gpu_table_lookup_by_name(name, dtype, tf32, tflops):
    peak, text = gpu_peak_flops_from_name(name, dtype, tf32=tf32)
    assert peak == pytest.approx(tflops * 1e12, rel=1e-12)
    assert f"{tflops:g} TFLOP/s" in text


def test_unknown_gpu_is_not_in_the_table():
    assert gpu_peak_flops_from_name("Imaginary Accelerator 9000", torch.bfloat16) is None
    # "A10" must not swallow "A100" (or the other way round).
    assert gpu_peak_flops_from_name("NVIDIA A10", torch.bfloat16)[1].startswith("A10 ")


def test_cuda_device_uses_the_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak, text = device_peak_flops(torch.device("cuda", 0), torch.bfloat16)
    assert peak == pytest.approx(989.4e12)
    assert text.startswith("H100 SXM datasheet peak")


def test_override_wins_and_must_be_positive():
    assert device_peak_flops(torch.device("cpu"), torch.float32, override_tflops=2.5) == (
        2.5e12,
        "given by --peak-tflops: 2.5 TFLOP/s",
    )
    with pytest.raises(UserError, match="--peak-tflops must be positive"):
        device_peak_flops(torch.device("cpu"), torch.float32, override_tflops=0.0)


def test_cpu_peak_is_measured_once_per_process(monkeypatch):
    flops._MEASURED.clear()
    calls = []
    real = flops._timed_linear
    monkeypatch.setattr(flops, "_timed_linear", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    first = device_peak_flops(torch.device("cpu"), torch.float32)
    n_calls = len(calls)
    assert n_calls >= 2 and first[0] > 0
    threads = torch.get_num_threads()
    assert first[1].startswith(
        f"measured on CPU: fp32 matmul, {threads} thread{'s' if threads > 1 else ''}, "
    )
    second = device_peak_flops(torch.device("cpu"), torch.float32)
    assert second == first and len(calls) == n_calls  # cached: no more matmuls


def test_remeasuring_keeps_the_best_rate(monkeypatch):
    flops._MEASURED.clear()
    seconds = iter([1.0] * 1000)  # every matmul "takes" 1 s: rate = 2 n^3 FLOP/s
    monkeypatch.setattr(flops, "_timed_linear", lambda x, w: next(seconds))
    slow = flops.measure_matmul_flops(torch.device("cpu"), torch.bfloat16, budget_s=0.0)
    assert slow[0] == 2.0 * 512**3  # the budget stops after the first size's two timed runs
    seconds = iter([0.5] * 1000)
    fast = flops.measure_matmul_flops(torch.device("cpu"), torch.bfloat16, budget_s=0.0, use_cache=False)
    assert fast[0] == 4.0 * 512**3 and "best at 512^3" in fast[1]
    seconds = iter([2.0] * 1000)
    again = flops.measure_matmul_flops(torch.device("cpu"), torch.bfloat16, budget_s=0.0, use_cache=False)
    assert again == fast
    assert device_peak_flops(torch.device("cpu"), torch.bfloat16) == fast
