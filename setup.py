"""Install megatron-lite: `pip install -e .` (add `[dev]` for tests and lint, `[hf]` for HuggingFace interop and
HuggingFaceTokenizer, `[sentencepiece]` for the SentencePiece tokenizers, `[megatron]` for the megatron-core
reference the Megatron-LM checkpoint interop tests run against, on CPU)."""

from setuptools import find_packages, setup

setup(
    name="megatron-lite",
    version="0.1.0",
    description="Megatron-style GPT pretraining in plain PyTorch: tensor + data parallel, CPU and GPU",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_lite", "megatron_lite.*"]),
    package_data={"megatron_lite.tokenizer": ["assets/*"], "megatron_lite.arguments": ["*.json"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.3",
        "tiktoken>=0.6",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tensorboard>=2.14",
    ],
    extras_require={
        # sentencepiece in dev too, so that the SentencePiece tokenizer tests run wherever the tests do;
        # hypothesis for the config fuzz test.
        "dev": ["pytest>=7", "ruff>=0.5", "sentencepiece>=0.1.99", "hypothesis>=6.0"],
        "hf": ["transformers>=4.40", "safetensors>=0.4"],
        "sentencepiece": ["sentencepiece>=0.1.99"],
        "wandb": ["wandb>=0.16"],
        # 0.16.1: the newest megatron-core for Python 3.11 (0.17 needs 3.12); it imports psutil unlisted.
        "megatron": ["megatron-core==0.16.1", "psutil>=5.9"],
    },
)
