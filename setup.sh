#!/usr/bin/env bash
# One command from a fresh clone to a compiled, running DSConv model:
#   1. system packages (cross compilers, qemu, the Fashion-MNIST data set) via apt-get,
#   2. a virtualenv in .venv with dsconv-tvm and its pinned dependencies (+ test extras),
#   3. compiles the shipped example model models/resnet20.onnx for this CPU at W4 B=32 m=8 and
#      runs the .so on the first 8 Fashion-MNIST test images.
# Re-running is cheap: every step skips what is already done.  SETUP_NO_DEMO=1 skips step 3.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

bash tools/install_system_deps.sh

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.dsconv-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing dsconv-tvm and its dependencies into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # the CUDA compiler wheels (extra "cuda", ~46 MB) exist for x86-64 and aarch64 Linux only;
    # SETUP_NO_CUDA=1 leaves them out (then the CUDA/Jetson targets and their PTX tests are skipped)
    extras="test"
    case "$(uname -m)" in x86_64|aarch64) [ "${SETUP_NO_CUDA:-0}" = "1" ] || extras="test,cuda" ;; esac
    "$VENV/bin/python" -m pip install -q -e ".[$extras]"
    touch "$stamp"
fi

if [ "${SETUP_NO_DEMO:-0}" = "1" ]; then
    exit 0
fi
mkdir -p build
"$VENV/bin/dsconv-tvm" compile models/resnet20.onnx --target x86 -o build/resnet20.so
"$VENV/bin/python" - <<'PYEOF'
import numpy as np
from dsconv_tvm.accuracy.datasets import load_fashion_mnist
x, y = load_fashion_mnist("test")
np.save("build/fmnist_test8.npy", x[:8])
print("labels of the 8 images:", " ".join(str(int(v)) for v in y[:8]))
PYEOF
"$VENV/bin/dsconv-tvm" run build/resnet20.so --input build/fmnist_test8.npy --top-k 3
