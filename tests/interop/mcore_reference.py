"""megatron-core as a reference, run in its own process: build its GPTModel, save or load Megatron checkpoints.

Usage: python mcore_reference.py SPEC_JSON. The spec names a model style, fixed tokens and what to do:
"save" (write a Megatron-LM torch_dist checkpoint as Megatron-LM's save_checkpoint does, and the logits)
or "load" (read a checkpoint into a fresh GPTModel with strict key checking, and write its logits).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

# megatron-core on CPU: its attention buffers and RoPE ask for the current CUDA device, and its checkpoint
# writer synchronizes CUDA; neither exists here.
torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
warnings.filterwarnings("ignore")

# Megatron-LM reads common.pt (which holds `args`) with torch.load's default, weights_only=True, after
# allowing argparse.Namespace; do the same here.
torch.serialization.add_safe_globals([argparse.Namespace])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _setup(seed: int) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)


def build_model(style: dict):
    """megatron-core's GPTModel with the local (non-TE) layer spec, in one of our test styles."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    llama = style["style"] == "llama"
    config = TransformerConfig(
        num_layers=style["num_layers"],
        hidden_size=style["hidden_size"],
        num_attention_heads=style["num_attention_heads"],
        num_query_groups=style.get("num_query_groups"),
        ffn_hidden_size=style["ffn_hidden_size"],
        normalization="RMSNorm" if llama else "LayerNorm",
        layernorm_epsilon=1e-5,
        add_bias_linear=not llama,
        gated_linear_unit=llama,
        activation_func=F.silu if llama else F.gelu,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        init_method_std=0.02,
    )
    model = GPTModel(
        config,
        get_gpt_layer_local_spec(normalization=config.normalization),
        vocab_size=style["padded_vocab_size"],
        max_sequence_length=style["max_position_embeddings"],
        position_embedding_type="rope" if llama else "learned_absolute",
        share_embeddings_and_output_weights=not llama,
        rotary_base=style.get("rotary_base", 10000),
    )
    return model


def logits_of(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    model.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    # True where attention is masked; megatron-core's default mask would be built on CUDA.
    seq = tokens.shape[1]
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        logits = model(tokens, positions, attention_mask=mask)
    return logits[..., :vocab_size].float()


def megatron_args(style: dict, extra: dict) -> argparse.Namespace:
    """Megatron-LM's `args` as its save_checkpoint stores it: every flag's dest (defaults from Megatron's
    flag table), the model's settings, and what training derives (padded vocab, consumed samples)."""
    table = json.loads(Path(style["flags_json"]).read_text())
    values = {row["dest"]: row["default"] for row in table}
    llama = style["style"] == "llama"
    values.update(
        num_layers=style["num_layers"],
        hidden_size=style["hidden_size"],
        num_attention_heads=style["num_attention_heads"],
        ffn_hidden_size=style["ffn_hidden_size"],
        max_position_embeddings=style["max_position_embeddings"],
        seq_length=style["seq_length"],
        position_embedding_type="rope" if llama else "learned_absolute",
        normalization="RMSNorm" if llama else "LayerNorm",
        swiglu=llama,
        add_bias_linear=not llama,
        untie_embeddings_and_output_weights=llama,
        group_query_attention=style.get("num_query_groups") is not None,
        num_query_groups=style.get("num_query_groups") or style["num_attention_heads"],
        kv_channels=style["hidden_size"] // style["num_attention_heads"],
        vocab_size=style["vocab_size"],
        padded_vocab_size=style["padded_vocab_size"],
        make_vocab_size_divisible_by=style["make_vocab_size_divisible_by"],
        tokenizer_type=style.get("tokenizer_type"),
        use_mcore_models=True,
        ckpt_format="torch_dist",
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        world_size=1,
        data_parallel_size=1,
        params_dtype=torch.float32,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )
    values.update(extra)
    return argparse.Namespace(**values)


def perturb(model, seed: int) -> None:
    """Every weight made distinct (norm weights and biases too), so a misplaced tensor changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.1 if param.dim() == 1 else 0.02
            base = 1.0 if name.endswith("layernorm.weight") or "layer_norm_weight" in name else 0.0
            param.copy_(base + scale * torch.randn(param.shape, generator=gen))


def save(spec: dict) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    style = spec["model"]
    model = build_model(style)
    perturb(model, spec["seed"])
    params = list(model.parameters())
    adam = None
    if spec.get("optimizer"):
        # megatron-core's optimizer wrapper needs CUDA kernels; torch's Adam makes the same state.
        adam = torch.optim.Adam(params, lr=1e-3)
        gen = torch.Generator().manual_seed(spec["seed"] + 1)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            adam.step()
    tokens = torch.tensor(spec["tokens"])
    out = Path(spec["out"])
    torch.save({"logits": logits_of(model, tokens, style["vocab_size"])}, out / "mcore_logits.pt")
    iteration = spec["iteration"]
    it_dir = out / "ckpt" / f"iter_{iteration:07d}"
    it_dir.mkdir(parents=True)

    model_sd = model.sharded_state_dict()
    state = {
        "args": megatron_args(style, spec.get("args", {})),
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "model": model_sd,
        "num_floating_point_operations_so_far": 1.5e9,
    }
    if adam is not None:
        # Megatron's own helper turns the state into the checkpoint's ShardedTensors; as Megatron's
        # optimizers do, `step` is kept in the param groups rather than per parameter.
        optim_sd = adam.state_dict()
        torch.save(
            {
                f"{name}.{k}": v.clone()
                for name, p in model.named_parameters()
                for k, v in adam.state[p].items()
            },
            out / "mcore_adam.pt",
        )
        step = float(next(iter(optim_sd["state"].values()))["step"])
        for value in optim_sd["state"].values():
            value.pop("step")
        for group in optim_sd["param_groups"]:
            group["step"] = step
        optim_state_to_sharding_state(optim_sd, get_param_id_to_sharded_param_map(model_sd, params))
        state["optimizer"] = {"optimizer": optim_sd}
        state["opt_param_scheduler"] = spec["scheduler"]
    rng = {
        "random_rng_state": __import__("random").getstate(),
        "np_rng_state": __import__("numpy").random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.get_rng_state(),
        "rng_tracker_states": {},
    }
    state["rng_state"] = ShardedObject("rng_state", [rng], (1, 1), (0, 0), replica_id=0)
    dist_checkpointing.save(state, str(it_dir))
    (out / "ckpt" / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    json.dump(sorted(model.state_dict().keys()), open(out / "mcore_names.json", "w"))


def load(spec: dict) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    style = spec["model"]
    model = build_model(style)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    it_dir = Path(spec["ckpt"])
    # As Megatron-LM's load_checkpoint asks: the model under "model"; common.pt's entries come back beside it.
    request = {"model": model.sharded_state_dict()}
    loaded, missing, unexpected = dist_checkpointing.load(
        request, str(it_dir), strict=StrictHandling.RETURN_ALL
    )
    model.load_state_dict(loaded["model"], strict=True)
    args = loaded["args"]
    tokens = torch.tensor(spec["tokens"])
    out = Path(spec["out"])
    torch.save(
        {
            "logits": logits_of(model, tokens, style["vocab_size"]),
            "absent_from_checkpoint": sorted(unexpected),
            "not_asked_for": sorted(missing),
            "iteration": loaded["iteration"],
            "args": {
                k: getattr(args, k)
                for k in ("num_layers", "hidden_size", "padded_vocab_size", "consumed_train_samples")
            },
            "checkpoint_version": loaded["checkpoint_version"],
        },
        out / "mcore_loaded.pt",
    )


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    _setup(spec.get("seed", 1234))
    {"save": save, "load": load}[spec["action"]](spec)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
