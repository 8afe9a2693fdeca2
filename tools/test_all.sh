#!/usr/bin/env bash
# The project's one test command: README names it and .ci/run runs exactly it.
#   1. .venv-test: `pip install -e ".[dev]"` (nbdev 2, fastcore<2 and the fastai that goes with them; numba, for its kernel)
#   2. the exported modules (ckpt_avg/, pyproject.toml) and README.md match the notebooks
#   3. the notebooks' tests (nbdev_test; cells flagged `#| notest` are skipped)
#   4. pytest tests/
#   5. .venv-newest: `pip install -e . pytest safetensors accelerate nbclient ipykernel` (the newest fastai and fastcore, no nbdev, no numba:
#      what a plain install gets, so the numpy kernel does every average there), pytest tests/ again
# A venv is reused while settings.ini and setup.py are unchanged since it was built (a clean clone, as in CI,
# builds both afresh); FRESH=1 rebuilds them anyway.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
started=$SECONDS

section() { printf '\n==== %s (%ds) ====\n' "$*" $((SECONDS - started)); }

# make_venv DIR PIP_ARGS...: a venv in DIR with `pip install PIP_ARGS`, rebuilt only when its stamp is stale
make_venv() {
    local dir=$1; shift
    local stamp
    stamp=$({ cat settings.ini setup.py; echo "$*"; "$PY" --version; } | sha256sum | cut -d' ' -f1)
    if [[ ${FRESH:-0} != 1 && -x $dir/bin/python && -f $dir/.stamp && $(cat "$dir/.stamp") == "$stamp" ]]; then
        echo "reusing $dir: settings.ini and setup.py are unchanged since it was built (FRESH=1 rebuilds it)"
    else
        rm -rf "$dir"
        "$PY" -m venv "$dir"
        echo "pip install $* (log: $dir/pip.log)"
        if ! "$dir/bin/pip" install "$@" >"$dir/pip.log" 2>&1; then
            grep -v "^WARNING: Location" "$dir/pip.log" | tail -40
            echo "FAILED: pip could not install $* into $dir; the lines above say why" >&2
            exit 1
        fi
        echo "$stamp" >"$dir/.stamp"
    fi
    "$dir/bin/python" -c 'import sys, fastai, fastcore, torch; print(f"python {sys.version.split()[0]}, fastai {fastai.__version__}, fastcore {fastcore.__version__}, torch {torch.__version__}")'
}

# run_pytest VENV: pytest on tests/, where "no tests collected" (exit 5) is a failure, not a pass
run_pytest() {
    local rc=0
    "$1/bin/python" -m pytest -q tests || rc=$?
    if [[ $rc == 5 ]]; then echo "FAILED: pytest collected no tests from tests/; it should find the test_*.py files there" >&2; exit 1; fi
    if [[ $rc != 0 ]]; then echo "FAILED: pytest tests/ in $1 (exit $rc)" >&2; exit "$rc"; fi
}

section "dev venv .venv-test"
make_venv .venv-test -e ".[dev]"
V=.venv-test/bin

section "exported modules match the notebooks"
# Export into a scratch copy and compare, so that this check changes nothing here, works before the first commit
# and in a dirty tree; in CI's clean clone it amounts to `git diff` plus untracked files after nbdev_export.
# nbdev_export also writes pyproject.toml (from settings.ini), so that is compared too.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp -a settings.ini nbs ckpt_avg "$scratch/"
if [[ -f pyproject.toml ]]; then cp pyproject.toml "$scratch/"; fi
(cd "$scratch" && "$OLDPWD/$V/nbdev_export")
stale=0
diff -r -x __pycache__ ckpt_avg "$scratch/ckpt_avg" || stale=1
diff pyproject.toml "$scratch/pyproject.toml" || stale=1
if [[ $stale == 1 ]]; then
    echo "FAILED: ckpt_avg/ or pyproject.toml is out of date with nbs/ and settings.ini (diff above: < here, > after nbdev_export)." >&2
    echo "Run .venv-test/bin/nbdev_export and commit the result." >&2
    exit 1
fi
echo "ckpt_avg/ and pyproject.toml match nbs/ and settings.ini"

section "README.md matches nbs/index.ipynb"
$V/python tools/make_readme.py --check

section "notebook tests (nbdev_test)"
# one torch thread per notebook: two notebooks at once on two cores, without threads fighting for them
OMP_NUM_THREADS=1 $V/nbdev_test --n_workers 2 --timing

section "pytest tests/ with the dev venv"
run_pytest .venv-test

section "newest fastai without nbdev: .venv-newest"
make_venv .venv-newest -e . pytest safetensors accelerate nbclient ipykernel

section "pytest tests/ with the newest fastai"
run_pytest .venv-newest

section "all tests passed"
