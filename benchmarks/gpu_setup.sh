#!/usr/bin/env bash
# Prepares a bare CUDA machine for mtbi-fast from local wheels: nothing is downloaded, and the
# machine's own torch / triton / transformers are left alone.
#
#   bash benchmarks/gpu_setup.sh --stage /work/shared/gpu-wheels   # here, before the GPU run:
#                                       # copies the wheels into .gpu/wheels and the package at
#                                       # train_cases.BEFORE_REF into .gpu/before (git-ignored; carry .gpu)
#   bash benchmarks/gpu_setup.sh [SITE]                            # on the GPU machine
#   export PYTHONPATH=SITE:$PWD                                    # SITE defaults to /tmp/site
#
# On the GPU machine it installs every wheel in .gpu/wheels into SITE with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target SITE .gpu/wheels/*.whl
# (deepspeed + hjson, pydantic, pydantic-core, annotated-types, typing-inspection; liger-kernel;
# soundfile + cffi + pycparser; jiwer + rapidfuzz; gguf; typing-extensions) when one of deepspeed, liger_kernel,
# soundfile, jiwer is not importable, and makes the Triton kernels importable as `mtbi_kernels`
# (the project is not pip-installed there; the package is `kernels/mtbi_kernels/`) with a symlink
# SITE/mtbi_kernels -> kernels/mtbi_kernels. Then it reports which packages import.
# Exit status: non-zero when an install failed or mtbi_fast / mtbi_kernels / deepspeed do not
# import afterwards (torchaudio is optional: only resampling non-16 kHz audio needs it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-python3}
wheels=${GPU_WHEELS:-.gpu/wheels}
status=0

if [[ ${1:-} == --stage ]]; then
    src=${2:?usage: gpu_setup.sh --stage WHEEL_DIR}
    mkdir -p "$wheels"
    cp "$src"/*.whl "$wheels"/
    # pydantic 2.14 needs typing-extensions >= 4.16, newer than a GPU image may have (pure Python)
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$wheels" \
        "typing-extensions>=4.16" || echo "WARNING: could not download typing-extensions"
    # the package before the host-overhead work, for the overhead stage's "before" (no git there)
    ref=$(sed -n 's/^BEFORE_REF = "\(.*\)".*/\1/p' benchmarks/train_cases.py)
    rm -rf .gpu/before && mkdir -p .gpu/before
    git archive "$ref" mtbi_fast | tar -x -C .gpu/before || echo "WARNING: git archive $ref failed"
    echo "staged $(find "$wheels" -name '*.whl' | wc -l) wheels in $wheels and mtbi_fast@$ref in .gpu/before" \
         "(carry .gpu to the GPU run)"
    exit 0
fi

site=${1:-/tmp/site}
mkdir -p "$site"
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# which of the named modules cannot be found (without importing them: fast)
missing() {
    "$py" -c 'import importlib.util as u, sys; print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' "$@"
}

need=$(missing deepspeed liger_kernel soundfile jiwer)
if [[ -n $need ]]; then
    if compgen -G "$wheels/*.whl" > /dev/null; then
        echo "installing $(find "$wheels" -name '*.whl' | wc -l) wheels from $wheels into $site (missing: $need)"
        "$py" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
            --target "$site" "$wheels"/*.whl || { echo "pip install FAILED"; status=1; }
    else
        echo "WARNING: $need not installed and no wheels in $wheels (stage them with --stage DIR);" \
             "the cases that need them skip"
    fi
fi

if [[ -n $(missing mtbi_kernels) ]]; then
    ln -sfn "$PWD/kernels/mtbi_kernels" "$site/mtbi_kernels"
    echo "linked $site/mtbi_kernels -> $PWD/kernels/mtbi_kernels"
fi

# import each one for real and say which fail (a wheel that does not work here is worth knowing)
for mod in torchaudio mtbi_fast mtbi_kernels deepspeed liger_kernel soundfile jiwer; do
    if out=$("$py" -c "import $mod as m; print(getattr(m, '__version__', ''))" 2>&1); then
        echo "import $mod: ok ${out##*$'\n'}"
    else
        echo "import $mod: FAILED: ${out##*$'\n'}"
        case $mod in mtbi_fast | mtbi_kernels | deepspeed) status=1 ;; esac
    fi
done
exit $status
