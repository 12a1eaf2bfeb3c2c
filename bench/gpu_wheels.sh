#!/usr/bin/env bash
# Wheels for bench/gpu_check.py on a borrowed GPU machine, which has no network: OpenMM 8.6.1
# with its CUDA 13 plugin, and the part of relaymd's runtime dependencies (pyproject.toml's
# [project].dependencies, their closure resolved for CPython 3.12 on x86-64 Linux) that the
# machine's image lacks, plus hatchling for an offline `pip install --no-build-isolation -e .`.
#
#     bench/gpu_wheels.sh [DEST]      # DEST defaults to bench/wheels (gitignored)
#
# The device call names bench/wheels in `carry`; bench/README.md has the call. Everything that
# travels (the working tree and the carried paths) must stay under 64 MiB, so the total is
# printed and more than LIMIT_MIB is an error. Needs network to PyPI and the project's venv
# (PYTHON=... to use another interpreter with pip).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-$root/bench/wheels}
python=${PYTHON:-$root/.venv/bin/python}
limit_mib=${LIMIT_MIB:-56}

# The GPU machine: Python 3.12, glibc new enough for manylinux_2_34 (OpenMM's wheels need it).
target=(--only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

# Already on the GPU machines' image ('cuda', read 2026-11-17; /work/.library/device/KINDS.md):
# left out. numpy (OpenMM's one requirement) and the nvidia-* CUDA 13 libraries that
# openmm-cuda-13 loads (cuda-runtime, cuda-nvrtc, cufft; its RUNPATH is
# site-packages/nvidia/cu13/lib) are among them. openmm-cuda-13 also requires nvidia-cuda-nvcc,
# which the image lacks; its plugin links only libcuda, libcufft and libnvrtc (kernels are
# compiled by NVRTC), so it is not carried.
present="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp"
# On the image, but carried anyway: relaymd's closure asks for recent versions of them
# (prometheus-client>=0.26, click>=8.3.1 for sqlite-utils, rich>=14.2 for textual) and the
# image's versions are not known here. Small.
carry_anyway="prometheus-client click rich"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "resolving relaymd's runtime dependencies for CPython 3.12, manylinux x86-64..."
"$python" -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
    "$root/pyproject.toml" >"$tmp/requirements.txt"
printf '%s\n' hatchling editables >>"$tmp/requirements.txt"
"$python" -m pip download -q --disable-pip-version-check "${target[@]}" -d "$tmp/all" \
    -r "$tmp/requirements.txt"
"$python" -m pip download -q --disable-pip-version-check --no-deps "${target[@]}" -d "$tmp/all" \
    openmm==8.6.1 openmm-cuda-13==8.6.1

mkdir -p "$dest"
rm -f "$dest"/*.whl  # one version of each: two would stop the whole install
skipped=()
for wheel in "$tmp"/all/*.whl; do
    file=$(basename "$wheel")
    name=${file%%-*}
    name=${name//_/-}
    name=${name,,}
    if [[ " $present " == *[[:space:]]"$name"[[:space:]]* && " $carry_anyway " != *" $name "* ]]; then
        skipped+=("$name")
    else
        cp "$wheel" "$dest/"
    fi
done
echo "left out (on the GPU machine's image): ${skipped[*]}"
echo "carried, in $dest:"
(cd "$dest" && du -b -- *.whl | sort -rn | awk '{printf "  %8.2f MiB  %s\n", $1 / 1048576, $2}')
total=$(cat "$dest"/*.whl | wc -c)
count=$(find "$dest" -maxdepth 1 -name '*.whl' | wc -l)
mib=$(awk -v b="$total" 'BEGIN {printf "%.1f", b / 1048576}')
echo "total: $count wheels, $mib MiB ($total bytes)"
if ((total > limit_mib * 1048576)); then
    echo "over $limit_mib MiB: with the working tree it would not fit the 64 MiB a device call carries" >&2
    exit 1
fi
