"""HuggingFace interop: exports give HF's logits, imports give ours bitwise, refusals are one exact line."""

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from convert_helpers import export_perturbed, hf_model, our_logits
from dist_utils import run_distributed
from helpers import ONE_LAYER, PRETRAIN_GPT, ROOT, run_python, tiny_flags
from training.megatron_log import parse_lines

from megatron_lite.arguments import parse_config
from megatron_lite.convert import export_to_hf, import_from_hf
from megatron_lite.convert.cli import convert_main
from megatron_lite.convert.common import config_accepts, require_hf
from megatron_lite.convert.hf_import import ARGS_FILENAME, model_settings
from megatron_lite.core.models.gpt import GPTModel
from megatron_lite.errors import UserError, run_cli
from megatron_lite.inference import generate, load_model_for_inference
from megatron_lite.parallel_state import initialize_parallel
from megatron_lite.tokenizer import build_tokenizer
from megatron_lite.training.checkpointing import load_model_weights, read_full_tensors, save_checkpoint
from megatron_lite.training.data_samplers import MockGPTDataset
from megatron_lite.training.training import pretrain

HF_EXTRA = "HuggingFace interop needs the hf extra: pip install -e .[hf]"
transformers = pytest.importorskip("transformers", reason=HF_EXTRA)
safetensors_torch = pytest.importorskip("safetensors.torch", reason=HF_EXTRA)

CONVERT = str(ROOT / "tools" / "convert_checkpoint.py")
LOGIT_ATOL = 1e-4  # fp32 HF vs megatron-lite: different kernels, same function

# The two model styles of the task, trained at TP=2. init-method-std 0.2 spreads the logits so greedy
# choices are far from ties that kernel-order rounding could flip.
MODELS = {
    "gpt2": "--tokenizer-type GPT2BPETokenizer",
    "llama": (
        "--tokenizer-type ByteTokenizer --normalization RMSNorm --position-embedding-type rope --swiglu "
        "--group-query-attention --num-query-groups 2 --untie-embeddings-and-output-weights "
        "--disable-bias-linear --norm-epsilon 1e-6 --rotary-base 5000"
    ),
}
COMMON = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --init-method-std 0.2 "
    "--mock-data --micro-batch-size 2 --global-batch-size 4 --train-iters 3 --lr 1e-2 --num-workers 0 "
    "--eval-iters 0 --log-interval 10 --peak-tflops 1 --tensor-model-parallel-size 2 --save-interval 2 "
    "--no-save-optim"
)
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def _train_both(rank: int, world_size: int, root: str) -> list[float]:
    losses = []
    for name, flags in MODELS.items():
        cfg = parse_config(f"{COMMON} {flags} --save {root}/{name}".split())
        losses += [loss for _, loss in pretrain(cfg, initialize_parallel(2)).losses]
    return losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Checkpoints of both styles trained 3 iterations by 2 real TP ranks (saved at iterations 2 and 3)."""
    root = tmp_path_factory.mktemp("trained")
    per_rank = run_distributed(_train_both, 2, str(root))
    assert [len(losses) for losses in per_rank] == [6, 6]  # both models trained 3 iterations on both ranks
    return root


@pytest.fixture(scope="module")
def exported(trained) -> Path:
    out = trained / "hf"
    for name in MODELS:
        assert convert_main(["export", "--load", str(trained / name), "--save-dir", str(out / name)]) == 0
    return out


def _shakespeare_ids(tokenizer, limit: int) -> list[int]:
    with gzip.open(ROOT / "data" / "shakespeare.jsonl.gz", "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"]
    line = next(line for line in text.splitlines() if line.startswith("Several young French Lords"))
    return tokenizer.encode(line)[:limit]


# ---- trained at TP=2, exported, compared with HF ---------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_export_gives_hf_the_same_logits(trained, exported, name):
    model, cfg, tokenizer = load_model_for_inference(str(trained / name))
    ids = _shakespeare_ids(tokenizer, 32)
    hf = hf_model(exported / name)
    assert type(hf).__name__ == ARCHITECTURES[name]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    ours = our_logits(model, ids)
    assert theirs.shape == ours.shape == (len(ids), cfg.vocab_size)  # padding rows are not exported
    diff = (theirs - ours).abs().max().item()
    print(f"{name}: max |logit diff| HF vs megatron-lite = {diff:.3e} over {len(ids)} tokens")
    assert diff < LOGIT_ATOL
    assert ours.std().item() > 0.5  # a real spread of logits, not a flat function matching trivially


def test_gpt2_export_has_hf_tokenizer_files(trained, exported):
    files = sorted(p.name for p in (exported / "gpt2").iterdir())
    assert files == [
        "config.json",
        "merges.txt",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported / "gpt2"), local_files_only=True)
    ours = build_tokenizer("GPT2BPETokenizer")
    with gzip.open(ROOT / "data" / "shakespeare.jsonl.gz", "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"][:4000]
    assert hf_tokenizer.encode(text) == ours.encode(text)
    assert hf_tokenizer.eos_token_id == ours.eod == 50256


def test_llama_export_records_the_byte_tokenizer(exported):
    assert sorted(p.name for p in (exported / "llama").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((exported / "llama" / "config.json").read_text())
    assert config["megatron_lite_tokenizer_type"] == "ByteTokenizer"
    assert (config["num_key_value_heads"], config["tie_word_embeddings"], config["eos_token_id"]) == (
        2,
        False,
        256,
    )
    assert config["rms_norm_eps"] == 1e-6


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generation_matches_hf(trained, exported, name):
    model, _, tokenizer = load_model_for_inference(str(trained / name))
    prompt = _shakespeare_ids(tokenizer, 12)
    ours = generate(model, prompt, 16, greedy=True, eod=tokenizer.eod)
    hf = hf_model(exported / name)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=tokenizer.eod,
            pad_token_id=tokenizer.eod,
        )
    theirs = out[0, len(prompt) :].tolist()
    if theirs and theirs[-1] == tokenizer.eod:
        theirs = theirs[:-1]
    assert ours == theirs
    assert len(ours) >= 4


@pytest.mark.parametrize("name", list(MODELS))
def test_import_of_export_reproduces_our_logits_bitwise(trained, exported, tmp_path, name):
    result = import_from_hf(exported / name, tmp_path / "back")
    original, cfg, tokenizer = load_model_for_inference(str(trained / name))
    back, back_cfg, _ = load_model_for_inference(str(tmp_path / "back"))
    ids = _shakespeare_ids(tokenizer, 32)
    assert torch.equal(our_logits(back, ids), our_logits(original, ids))
    # The same model settings come back (Llama has no hidden dropout, so that one reads 0 there).
    expected = model_settings(cfg) | ({"hidden_dropout": 0.0} if name == "llama" else {})
    assert model_settings(back_cfg) == expected == model_settings(result.config)
    assert (back_cfg.tokenizer_type, result.architecture) == (cfg.tokenizer_type, ARCHITECTURES[name])


def test_export_of_an_earlier_iteration_in_bfloat16(trained, tmp_path):
    with pytest.raises(UserError) as err:
        export_to_hf(trained / "llama", tmp_path / "hf", iteration=1)
    assert str(err.value) == (
        f"--iteration 1: {trained / 'llama'} has no iter_0000001 (it has: iter_0000002, iter_0000003)"
    )
    result = export_to_hf(trained / "llama", tmp_path / "hf", iteration=2, dtype="bfloat16")
    assert (result.iteration, result.dtype) == (2, "bfloat16")
    weights = safetensors_torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    ours = read_full_tensors(trained / "llama", 2)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert torch.equal(weights["lm_head.weight"], ours["output_layer.weight"].to(torch.bfloat16))
    assert not torch.equal(
        ours["output_layer.weight"], read_full_tensors(trained / "llama", 3)["output_layer.weight"]
    )
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


# ---- random HF models -> import -> pretrain_gpt.py --finetune ---------------------------------------------


def _rope_kwargs(params: dict) -> dict:
    """RoPE settings as this transformers version spells them (5.x: rope_parameters; 4.x: theta + scaling)."""
    if config_accepts(transformers.LlamaConfig, "rope_parameters"):
        return {"rope_parameters": params}
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return {
        "rope_theta": params["rope_theta"],
        "rope_scaling": None if params["rope_type"] == "default" else scaling,
    }


def _randomhf_model(kind: str):
    """A randomly initialised HF model (no download), its weights spread so its loss is far from ln(V)."""
    torch.manual_seed(3)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4, layer_norm_epsilon=1e-5
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            **_rope_kwargs({"rope_type": "default", "rope_theta": 20000.0}),
        )
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model.eval()


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return run_python(args, tmp_path, HF_HUB_OFFLINE="1")  # never reach out for a model


IMPORTED_FLAGS = {
    "gpt2": (
        "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --kv-channels 8 --ffn-hidden-size 128 "
        "--max-position-embeddings 64 --position-embedding-type learned_absolute --normalization LayerNorm "
        "--norm-epsilon 1e-05 --openai-gelu --attention-dropout 0.1 --hidden-dropout 0.1 --vocab-size 300"
    ),
    "llama": (
        "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
        "--kv-channels 8 --ffn-hidden-size 48 --max-position-embeddings 64 --position-embedding-type rope "
        "--rotary-base 20000 --normalization RMSNorm --norm-epsilon 1e-06 --swiglu --disable-bias-linear "
        "--attention-dropout 0.0 --hidden-dropout 0.0 --vocab-size 300"
    ),
}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_random_hf_model_imports_and_finetunes_from_its_weights(tmp_path, kind, capsys):
    hf = _randomhf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    if kind == "llama":  # the pickle path: pytorch_model.bin, read with weights_only=True
        (tmp_path / "hf" / "model.safetensors").unlink()
        torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: convert_main(["import", "--hf-dir", str(tmp_path / "hf"), "--save", str(ckpt)]))
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.splitlines()[:4] == [
        f"imported {ARCHITECTURES[kind]} from {tmp_path / 'hf'} into {ckpt} (iteration 0)",
        "tokenizer: none recognised (pass --tokenizer-type when training)",
        f"model settings: {ckpt / ARGS_FILENAME}",
        f"model flags: {IMPORTED_FLAGS[kind]}",
    ]

    seq, batch = 16, 2
    proc = _run(
        [
            str(PRETRAIN_GPT),
            *f"--yaml-cfg {tmp_path / 'ckpt' / ARGS_FILENAME} --finetune --load {tmp_path / 'ckpt'} --mock-data "
            f"--seq-length {seq} --micro-batch-size {batch} --train-iters 1 --lr 1e-4 --attention-dropout 0 "
            "--hidden-dropout 0 --num-workers 0 --eval-iters 0 --log-interval 1 --peak-tflops 1".split(),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    [line] = parse_lines(proc.stdout)
    run_loss = float(line["loss"])

    samples = [MockGPTDataset(batch, seq, 300, seed=1234)[i] for i in range(batch)]
    tokens = torch.stack([s["tokens"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    with torch.no_grad():
        hf_loss = F.cross_entropy(hf(tokens).logits.reshape(-1, 300), labels.reshape(-1)).item()
    print(
        f"{kind}: pretrain_gpt.py --finetune iteration-1 loss {run_loss:.6e}, HF loss on that batch {hf_loss:.6e}"
    )
    assert abs(hf_loss - math.log(300)) > 0.5  # a model that lost its weights would sit near ln(V)
    assert run_loss == pytest.approx(hf_loss, abs=2e-5, rel=2e-6)


# ---- options the target cannot express ------------------------------------------------------------------

TINY = tiny_flags(**ONE_LAYER, micro_batch_size=1, vocab_size=50, train_iters=1)
LLAMA_FLAGS = "--normalization RMSNorm --position-embedding-type rope --swiglu"
EXPORT_REFUSALS = {
    "--position-embedding-type rope": (
        "cannot export: --normalization LayerNorm with --position-embedding-type rope has no HuggingFace "
        "equivalent (GPT2LMHeadModel is LayerNorm with learned_absolute, LlamaForCausalLM is RMSNorm with rope)"
    ),
    "--normalization RMSNorm --swiglu": (
        "cannot export: --normalization RMSNorm with --position-embedding-type learned_absolute has no "
        "HuggingFace equivalent (GPT2LMHeadModel is LayerNorm with learned_absolute, LlamaForCausalLM is "
        "RMSNorm with rope)"
    ),
    "--position-embedding-type none": (
        "cannot export: --normalization LayerNorm with --position-embedding-type none has no HuggingFace "
        "equivalent (GPT2LMHeadModel is LayerNorm with learned_absolute, LlamaForCausalLM is RMSNorm with rope)"
    ),
    "--untie-embeddings-and-output-weights": (
        "cannot export to GPT2LMHeadModel: --untie-embeddings-and-output-weights is set, but GPT-2 always "
        "ties the output layer to the word embeddings"
    ),
    "--swiglu": "cannot export to GPT2LMHeadModel: --swiglu is set, but GPT-2's MLP is plain GELU",
    "--group-query-attention --num-query-groups 1": (
        "cannot export to GPT2LMHeadModel: --group-query-attention with --num-query-groups 1 (of 2 heads) is "
        "set, but GPT-2 has no grouped-query attention"
    ),
    "--kv-channels 4": (
        "cannot export to GPT2LMHeadModel: --kv-channels 4 x --num-attention-heads 2 is not --hidden-size 16, "
        "but GPT-2's heads always split the hidden size"
    ),
    "--normalization RMSNorm --position-embedding-type rope": (
        "cannot export to LlamaForCausalLM: --swiglu is off, but Llama's MLP is always gated SiLU (SwiGLU)"
    ),
    "--normalization RMSNorm --position-embedding-type rope --swiglu --rotary-percent 0.5": (
        "cannot export to LlamaForCausalLM: --rotary-percent 0.5 rotates part of each head, but Llama rotates "
        "all of it (--rotary-percent 1.0)"
    ),
    "--qk-layernorm": "cannot export to GPT2LMHeadModel: --qk-layernorm is set, but GPT-2 has no query/key norms",
    "--window-size 3,0": (
        "cannot export to GPT2LMHeadModel: --window-size 3,0 is set, but GPT-2 has no sliding-window attention"
    ),
    f"{LLAMA_FLAGS} --use-rope-scaling --rotary-seq-len-interpolation-factor 2": (
        "cannot export to LlamaForCausalLM: --use-rope-scaling with --rotary-seq-len-interpolation-factor is two "
        "RoPE scalings; HuggingFace's rope_parameters holds one rope_type"
    ),
    f"{LLAMA_FLAGS} --window-size 3,0": (
        "cannot export to MistralForCausalLM (the HF model for --window-size): the model has linear biases, but "
        "Mistral has none; train with --disable-bias-linear"
    ),
    f"{LLAMA_FLAGS} --qk-layernorm": (
        "cannot export to Qwen3ForCausalLM (the HF model for --qk-layernorm): the model has MLP biases (no "
        "--disable-bias-linear), but Qwen3's MLP has none"
    ),
}


@pytest.mark.parametrize("flags", list(EXPORT_REFUSALS))
def test_export_refuses_what_the_target_cannot_express(tmp_path, flags, capsys):
    cfg = parse_config(TINY + flags.split()).finalize(1)
    save_checkpoint(tmp_path / "ckpt", 1, GPTModel(cfg), None, None, cfg, None, consumed_train_samples=0)
    argv = ["export", "--load", str(tmp_path / "ckpt"), "--save-dir", str(tmp_path / "hf")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: convert_main(argv))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {EXPORT_REFUSALS[flags]}\n"
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def _write_hf_config(directory: Path, config) -> Path:
    config.save_pretrained(directory)
    return directory


IMPORT_REFUSALS = {
    "silu-gpt2": (
        lambda: transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, activation_function="silu"),
        "cannot import this GPT2LMHeadModel: activation_function 'silu' is none of those megatron-lite's MLP "
        "computes (gelu, gelu_python, gelu_new, gelu_pytorch_tanh, gelu_fast, gelu_accurate, gelu_python_tanh, "
        "relu2)",
    ),
    "llama3-rope-other-constants": (
        lambda: transformers.LlamaConfig(
            hidden_size=16,
            num_attention_heads=2,
            **_rope_kwargs(
                {
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 4096,
                }
            ),
        ),
        "cannot import this LlamaForCausalLM: llama3 rope original_max_position_embeddings 4096 differs from "
        "Megatron's 8192, the only value --use-rope-scaling computes",
    ),
    "yarn-rope": (
        lambda: transformers.LlamaConfig(
            hidden_size=16,
            num_attention_heads=2,
            max_position_embeddings=64,
            **_rope_kwargs(
                {
                    "rope_type": "yarn",
                    "rope_theta": 10000.0,
                    "factor": 2.0,
                    "original_max_position_embeddings": 32,
                }
            ),
        ),
        "cannot import this LlamaForCausalLM: rope scaling 'yarn' (rope_parameters/rope_scaling) is not "
        "supported; megatron-lite implements default, linear and llama3 RoPE",
    ),
    "gelu-llama": (
        lambda: transformers.LlamaConfig(hidden_size=16, num_attention_heads=2, hidden_act="gelu"),
        "cannot import this LlamaForCausalLM: hidden_act 'gelu' is not 'silu', the SwiGLU gate megatron-lite "
        "computes",
    ),
    "qwen3-mixed-windows": (
        lambda: transformers.Qwen3Config(
            hidden_size=16,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            num_hidden_layers=2,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        ),
        "cannot import this Qwen3ForCausalLM: layer_types mixes sliding and full attention layers; "
        "megatron-lite's --window-size applies to every layer",
    ),
    "qwen2": (
        lambda: transformers.Qwen2Config(hidden_size=16, num_attention_heads=2, num_key_value_heads=2),
        "{dir}/config.json: model_type 'qwen2' is not supported; megatron-lite imports GPT2LMHeadModel "
        "(gpt2), LlamaForCausalLM (llama), Qwen3ForCausalLM (qwen3), MistralForCausalLM (mistral), "
        "MixtralForCausalLM (mixtral), Qwen3MoeForCausalLM (qwen3_moe), Qwen2MoeForCausalLM (qwen2_moe), "
        "DeepseekV3ForCausalLM (deepseek_v3)",
    ),
}


@pytest.mark.parametrize("case", list(IMPORT_REFUSALS))
def test_import_refuses_what_megatron_lite_cannot_compute(tmp_path, case):
    make_config, message = IMPORT_REFUSALS[case]
    hf_dir = _write_hf_config(tmp_path / "hf", make_config())
    with pytest.raises(UserError) as err:
        import_from_hf(hf_dir, tmp_path / "ckpt")
    assert str(err.value) == message.format(dir=hf_dir)
    assert not (tmp_path / "ckpt").exists()


def _tiny_llama(**overrides):
    values = dict(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**values, **overrides)).eval()


def test_import_refuses_a_nonzero_bias_it_would_drop(tmp_path):
    # attention_bias without mlp_bias maps to --add-qkv-bias, which has no o_proj bias: a zero one is
    # dropped (same function), a nonzero one refused.
    hf = _tiny_llama(attention_bias=True, mlp_bias=False)
    hf.save_pretrained(tmp_path / "zero")
    result = import_from_hf(tmp_path / "zero", tmp_path / "zero-ckpt")
    assert (result.config.add_qkv_bias, result.config.add_bias_linear) == (True, False)
    with torch.no_grad():
        hf.model.layers[0].self_attn.o_proj.bias.fill_(0.5)
    hf.save_pretrained(tmp_path / "nonzero")
    with pytest.raises(UserError) as err:
        import_from_hf(tmp_path / "nonzero", tmp_path / "nonzero-ckpt")
    assert str(err.value) == (
        f"--hf-dir {tmp_path / 'nonzero'} holds tensors megatron-lite's model has no place for: "
        "layers.0.self_attn.o_proj.bias"
    )


def test_import_refuses_missing_weights_and_an_occupied_save_dir(tmp_path):
    hf = _tiny_llama()
    hf.config.save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError) as err:
        import_from_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert str(err.value) == (
        f"--hf-dir {tmp_path / 'hf'}: no model.safetensors or pytorch_model.bin (or their .index.json) with the "
        "weights"
    )
    hf.save_pretrained(tmp_path / "hf")
    import_from_hf(tmp_path / "hf", tmp_path / "ckpt")
    with pytest.raises(UserError) as err:
        import_from_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert str(err.value) == f"--save {tmp_path / 'ckpt'} already holds a checkpoint; give a new directory"


def test_sharded_checkpoint_imports_with_hf_logits(tmp_path):
    hf = _tiny_llama(num_key_value_heads=1, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="2KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    result = import_from_hf(tmp_path / "hf", tmp_path / "ckpt")
    model = GPTModel(result.config).eval()
    load_model_weights(model, tmp_path / "ckpt")
    ids = list(range(3, 40, 3))
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    assert (theirs - our_logits(model, ids)).abs().max().item() < LOGIT_ATOL


# ---- exact parity for layouts the trained models do not cover ---------------------------------------------

VARIANTS = {
    # GPT-2 without biases exports zero biases; a ffn other than 4h is n_inner.
    "gpt2-no-bias": "--disable-bias-linear --ffn-hidden-size 40",
    # Qwen-style QKV bias only: Llama's attention_bias adds a zero o_proj bias. Head size != h / heads.
    "llama-qkv-bias": (
        "--normalization RMSNorm --position-embedding-type rope --swiglu --disable-bias-linear --add-qkv-bias "
        "--group-query-attention --num-query-groups 2 --kv-channels 16"
    ),
    # All linear biases, tied embeddings, multi-head (no GQA).
    "llama-biases-tied": "--normalization RMSNorm --position-embedding-type rope --swiglu",
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layout_variants_round_trip_exactly(tmp_path, variant):
    model, ids, ours, diff = export_perturbed(tmp_path, VARIANTS[variant])
    print(f"{variant}: max |logit diff| HF vs megatron-lite = {diff:.3e}")
    assert diff < LOGIT_ATOL
    result = import_from_hf(tmp_path / "hf", tmp_path / "back")
    back = GPTModel(result.config).eval()
    load_model_weights(back, tmp_path / "back")
    assert torch.equal(our_logits(back, ids), ours)


# ---- transformers stays optional --------------------------------------------------------------------------


def test_missing_transformers_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises ImportError
    with pytest.raises(UserError) as err:
        require_hf()
    assert str(err.value) == "HuggingFace conversion needs transformers (not installed): pip install -e .[hf]"


def test_the_tool_imports_transformers_only_when_converting(tmp_path):
    code = (
        "import sys; sys.modules['transformers'] = None; sys.modules['safetensors'] = None\n"
        "import runpy; sys.argv = ['convert_checkpoint.py', 'export', '--load', 'x', '--save-dir', 'y']\n"
        f"runpy.run_path({CONVERT!r}, run_name='__main__')"
    )
    proc = _run(["-c", code], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: HuggingFace conversion needs transformers and safetensors (not installed): pip install -e .[hf]\n"
    )
