#!/usr/bin/env bash
# The quickstart in one command: install, preprocess the bundled Shakespeare, train a small GPT on the CPU
# (a few minutes), then print a sample. TensorBoard logs go to runs/quickstart, checkpoints to checkpoints/.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install torch==2.13.0   # CPU build on these machines
python -m pip install --quiet -e .
python tools/preprocess_data.py --input data/shakespeare.jsonl.gz --output-prefix data/shakespeare \
    --tokenizer-type ByteTokenizer --append-eod --workers 2
# bf16 autocast where this CPU multiplies bf16 faster than fp32 (AVX-512 BF16/AMX); plain fp32 elsewhere.
precision=$(python -c "
import torch
from megatron_lite.training.flops import measure_matmul_flops as m
cpu = torch.device('cpu')
print('--bf16' if m(cpu, torch.bfloat16)[0] > 1.5 * m(cpu, torch.float32)[0] else '')")
echo "training with ${precision:-fp32}"
python pretrain_gpt.py --yaml-cfg configs/quickstart.yaml $precision
python tools/generate.py --load checkpoints/quickstart --prompt "ROMEO:" --max-new-tokens 400 \
    --temperature 0.8 --top-k 40 --seed 1
echo
echo "TensorBoard: tensorboard --logdir runs/quickstart"
