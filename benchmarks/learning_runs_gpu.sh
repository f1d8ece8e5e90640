#!/usr/bin/env bash
# The next GPU learning run of issue 15 (written in session 5, NOT run: that session had no device time left).
# One device `run` call: `bash benchmarks/learning_runs_gpu.sh`, carry ["build/benchwhl", "build/tfwhl",
# "build/mini/pipeline"] (benchmarks/README.md builds them). Meta-CoT (arm d) and no-CoT side by side on the mini models,
# same data, stopped by training time (SECS, default 330 s); each writes learning_curves.json and its grid, and
# both final/ folders come back (bf16, split into 15 MB parts) for `metacot eval` and a Stage 2 run on the CPU.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_NUM_THREADS=6
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    build/benchwhl/*.whl build/tfwhl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv
V="train=6000,steps=99999,eval=300:800:1500:2500:4000,heldout=200,batch=256,seconds=${SECS:-330},final=1"
V="$V,sft.train.lr_schedule=constant,sft.train.warmup_steps=100,sft.data.understanding_ratio=0.25"
V="$V,sft.understanding.lr=5e-4,sft.generation.lr=1e-3,sft.edit_region_weight=3"
L="python3 benchmarks/learning_curves.py --device cuda --models build/mini/pipeline --threads 6 --stack-dump 150"
mkdir -p $OUT/a $OUT/b
timeout 545 $L --out $OUT/a --work /tmp/wa --variant name=metacot,$V > /tmp/log_a.txt 2>&1 &
timeout 545 $L --out $OUT/b --work /tmp/wb --variant name=nocot,$V,sft.no_cot=true > /tmp/log_b.txt 2>&1 &
(sleep 200; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv) &
wait
grep -h 'step\|setup_seconds\|final\|rror\|Traceback' /tmp/log_a.txt /tmp/log_b.txt | cut -c1-600; tail -5 /tmp/log_a.txt /tmp/log_b.txt | cut -c1-300
python3 - <<'PY'
import glob, torch
from safetensors.torch import load_file, save_file
for f in glob.glob("/tmp/w*/*/run/final/**/*.safetensors", recursive=True):
    sd = load_file(f)
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, f)
PY
cd /tmp && tar cf - wa/metacot/run/final wb/nocot/run/final | split -b 15M - $OUT/finals.tar.
ls -la $OUT $OUT/a $OUT/b
