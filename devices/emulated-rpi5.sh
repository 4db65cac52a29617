#!/usr/bin/env bash
# An emulated Raspberry Pi 5 on this machine: a Debian arm64 root (Raspberry Pi OS is Debian
# bookworm arm64) whose own arm64 sshd and Python run under qemu-user through binfmt_misc.
#
#   devices/emulated-rpi5.sh [up]   build the root if needed, start its sshd (default)
#   devices/emulated-rpi5.sh build  build (or reuse) the root only
#   devices/emulated-rpi5.sh stop   stop the sshd and unmount /proc /sys /dev
#   devices/emulated-rpi5.sh status exit 0 when the board answers over ssh
#
# The board is reached exactly like a real one: devices/inventory.yaml's `rpi5-emulated` names
# the ssh config this script writes (its IdentityFile and UserKnownHostsFile, host-key checking on).
# Everything lives outside the clone, in $EDGEOPT_EMU_DIR (default /var/cache/edgeopt/emulated-rpi5):
#   root/           the arm64 root; rebuilt only when the build recipe below changes
#   ssh_config      Host rpi5-emulated -> 127.0.0.1:<port>, user pi, the key and known_hosts below
#   id_ed25519      the user key;  known_hosts  the board's generated host key
# Needs root (debootstrap, chroot, mounts) and binfmt_misc; otherwise one line and exit 2
# (a build that fails exits 1).
set -euo pipefail

DIR="${EDGEOPT_EMU_DIR:-/var/cache/edgeopt/emulated-rpi5}"
ROOT="$DIR/root"
ALIAS=rpi5-emulated
BOARD_USER=pi

# The build recipe: a change to any of these rebuilds the root (see recipe_hash).
SUITE=bookworm
MIRROR="${EDGEOPT_EMU_MIRROR:-http://deb.debian.org/debian}"
DEB_PACKAGES=python3,python3-venv,openssh-server,rsync,procps
WHEELS="numpy onnxruntime ai-edge-litert numba pytest"
QEMU_CPU=cortex-a76  # the Raspberry Pi 5's core (BCM2712)

die() { echo "emulated-rpi5: $*" >&2; exit 2; }   # cannot run here (or bad input)
fail() { echo "emulated-rpi5: $*" >&2; exit 1; }  # could run, but the build or start failed
log() { echo "emulated-rpi5: $*" >&2; }

recipe_hash() {
  # The root depends on what is installed in it, not on how the sshd is started: editing the
  # start-up half of this script must not cost a fresh debootstrap.
  printf '%s\n' "$SUITE" "$MIRROR" "$DEB_PACKAGES" "$WHEELS" "$(declare -f build_root)" \
    | sha256sum | cut -c1-16
}

need_host() {
  [ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and mounts); run it with sudo"
  [ "$(uname -m)" = x86_64 ] || [ "$(uname -m)" = aarch64 ] || die "unsupported host $(uname -m)"
  if [ "$(uname -m)" = aarch64 ]; then return; fi
  if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
     || ! command -v update-binfmts >/dev/null; then
    if command -v apt-get >/dev/null; then
      log "installing qemu-user-static debootstrap binfmt-support"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap \
        binfmt-support >/dev/null || die "apt-get could not install qemu-user-static debootstrap binfmt-support"
    else
      die "needs qemu-user-static, debootstrap and binfmt-support (no apt-get here)"
    fi
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
      || die "no binfmt_misc support (cannot mount /proc/sys/fs/binfmt_misc; a container without privileges?)"
  fi
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 \
    || die "cannot register qemu-aarch64 with binfmt_misc"
  grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
    || die "binfmt_misc has no enabled qemu-aarch64 entry"
}

mount_api() {
  # XNNPACK's cpuinfo reads /sys/devices/system/cpu; sshd needs /dev and /proc; the agent spots
  # qemu through /proc/sys/fs/binfmt_misc, a submount of /proc (hence --rbind).
  local fs
  for fs in proc sys dev; do
    mkdir -p "$ROOT/$fs"
    mountpoint -q "$ROOT/$fs" || mount --rbind "/$fs" "$ROOT/$fs"
  done
}

write_cpuinfo() {
  # qemu-user shows the host's /proc/cpuinfo; cpuinfo (inside XNNPACK and onnxruntime) then finds
  # no ARM cores and LiteRT >= 2.3 crashes. A Raspberry Pi 5's (Cortex-A76, MIDR 0x414fd0b1), one
  # entry per host CPU, is bound over it; its Model line says the board is emulated.
  local n i
  n="$(grep -c '^processor' /proc/cpuinfo)"
  {
    for ((i = 0; i < n; i++)); do
      printf 'processor\t: %d\nBogoMIPS\t: 108.00\n' "$i"
      printf 'Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n'
      printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n'
    done
    printf 'Model\t\t: Raspberry Pi 5 (emulated by qemu-user on %s, devices/emulated-rpi5.sh)\n' "$(uname -m)"
  } >"$DIR/cpuinfo"
  mountpoint -q "$ROOT/proc/cpuinfo" || mount --bind "$DIR/cpuinfo" "$ROOT/proc/cpuinfo"
}

umount_api() {
  local fs
  for fs in dev sys proc; do
    if mountpoint -q "$ROOT/$fs" 2>/dev/null; then umount -R -l "$ROOT/$fs"; fi
  done
  # never delete or rebuild over a root that still has the host's /dev, /proc or /sys inside
  if grep -q " $ROOT/" /proc/mounts; then fail "cannot unmount the host's file systems from $ROOT"; fi
}

in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8 "$@"; }

build_root() {
  # debootstrap, a user `pi` with a venv holding the agent's runtimes (aarch64 wheels from PyPI).
  local tmp="$DIR/root.partial"
  umount_api
  rm -rf --one-file-system "$tmp" "$ROOT"
  debootstrap --arch=arm64 --variant=minbase --include="$DEB_PACKAGES" "$SUITE" "$tmp" "$MIRROR" \
    >"$DIR/debootstrap.log" 2>&1 || fail "debootstrap failed; see $DIR/debootstrap.log"
  mv "$tmp" "$ROOT"
  # pip inside the root reaches the registry only with the host's CA bundle.
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  mount_api
  in_root useradd --create-home --shell /bin/bash "$BOARD_USER"
  in_root su - "$BOARD_USER" -c "python3 -m venv edgeopt-venv"
  in_root su - "$BOARD_USER" -c "PIP_CERT=/etc/ssl/certs/ca-certificates.crt edgeopt-venv/bin/pip \
    install --disable-pip-version-check -q $WHEELS" >"$DIR/pip.log" 2>&1 \
    || fail "pip install of the aarch64 wheels failed; see $DIR/pip.log"
  in_root rm -f /etc/ssh/ssh_host_*
  in_root apt-get clean
}

ensure_root() {
  local want
  want="$(recipe_hash)"
  if [ -f "$DIR/root.stamp" ] && [ "$(cat "$DIR/root.stamp")" = "$want" ] && [ -x "$ROOT/usr/sbin/sshd" ]; then
    return
  fi
  stop_sshd
  log "building the arm64 root in $ROOT (debootstrap + wheels under emulation: several minutes)"
  local t0=$SECONDS
  rm -f "$DIR/root.stamp"
  build_root
  echo "$want" >"$DIR/root.stamp"
  echo "$((SECONDS - t0))" >"$DIR/build_seconds"
  log "root built in $((SECONDS - t0)) s"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

sshd_running() {
  [ -f "$DIR/sshd.pid" ] && kill -0 "$(cat "$DIR/sshd.pid")" 2>/dev/null
}

stop_sshd() {
  if sshd_running; then
    kill "$(cat "$DIR/sshd.pid")" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do sshd_running || break; sleep 0.5; done
  fi
  rm -f "$DIR/sshd.pid"
}

write_keys() {
  # A host key generated on first start (never shipped in the root), and the user's key.
  if [ ! -f "$ROOT/etc/ssh/ssh_host_ed25519_key" ]; then
    ssh-keygen -q -t ed25519 -N '' -C "$ALIAS" -f "$ROOT/etc/ssh/ssh_host_ed25519_key"
  fi
  [ -f "$DIR/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C "edgeopt@$ALIAS" -f "$DIR/id_ed25519"
  in_root usermod -p '*' "$BOARD_USER"  # no password, but not locked: sshd admits it by key only
  local home="$ROOT/home/$BOARD_USER"
  install -d -m 700 "$home/.ssh"
  install -m 600 "$DIR/id_ed25519.pub" "$home/.ssh/authorized_keys"
  in_root chown -R "$BOARD_USER:$BOARD_USER" "/home/$BOARD_USER/.ssh"
}

write_ssh_config() {
  local port="$1"
  echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$ROOT/etc/ssh/ssh_host_ed25519_key.pub")" >"$DIR/known_hosts.tmp"
  mv "$DIR/known_hosts.tmp" "$DIR/known_hosts"
  cat >"$DIR/ssh_config.tmp" <<EOF
# Written by devices/emulated-rpi5.sh; host-key checking stays on (StrictHostKeyChecking yes).
Host $ALIAS
  HostName 127.0.0.1
  Port $port
  User $BOARD_USER
  IdentityFile $DIR/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $DIR/known_hosts
  StrictHostKeyChecking yes
EOF
  mv "$DIR/ssh_config.tmp" "$DIR/ssh_config"
}

board_answers() {
  [ -f "$DIR/ssh_config" ] && ssh -F "$DIR/ssh_config" -o BatchMode=yes -o ConnectTimeout=20 \
    "$ALIAS" true </dev/null >/dev/null 2>&1
}

start_sshd() {
  if sshd_running && board_answers; then
    log "already running on port $(cat "$DIR/port")"
    return
  fi
  stop_sshd
  mount_api
  write_cpuinfo
  write_keys
  mkdir -p "$ROOT/run/sshd"
  local port
  port="$(free_port)"
  # The root's own arm64 sshd, chrooted: each session's shell and python are arm64 binaries too.
  # QEMU_CPU: emulate the Pi 5's Cortex-A76, not qemu's default "max" CPU (SVE, i8mm, SME...), on
  # which LiteRT picked int8 kernels that scored digits-vmamba 7.41% instead of 98.15%.
  setsid chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin:/usr/sbin:/sbin LANG=C.UTF-8 QEMU_CPU=$QEMU_CPU \
    /usr/sbin/sshd -o SetEnv=QEMU_CPU=$QEMU_CPU \
    -D -e -p "$port" -o ListenAddress=127.0.0.1 -o PasswordAuthentication=no \
    -o KbdInteractiveAuthentication=no -o UsePAM=no -o PermitRootLogin=no \
    -h /etc/ssh/ssh_host_ed25519_key -o PidFile=none </dev/null >"$DIR/sshd.log" 2>&1 &
  echo $! >"$DIR/sshd.pid"
  echo "$port" >"$DIR/port"
  write_ssh_config "$port"
  for _ in $(seq 1 60); do
    if board_answers; then log "running: ssh -F $DIR/ssh_config $ALIAS (port $port)"; return; fi
    sshd_running || fail "sshd exited; see $DIR/sshd.log"
    sleep 1
  done
  stop_sshd
  fail "sshd does not answer on 127.0.0.1:$port; see $DIR/sshd.log"
}

cmd="${1:-up}"
case "$cmd" in
  up) need_host; mkdir -p "$DIR"; ensure_root; start_sshd ;;
  build) need_host; mkdir -p "$DIR"; ensure_root ;;
  stop) stop_sshd; umount_api ;;
  status) board_answers || die "not running (start it with devices/emulated-rpi5.sh)" ;;
  *) die "unknown command '$cmd' (up, build, stop, status)" ;;
esac
