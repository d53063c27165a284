"""Shared by the HF conversion tests: a perturbed model exported to HF, and both sides' logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_flags

from megatron_lite.arguments import parse_config
from megatron_lite.convert import export_to_hf
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.training.checkpointing import save_checkpoint

transformers = pytest.importorskip("transformers")


def hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()


def our_logits(model: GPTModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, :, : model.vocab_size]


def export_perturbed(tmp_path: Path, extra: str) -> tuple[GPTModel, list[int], torch.Tensor, float]:
    """A tiny model with `extra` flags, every weight moved off its init, saved and exported to tmp_path/hf.

    Returns the model, the token ids compared, our logits and the largest |logit| difference to HF's.
    """
    flags = tiny_flags(micro_batch_size=1, vocab_size=70, train_iters=1) + extra.split()
    cfg = parse_config(flags).finalize(1)
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # every weight, bias and norm away from its init, so a misplaced one shows
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    save_checkpoint(tmp_path / "ckpt", 4, model, None, None, cfg, None, consumed_train_samples=0)
    export_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    ids = torch.randint(0, 70, (1, 16), generator=torch.Generator().manual_seed(5)).tolist()[0]
    with torch.no_grad():
        theirs = hf_model(tmp_path / "hf")(torch.tensor([ids])).logits[0]
    ours = our_logits(model, ids)
    return model, ids, ours, (theirs - ours).abs().max().item()
