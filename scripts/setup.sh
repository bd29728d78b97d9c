#!/usr/bin/env bash
# Idempotent environment setup for metasolve: a repo-local .venv with MPI, PETSc and torch.
#
# A stamp records what the venv was built from (this script, pyproject.toml, the venv's own
# path, PETSC_DIR/PETSC_ARCH); when it matches and PETSc imports, setup returns at once.
# A venv that no longer imports (moved, half-built, a PETSc linked against a vanished MPI)
# is removed and rebuilt instead of failing later with an obscure loader error.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
PETSC_VERSION="3.26.1"
STAMP="$VENV/.metasolve-setup"

fingerprint() {
    cat "$ROOT/scripts/setup.sh" "$ROOT/pyproject.toml"
    echo "venv=$VENV petsc_dir=${PETSC_DIR:-} petsc_arch=${PETSC_ARCH:-}"
}
wanted="$(fingerprint | sha256sum | cut -d' ' -f1)"

healthy() {
    "$VENV/bin/python" -c "import mpi4py.MPI; import petsc4py; petsc4py.init(); from petsc4py import PETSc; import torch, metasolve" \
        >/dev/null 2>&1
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$wanted" ]] && healthy; then
    exit 0
fi

if [[ -d "$VENV" ]] && ! "$VENV/bin/python" -c "import sys" >/dev/null 2>&1; then
    echo "setup: $VENV is broken (moved or its Python is gone); rebuilding it" >&2
    rm -rf "$VENV"
fi

have_lapack() {
    ldconfig -p 2>/dev/null | grep -qE 'lib(openblas|lapack)\.so( |$)'
}
if [[ -z "${PETSC_DIR:-}" ]] && ! have_lapack; then
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null; then
        echo "setup: no BLAS/LAPACK found; installing libopenblas-dev with apt-get" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas-dev >/dev/null
    else
        echo "setup: PETSc needs BLAS/LAPACK and none was found." >&2
        echo "       Install a development package (e.g. 'apt-get install libopenblas-dev')" >&2
        echo "       or point PETSC_DIR/PETSC_ARCH at an existing PETSc, then rerun make setup." >&2
        exit 1
    fi
fi

[[ -d "$VENV" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

echo "setup: installing MPI, numpy, scipy, torch and tools into $VENV" >&2
if [[ -n "${PETSC_DIR:-}" && -n "${MPICC:-}" ]]; then
    # A site PETSc: mpi4py must use the MPI that PETSc was built with, not the mpich wheel.
    "${PIP[@]}" --no-binary mpi4py mpi4py
else
    "${PIP[@]}" mpich mpi4py
fi
"${PIP[@]}" numpy scipy "torch==2.13.0" tqdm matplotlib pytest optuna

if [[ -n "${PETSC_DIR:-}" ]]; then
    echo "setup: building petsc4py against PETSC_DIR=$PETSC_DIR PETSC_ARCH=${PETSC_ARCH:-}" >&2
    "${PIP[@]}" "petsc4py==${PETSC4PY_VERSION:-$PETSC_VERSION}"
else
    echo "setup: installing PETSc $PETSC_VERSION + petsc4py (first time: compiles PETSc, ~15 min;" \
         "later: pip's wheel cache)" >&2
    MPICC="$VENV/bin/mpicc" MPICXX="$VENV/bin/mpicxx" \
    PETSC_CONFIGURE_OPTIONS="--with-fc=0 --with-x=0" \
        "${PIP[@]}" "petsc==$PETSC_VERSION" "petsc4py==$PETSC_VERSION"
fi

"${PIP[@]}" -e "$ROOT"

if ! healthy; then
    echo "setup: the environment was built but 'import mpi4py.MPI, petsc4py.PETSc, metasolve' fails:" >&2
    "$VENV/bin/python" -c "import mpi4py.MPI; from petsc4py import PETSc; import metasolve" >&2 || true
    exit 1
fi
echo "$wanted" > "$STAMP"
echo "setup: ready ($VENV)" >&2
