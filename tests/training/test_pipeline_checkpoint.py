"""Pipeline-parallel checkpoints: global layer names, loadable at any (PP, TP, DP), SIGTERM save and resume."""

import os
import signal

import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist_utils import run_distributed
from helpers import ROOT, run_python
from safetensors.torch import load_file

from megatron_lite.arguments import parse_config
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.parallel_state import initialize_parallel
from megatron_lite.training.training import pretrain

BASE = (
    "--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --mock-data --vocab-size 250 "
    "--micro-batch-size 1 --global-batch-size 4 --lr 3e-3 --lr-warmup-iters 2 --train-iters 8 --num-workers 0 "
    "--hidden-dropout 0 --attention-dropout 0 --eval-iters 0 --log-interval 4 --peak-tflops 1"
)
RTOL = 1e-5


class _SigtermAtIteration3(GPTModel):
    """Sends SIGTERM to its own process during the third training iteration (its first micro batch)."""

    calls = 0

    def forward(self, *args, **kwargs):
        if self.training:
            self.calls += 1
            if self.calls == 3 * 4:
                os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(*args, **kwargs)


def _train(extra: str, model_provider=None) -> dict:
    cfg = parse_config(f"{BASE} {extra}".split())
    pstate = initialize_parallel(
        cfg.tensor_model_parallel_size, pipeline_model_parallel_size=cfg.pipeline_model_parallel_size
    )
    result = pretrain(cfg, pstate, model_provider=model_provider)
    return {"losses": dict(result.losses), "exit": (result.iteration, result.exit_reason)}


def _runs_worker(rank: int, world_size: int, runs: list[tuple[str, bool]]) -> list[dict]:
    # (flags, whether the last rank gets SIGTERM in iteration 3)
    out = []
    for extra, sigterm in runs:
        provider = _SigtermAtIteration3 if sigterm and rank == world_size - 1 else None
        out.append(_train(extra, provider))
    return out


def _assert_continues(resumed: dict, reference: dict, start: int) -> None:
    assert sorted(resumed) == list(range(start, 9))
    for it, loss in resumed.items():
        assert abs(loss - reference[it]) / reference[it] < RTOL, it


@pytest.mark.slow
@pytest.mark.parametrize("untie", ["", "--untie-embeddings-and-output-weights"])
def test_save_at_pp2_tp2_resume_at_pp1_and_pp4(tmp_path, untie):
    reference = _train(untie)["losses"]
    ckpt = tmp_path / "ckpt"
    saved = run_distributed(
        _runs_worker,
        4,
        [
            (
                f"--pipeline-model-parallel-size 2 --tensor-model-parallel-size 2 --save {ckpt} --save-interval 4 "
                f"--exit-interval 4 {untie}",
                False,
            )
        ],
    )
    assert saved[0][0]["exit"] == (4, "exit-interval")
    # Each stage wrote its layers under their global numbers: one stacked tensor over all 4 layers.
    metadata = dcp.FileSystemReader(str(ckpt / "iter_0000004")).read_metadata().state_dict_metadata
    qkv = metadata["decoder.layers.self_attention.linear_qkv.weight"]
    assert list(qkv.size)[0] == 4
    assert ("output_layer.weight" in metadata) == bool(untie)
    _assert_continues(_train(f"--load {ckpt} {untie}")["losses"], reference, 5)
    if not untie:
        _assert_exports_whole_model(tmp_path, ckpt)
    pp4 = run_distributed(
        _runs_worker, 4, [(f"--pipeline-model-parallel-size 4 --load {ckpt} {untie}", False)]
    )
    for rank in range(4):
        _assert_continues(pp4[rank][0]["losses"], reference, 5)


def _assert_exports_whole_model(tmp_path, ckpt) -> None:
    """tools/convert_checkpoint.py export (one process) reads the pipeline checkpoint as the whole model."""
    out = run_python(
        [ROOT / "tools" / "convert_checkpoint.py", "export", "--load", ckpt, "--save-dir", "hf"], tmp_path
    )
    assert out.returncode == 0, out.stderr
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    cfg = parse_config(BASE.split()).finalize(1)
    model = GPTModel(cfg)
    from megatron_lite.training.checkpointing import load_model_weights

    assert load_model_weights(model, ckpt) == 4
    words = model.embedding.word_embeddings.weight.detach()[: cfg.vocab_size]
    assert torch.equal(exported["transformer.wte.weight"], words)
    # The last stage's layer and final norm, under their whole-model names.
    assert torch.equal(
        exported["transformer.h.3.ln_1.weight"], model.decoder.layers[3].input_layernorm.weight
    )
    assert torch.equal(exported["transformer.ln_f.weight"], model.decoder.final_layernorm.weight)


@pytest.mark.slow
def test_sigterm_in_last_stage_saves_and_resume_is_bit_exact(tmp_path):
    ckpt = tmp_path / "ckpt"
    pp2 = "--pipeline-model-parallel-size 2"
    runs = [
        (pp2, False),
        (f"{pp2} --save {ckpt} --save-interval 100 --exit-signal-handler", True),
        (f"{pp2} --load {ckpt}", False),
    ]
    results = run_distributed(_runs_worker, 2, runs)
    for rank in (0, 1):
        whole, stopped, resumed = results[rank]
        # Only the last stage received the signal; both stages stop after the same iteration and save.
        assert stopped["exit"] == (3, "signal")
        assert sorted(resumed["losses"]) == list(range(4, 9))
        # Same layout on CPU: the resumed curve is the uninterrupted one, bit for bit.
        assert all(resumed["losses"][it] == whole["losses"][it] for it in range(4, 9))
        assert all(stopped["losses"][it] == whole["losses"][it] for it in range(1, 4))
