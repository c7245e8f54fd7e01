#!/usr/bin/env bash
# Installs OpenMPI (Debian's openmpi-bin, libopenmpi-dev) and mpi4py into .venv (the virtualenv the
# README's test command creates and then reuses), for `ringpipe bench collectives|p2p --compare mpi`
# and their tests. Never fails the build: without them those tests skip and say why.
cd "$(dirname "$0")/.." || exit 0
log="$(mktemp)"
if ! command -v mpirun >/dev/null 2>&1 || ! command -v mpicc >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != "0" ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            SUDO="sudo -n"
        else
            SUDO="none"
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install_mpi: no apt-get on this machine; the MPI comparisons will skip"
    elif [ "$SUDO" = "none" ]; then
        echo "install_mpi: not root and no password-less sudo; the MPI comparisons will skip"
    elif $SUDO apt-get update >"$log" 2>&1 && \
         DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends \
             openmpi-bin libopenmpi-dev >>"$log" 2>&1; then
        :
    else
        echo "install_mpi: apt-get could not install OpenMPI (last lines below); the MPI comparisons will skip"
        tail -n 5 "$log"
    fi
fi
if command -v mpirun >/dev/null 2>&1; then
    if python3 -m venv .venv && . .venv/bin/activate; then
        # mpi4py's wheel loads the system's libmpi at run time; without a wheel for this Python,
        # pip builds it with mpicc from libopenmpi-dev.
        if ! pip install -q mpi4py >"$log" 2>&1; then
            echo "install_mpi: pip could not install mpi4py (last lines below); the MPI comparisons will skip"
            tail -n 5 "$log"
        fi
    else
        echo "install_mpi: could not create .venv; the MPI comparisons will skip"
    fi
fi
# MPICH's launcher (Hydra), for the test of MPICH's PMI_* variables: PyPI's mpich wheel under
# /opt/mpich, never on PATH (its mpirun would shadow OpenMPI's). Needs only libc.
if [ ! -x /opt/mpich/bin/mpiexec.hydra ] && [ -x .venv/bin/python ] && mkdir -p /opt/mpich 2>/dev/null; then
    if ! .venv/bin/python -m pip install -q --prefix /opt/mpich --no-deps --no-warn-script-location mpich \
            >"$log" 2>&1; then
        echo "install_mpi: pip could not install mpich into /opt/mpich (last lines below); its test will skip"
        tail -n 5 "$log"
    fi
fi
rm -f "$log"
echo "install_mpi: $( (mpirun --version 2>/dev/null || echo 'no mpirun') | head -n 1)"
echo "install_mpi: MPICH's mpiexec.hydra $([ -x /opt/mpich/bin/mpiexec.hydra ] && echo present || echo missing)"
if [ -x .venv/bin/python ]; then
    .venv/bin/python - <<'PY' || true
try:
    import mpi4py
    from mpi4py import MPI  # loads libmpi: proves the pair works, not only that pip finished
    print(f"install_mpi: mpi4py {mpi4py.__version__} on {MPI.Get_library_version().splitlines()[0].strip()}")
except Exception as exc:  # a broken install is reported, not fatal
    print(f"install_mpi: mpi4py not importable ({type(exc).__name__}: {exc})")
PY
fi
exit 0
