"""bench_train's contenders: our real Trainer.train_step, a plain PyTorch GPT and HF GPT-2, one step each."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from benchmarks.plain_gpt import PlainGPT, PlainGPTConfig
from megatron_lite.config import MegatronConfig
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.core.performance import matmul_precision
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.logger import TrainingLogger
from megatron_lite.training.training import Trainer, set_random_seed

Batch = dict[str, torch.Tensor]

CONFIGS = {
    # nanoGPT's shakespeare-char GPU shape on a byte vocabulary, sized for a CPU step of about a second.
    "cpu-small": dict(
        num_layers=6, hidden_size=384, num_attention_heads=6, seq_length=256, micro_batch_size=8, vocab=257
    ),
    # GPT-2 small's shape and vocabulary at a CPU-sized sequence: the 50k-vocabulary output layer and loss
    # weigh as they do in real GPT-2 training, and a step takes seconds rather than a minute.
    "gpt2-124m": dict(
        num_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        seq_length=256,
        micro_batch_size=8,
        vocab=50257,
    ),
}


def build_config(
    name: str,
    micro_batch_size: int | None,
    bf16: bool,
    num_layers: int | None = None,
    compile: bool = False,
) -> MegatronConfig:
    """The config pretrain_gpt.py would finalize for this shape: one micro batch per step, mock data."""
    shape = dict(CONFIGS[name])
    vocab = shape.pop("vocab")
    if micro_batch_size is not None:
        shape["micro_batch_size"] = micro_batch_size
    if num_layers is not None:
        shape["num_layers"] = num_layers
    cfg = MegatronConfig(
        **shape,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=bf16,
        lr=6e-4,
        train_iters=1,
        num_workers=0,  # the breakdown's batches come from the main process: their cost shows as data
        mock_data=True,
        compile=compile,
        peak_tflops=1.0,  # the logger's MFU peak is not used: bench_train measures its own
    )
    return cfg.finalize(world_size=1, vocab_size=vocab)


@dataclass
class Contender:
    name: str
    step: Callable[[Batch], float]  # one training step on a batch dict, returns the loss (synchronised)
    window_seconds: list[float] = field(default_factory=list)
    last_loss: float = float("nan")


def make_ours(cfg: MegatronConfig, device: torch.device, precision: str = "highest") -> Contender:
    """The Trainer pretrain_gpt.py builds (GPTModel, optimizer, scheduler, loss scaler, timers), stepped
    through its own train_step: what the benchmark times is what training runs."""
    pstate = ParallelState(device=device)
    set_random_seed(cfg.seed, pstate)
    trainer = Trainer(cfg, pstate, TrainingLogger(cfg, pstate, print_fn=lambda _: None), GPTModel)

    def step(batch: Batch) -> float:
        with matmul_precision(precision):  # the fp32 path pretrain_gpt.py picks for this machine
            loss, _, _ = trainer.train_step([batch])
        return loss

    name = "ours (Trainer)" + (" compiled" if cfg.compile else "")
    return Contender(name, step)


def _same_adamw(groups: list[dict], cfg: MegatronConfig, device: torch.device) -> torch.optim.Optimizer:
    """The AdamW settings build_optimizer uses, for the baselines."""
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        fused=device.type in ("cpu", "cuda"),
    )


def make_plain(cfg: MegatronConfig, device: torch.device) -> Contender:
    torch.manual_seed(cfg.seed)
    model = PlainGPT(
        PlainGPTConfig(
            vocab_size=cfg.padded_vocab_size,
            block_size=cfg.max_position_embeddings,
            n_layer=cfg.num_layers,
            n_head=cfg.num_attention_heads,
            n_embd=cfg.hidden_size,
        )
    ).to(device)
    model.train()
    optimizer = _same_adamw(model.optimizer_groups(cfg.weight_decay), cfg, device)
    params = list(model.parameters())

    def step(batch: Batch) -> float:
        with record_function("optimizer"):
            optimizer.zero_grad(set_to_none=True)
        with autocast(device, cfg):
            loss = model(batch["tokens"], batch["labels"])
        loss.backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            optimizer.step()
        return float(loss.detach())  # as the trainer's logged loss, a sync inside the step

    return Contender("plain PyTorch GPT", step)


def make_hf(cfg: MegatronConfig, device: torch.device) -> Contender | None:
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    hf_config = GPT2Config(
        vocab_size=cfg.padded_vocab_size,
        n_positions=cfg.max_position_embeddings,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(hf_config).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = _same_adamw(groups, cfg, device)

    def step(batch: Batch) -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, cfg):
            # HF shifts labels itself: give it the inputs as labels so it sees the same s tokens.
            loss = model(input_ids=batch["tokens"], labels=batch["tokens"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        optimizer.step()
        return float(loss.detach())

    return Contender("HF GPT2LMHeadModel", step)


def autocast(device: torch.device, cfg: MegatronConfig):
    """bf16 autocast as the trainer runs it under --bf16, else nothing."""
    if not cfg.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def synthetic_batches(cfg: MegatronConfig, device: torch.device, count: int = 4) -> list[Batch]:
    """Random token batches shaped as the data loader yields them (tokens, labels, loss_mask, position_ids)."""
    b, s = cfg.micro_batch_size, cfg.seq_length
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        text = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=generator)
        batch = {
            "tokens": text[:, :-1].contiguous(),
            "labels": text[:, 1:].contiguous(),
            "loss_mask": torch.ones(b, s),
            "position_ids": torch.arange(s).expand(b, s).contiguous(),
        }
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches
