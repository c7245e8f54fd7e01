#!/usr/bin/env bash
# Installs a CPU build of torch, and transformers, into .venv (the virtualenv the README's test
# command creates and then reuses) for the tests that compare ringpipe with transformers.
# Never fails the build: where the install fails, those tests skip and say why.
# A plain `pip install torch` would pull ~3 GB of CUDA wheels; the +cpu build is pinned instead,
# from pip's configured sources first, else from PyTorch's CPU wheel index.
cd "$(dirname "$0")/.." || exit 0
TORCH="torch==2.13.0+cpu"
CPU_INDEX="https://download.pytorch.org/whl/cpu"
if ! python3 -m venv .venv || ! . .venv/bin/activate; then
    echo "install_torch: could not create .venv; the transformers tests will skip"
    exit 0
fi
log="$(mktemp)"
if pip install -q "$TORCH" >"$log" 2>&1 || \
   pip install -q --timeout 30 --retries 1 --extra-index-url "$CPU_INDEX" "$TORCH" >>"$log" 2>&1; then
    if ! pip install -q transformers >>"$log" 2>&1; then
        echo "install_torch: pip could not install transformers (last lines below); its tests will skip"
        tail -n 5 "$log"
    fi
else
    echo "install_torch: pip could not install $TORCH (last lines below); the transformers tests will skip"
    tail -n 5 "$log"
fi
rm -f "$log"
python - <<'PY' || true
import importlib
found = []
for name in ("torch", "transformers", "tokenizers"):
    try:
        found.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # a broken install is reported, not fatal
        found.append(f"{name} not importable ({type(exc).__name__})")
print("install_torch: the tests run with " + ", ".join(found))
PY
exit 0
