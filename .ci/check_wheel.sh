#!/usr/bin/env bash
# Builds the sdist and wheel, installs the wheel with its runtime dependencies
# only into a fresh virtual environment, and runs the README's quick start.
set -euo pipefail
cd "$(dirname "$0")/.."

rm -rf dist
python -m build --sdist --wheel --outdir dist . >/dev/null
ls dist

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install --quiet dist/*.whl

# The quick start block of the README, then a few steps of it.
python - "$scratch/quickstart.py" <<'PY'
import re, sys
readme = open("README.md").read().split("## Quick start", 1)[1]
code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
code += """
x = jnp.ones((8, 3)); y = jnp.full((8,), 2.0)
for _ in range(300):
    params, state = step(params, state, x, y)
print("quick start from the wheel: loss", float(loss(params, x, y)))
assert float(loss(params, x, y)) < 1e-3
"""
open(sys.argv[1], "w").write(code)
PY
(cd "$scratch" && "$scratch/venv/bin/python" quickstart.py)
"$scratch/venv/bin/python" -c "import optax_amsgrad, pathlib; assert (pathlib.Path(optax_amsgrad.__file__).parent / 'py.typed').exists(); print('py.typed shipped')"
# The wheel carries the compiled CPU kernel; the sdist its source.
(cd "$scratch" && "$scratch/venv/bin/python" -c "import optax_amsgrad; assert optax_amsgrad.cpu_kernel_available(); print('CPU kernel shipped')")
sdist_files=$(tar -tzf dist/*.tar.gz)
for source in amsgrad_cpu.cc blockwise.h coefficients.def; do
  grep -q "optax_amsgrad/cpu/csrc/$source" <<<"$sdist_files"
done
echo "kernel source in the sdist"
