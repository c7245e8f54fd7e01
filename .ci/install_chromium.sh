#!/usr/bin/env bash
# Installs headless Chromium for tests/test_trace_viewer_browser.py if it is missing.
# Never fails the build: without Chromium that test skips and says why.
cd "$(dirname "$0")/.." || exit 0
for candidate in chromium chromium-browser google-chrome; do
    if command -v "$candidate" >/dev/null 2>&1; then
        echo "install_chromium: found $(command -v "$candidate")"
        exit 0
    fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: no apt-get on this machine; the browser test will skip"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_chromium: not root and no password-less sudo; the browser test will skip"
        exit 0
    fi
fi
log="$(mktemp)"
if $SUDO apt-get update >"$log" 2>&1 && \
   DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium >>"$log" 2>&1; then
    echo "install_chromium: installed $(command -v chromium)"
else
    echo "install_chromium: apt-get could not install chromium (last lines below); the browser test will skip"
    tail -n 5 "$log"
fi
rm -f "$log"
exit 0
