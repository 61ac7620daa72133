#!/usr/bin/env bash
# Download the wheels a bare GPU host lacks for `python -m bench.device` into .whl/ (git-ignored).
#
# The host (Python 3.12, x86_64, no network) already has torch, triton, numba, numpy, h5py,
# safetensors, tqdm, matplotlib, prometheus-client, pyyaml, absl-py, etils and imageio. It lacks
# pydantic, gymnasium, mujoco and the grpc health/reflection packages, and its grpcio/protobuf may be
# older than the versions dmm/v1's generated code was made with, so those travel too. bench.device
# installs them with `pip install --no-index --no-deps --target`.
#
# The wheels are recompressed with LZMA (pip reads any zip method; 29 -> 22 MiB). With
# --scores-only the serving stack (grpcio, protobuf, their health/reflection packages) stays behind,
# so that the packed score data (`python -m bench.device --pack-data`, 44 MB) fit in the same call.
#
#   bash tools/device/wheels.sh            # then: python -m bench.device (on the GPU host)
#   bash tools/device/wheels.sh --scores-only
set -euo pipefail

cd "$(dirname "$0")/../.."
DEST=.whl
LIMIT_MIB=64
WHEELS=(
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    gymnasium==1.4.0
    farama-notifications==0.0.6
    cloudpickle==3.1.3
    mujoco==3.11.0
    glfw==2.11.0
)
if [[ "${1:-}" != "--scores-only" ]]; then
    WHEELS+=(grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2)
fi

PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_34 manylinux_2_35; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done

rm -rf "$DEST"
mkdir -p "$DEST"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" --platform any -d "$DEST" "${WHEELS[@]}"

python3 - "$DEST" <<'EOF'
import sys
import zipfile
from pathlib import Path

for wheel in Path(sys.argv[1]).glob("*.whl"):
    packed = wheel.with_suffix(".lzma")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_LZMA) as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info), compress_type=zipfile.ZIP_LZMA)
    packed.replace(wheel)
EOF

size_mib=$(du -sm "$DEST" | cut -f1)
echo "$(ls "$DEST"/*.whl | wc -l) wheels, ${size_mib} MiB in $DEST"
if (( size_mib > LIMIT_MIB )); then
    echo "wheels.sh: $DEST is ${size_mib} MiB, over the ${LIMIT_MIB} MiB a device call may carry" >&2
    exit 1
fi
