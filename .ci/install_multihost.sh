#!/usr/bin/env bash
# Installs what the multi-host tests (pytest -m multihost: network-namespace hosts with their own
# sshd, a single-machine Slurm, OpenMPI's mpirun) need: Debian's openssh-server, slurm-wlm and
# munge. Never fails the build: without
# them those tests skip and say why. The tests start and stop their own daemons, on their own
# addresses and ports.
cd "$(dirname "$0")/.." || exit 0
log="$(mktemp)"
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
fi
missing=""
[ -x /usr/sbin/sshd ] || missing="$missing openssh-server"
command -v slurmd >/dev/null 2>&1 || missing="$missing slurm-wlm"
command -v munged >/dev/null 2>&1 || [ -x /usr/sbin/munged ] || missing="$missing munge"
if [ -n "$missing" ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install_multihost: no apt-get on this machine; the multihost tests will skip"
    elif [ "$SUDO" = "none" ]; then
        echo "install_multihost: not root and no password-less sudo; the multihost tests will skip"
    elif $SUDO apt-get update >"$log" 2>&1 && \
         DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends $missing >>"$log" 2>&1; then
        :
    else
        echo "install_multihost: apt-get could not install$missing (last lines below); those tests will skip"
        tail -n 5 "$log"
    fi
fi
rm -f "$log"
echo "install_multihost: sshd $([ -x /usr/sbin/sshd ] && echo present || echo missing)," \
     "slurmd $(command -v slurmd >/dev/null 2>&1 && echo present || echo missing)," \
     "munged $([ -x /usr/sbin/munged ] && echo present || echo missing)"
exit 0
