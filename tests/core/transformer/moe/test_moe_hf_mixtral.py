"""MoE models <-> HuggingFace MixtralForCausalLM: export gives HF the same logits, import gives them back."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from megatron_lite.arguments import parse_config
from megatron_lite.convert import export_to_hf
from megatron_lite.convert.hf_import import import_from_hf
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.errors import UserError
from megatron_lite.inference.cli import generate_main
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training.checkpointing import save_checkpoint
from tests.helpers import tiny_flags

transformers = pytest.importorskip("transformers")

MIXTRAL = (
    "--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
    "--untie-embeddings-and-output-weights --group-query-attention --num-query-groups 2 "
    "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 24 --moe-aux-loss-coeff 0.02"
)


def _model(extra: str) -> GPTModel:
    flags = tiny_flags(micro_batch_size=1, vocab_size=70, train_iters=1) + extra.split()
    cfg = parse_config(flags).finalize(1)
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # away from init, router included, so a misplaced tensor shows
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


def _logits(model: GPTModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0, :, : model.vocab_size]


def test_mixtral_export_and_import_keep_the_logits(tmp_path):
    torch.manual_seed(0)
    model = _model(MIXTRAL)
    save_checkpoint(tmp_path / "ckpt", 4, model, None, None, model.config, None, consumed_train_samples=0)
    result = export_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert result.architecture == "MixtralForCausalLM"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    assert hf.config.num_local_experts == 4 and hf.config.num_experts_per_tok == 2
    ids = torch.randint(0, 70, (1, 16), generator=torch.Generator().manual_seed(5))
    ours = _logits(model, ids)
    with torch.no_grad():
        theirs = hf(ids).logits[0]
    assert ours.abs().max() > 1.0
    assert (theirs - ours).abs().max().item() < 1e-4

    back = import_from_hf(tmp_path / "hf", tmp_path / "back")
    cfg = back.config
    assert (cfg.num_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size) == (4, 2, 24)
    assert cfg.moe_aux_loss_coeff == pytest.approx(0.02)
    from megatron_lite.training.checkpointing import load_checkpoint

    cfg.finetune, cfg.no_load_optim, cfg.no_load_rng = True, True, True
    again = GPTModel(cfg.finalize(1)).eval()
    load_checkpoint(str(tmp_path / "back"), again, None, None, cfg, ParallelState())
    torch.testing.assert_close(_logits(again, ids), ours, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("--moe-router-score-function sigmoid", "sigmoid has no Mixtral equivalent"),
        ("--moe-layer-freq 2", "leaves dense layers"),
    ],
)
def test_mixtral_export_refuses_what_it_cannot_express(tmp_path, extra, message):
    model = _model(f"{MIXTRAL} {extra}")
    save_checkpoint(tmp_path / "ckpt", 1, model, None, None, model.config, None, consumed_train_samples=0)
    with pytest.raises(UserError) as err:
        export_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert message in str(err.value)


def test_mixtral_export_greedy_generate_writes_our_tokens(tmp_path):
    """HF's greedy generate on the exported model == tools/generate.py --greedy (KV cache) on the checkpoint."""
    torch.manual_seed(1)
    model = _model(f"{MIXTRAL} --tokenizer-type NullTokenizer")  # ids as text; end-of-document 69
    save_checkpoint(tmp_path / "ckpt", 2, model, None, None, model.config, None, consumed_train_samples=0)
    export_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    # within --max-position-embeddings 16: past it our generation slides its window, HF does not
    prompt, new_tokens, eod = [5, 17, 3, 44, 9, 60], 10, 69
    with torch.no_grad():  # an explicit mask: HF would otherwise mask prompt ids equal to pad_token_id
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eod,
            pad_token_id=eod,
        )
    theirs = out[0, len(prompt) :].tolist()
    theirs = theirs[:-1] if theirs and theirs[-1] == eod else theirs
    text = io.StringIO()
    argv = ["--load", str(tmp_path / "ckpt"), "--prompt", " ".join(map(str, prompt)), "--greedy"]
    with contextlib.redirect_stdout(text):
        assert generate_main([*argv, "--device", "cpu", "--max-new-tokens", str(new_tokens)]) == 0
    ours = [int(t) for t in text.getvalue().split()]
    assert ours[: len(prompt)] == prompt
    assert ours[len(prompt) :] == theirs and len(theirs) >= 4
