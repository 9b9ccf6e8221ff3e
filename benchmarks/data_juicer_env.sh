#!/usr/bin/env bash
# The peer environment of benchmarks/data_pipeline.py: data-juicer 1.6.1 in its own virtual
# environment (default benchmarks/.work/venv-dj), never in .venv.
#
#   bash benchmarks/data_juicer_env.sh [VENV]      (or: make bench-dj-env)
#
# Why by hand:
# - `pip install py-data-juicer==1.6.1` leaves out modules the Steel-LLM recipe's ops import:
#   opencc (chinese_convert_mapper), selectolax (clean_html_mapper), ftfy (fix_unicode_mapper),
#   simhash-pybind (document_simhash_deduplicator), aiohttp.
# - data-juicer installs whatever else it misses at run time (utils/lazy_loader.py, via
#   `python -m uv pip install`, then pip): ray (data_juicer.core imports its Ray executor),
#   av (op fusion checks for video containers) and, through them, a CUDA torch: ~6 GB.
#   So torch goes in first, the CPU build, and ray and av are installed here; the benchmark
#   runs data-juicer with PIP_NO_INDEX=1 UV_OFFLINE=1, so a module still missing fails the
#   run instead of downloading.
set -euo pipefail

VENV=${1:-benchmarks/.work/venv-dj}
PYTHON=${PYTHON:-python3}
# The CPU torch: this machine's wheelhouse when it has the file, else PyTorch's CPU index.
if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
  TORCH_SRC=(--find-links /opt/wheels)
else
  TORCH_SRC=(--index-url https://download.pytorch.org/whl/cpu)
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==2.13.0" "${TORCH_SRC[@]}"
"$VENV/bin/pip" install -q "py-data-juicer==1.6.1" "aiohttp==3.14.5" "opencc==1.4.2" \
  "selectolax==1.0.2" "ftfy==6.3.1" "simhash-pybind==0.0.3" "ray==2.60.0" "av==18.1.0"

# Everything the recipe needs imports offline, and torch is still the CPU build.
PIP_NO_INDEX=1 UV_OFFLINE=1 "$VENV/bin/python" - <<'EOF'
import av, ftfy, opencc, ray, selectolax, simhash, torch  # noqa: F401
import data_juicer.core  # noqa: F401
assert torch.__version__.endswith("+cpu"), f"torch {torch.__version__} is not the CPU build"
print(f"data-juicer env ready: torch {torch.__version__}, ray {ray.__version__}")
EOF
touch "$VENV/.ready"
