#!/usr/bin/env bash
# Builds the separate virtualenv that holds LLaMA-Factory 0.9.5, the reference the benchmarks
# in this folder measure tunepipe against. It never touches the project's .venv.
#
# Why these steps (each found by trying, on the 2-core x86_64 CPU machine):
#  - LLaMA-Factory imports torchaudio at start-up. PyPI's torchaudio wheels are CUDA builds that
#    pin one exact torch release, and the CPU torch 2.13.0 file on this disk has no torchaudio
#    beside it (torchaudio 2.11 next to it fails: libc10_cuda.so missing). torch 2.9.1 and
#    torchaudio 2.9.1, both from PyPI, import and run on the CPU (CUDA build, about 7 GB).
#  - torchvision is only needed for LLaMA-Factory's image plugins; a torchvision that does not
#    match torch breaks `import llamafactory`, so it is removed when it does not import cleanly.
#    (Seen here: pip resolves torchvision 0.24.1, which matches torch 2.9.1 and imports, so it
#    stays. Resolved versions: transformers 5.6.0, datasets 4.0.0, peft 0.18.1, trl 0.24.0.)
#  - LLaMA-Factory's own pins (transformers <= 5.6, datasets <= 4.0, peft <= 0.18.1,
#    trl <= 0.24, accelerate <= 1.11) are left to pip's resolver.
#
# Idempotent: re-running skips every step already done. Usage:
#   bash bench/setup_llamafactory.sh            # venv at bench/.lf-venv
#   LF_VENV=/some/dir bash bench/setup_llamafactory.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${LF_VENV:-$here/.lf-venv}"
python_bin="${PYTHON:-python3.11}"
lf_version="0.9.5"
torch_version="2.9.1"

if [[ ! -x "$venv/bin/python" ]]; then
  echo "[setup] creating $venv"
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

installed() { "$venv/bin/python" - "$1" "$2" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    sys.exit(0 if version(sys.argv[1]).split("+")[0] == sys.argv[2] else 1)
except PackageNotFoundError:
    sys.exit(1)
PY
}

if ! installed torch "$torch_version" || ! "$venv/bin/python" -c "import torchaudio" 2>/dev/null; then
  echo "[setup] installing torch $torch_version + torchaudio 2.9.* (large download)"
  "${pip[@]}" install "torch==$torch_version" "torchaudio==2.9.*"
fi

if ! installed llamafactory "$lf_version"; then
  echo "[setup] installing llamafactory $lf_version"
  # torch is named again so the resolver keeps the release installed above.
  "${pip[@]}" install "llamafactory==$lf_version" "torch==$torch_version" "torchaudio==2.9.*"
fi

# time-machine: template_parity.py holds LLaMA-Factory's clock on data.template_date's day
if ! installed time-machine 3.6.0; then
  "${pip[@]}" install "time-machine==3.6.0"
fi

if "${pip[@]}" show torchvision >/dev/null 2>&1 && ! "$venv/bin/python" -c "import torchvision" 2>/dev/null; then
  echo "[setup] removing torchvision (does not import beside this torch)"
  "${pip[@]}" uninstall -y torchvision
fi

echo "[setup] checking the import"
"$venv/bin/python" - <<'PY'
import torch, torchaudio, transformers, llamafactory
from llamafactory.data import get_dataset  # noqa: F401  (what bench/tokenize.py drives)
from llamafactory.train.tuner import run_exp  # noqa: F401  (what bench/train.py drives)
print(f"[setup] ok: llamafactory {llamafactory.__version__}, torch {torch.__version__}, "
      f"torchaudio {torchaudio.__version__}, transformers {transformers.__version__}")
PY
