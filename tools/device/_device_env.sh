# Sourced by the GPU benchmark scripts: run from the repo root on a lent device (no network, no
# megatron-core). Installs the carried megatron-core wheel (.mcore/, `pip download --no-deps
# megatron-core==0.19.2 -d .mcore`) and makes megatron_fp4 importable without installing it;
# records the device and versions in $OUT/device.txt.
mkdir -p "$OUT"
export CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
PY=${PYTHON:-python3}
if ! $PY -c "import megatron.training" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile .mcore/megatron_core-*.whl || exit 1
fi
if ! $PY -c "import megatron_fp4.kernels, megatron_fp4.patches, megatron_fp4.recipes" 2>/dev/null; then
  # setup.py maps kernels/, patches/, recipes/ into megatron_fp4; mirror that without installing
  for d in kernels patches recipes; do ln -sfn "../$d" "megatron_fp4/$d"; done
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
$PY -c "import torch, triton, megatron.core as m; print('torch', torch.__version__, 'triton', triton.__version__, 'megatron-core', m.__version__)" | tee -a "$OUT/device.txt"
