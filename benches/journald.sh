#!/bin/bash
# What imaged's `info` lines cost when they go to journald, as they do for a user (`make bench-journald`,
# docs/BENCHMARKS.md). Installs the package in the systemd sandbox (tests/sandbox, as tests/package.sh does),
# then sends the same distinct images through it at log.level "info" and "warn", alternating, and reads the
# CPU time imaged (the unit's MainPID) and systemd-journald took per image from /proc inside the sandbox.
# Needs root. Nothing is asserted; the figures go to stdout.
#
# Environment: IMAGED_DEB=path (default: make deb), IMAGES (2000), ROUNDS (3), SANDBOX=path.

set -euo pipefail
cd "$(dirname "$0")/.."
SANDBOX=${SANDBOX:-$PWD/tests/sandbox/sandbox}
IMAGES=${IMAGES:-2000}
ROUNDS=${ROUNDS:-3}

if [ "$(id -u)" -ne 0 ]; then
    echo "SKIP: journald bench: needs root to boot the systemd sandbox"
    exit 0
fi
sb() { "$SANDBOX" -n imaged-bench "$@"; }
in_sb() { sb exec "$@"; }
WORK=$(mktemp -d /tmp/imaged-journald-bench.XXXXXX)
trap 'sb stop >/dev/null 2>&1; rm -rf "$WORK"' EXIT

DEB=${IMAGED_DEB:-$(make --no-print-directory deb | tail -n 1)}
[ -f "$DEB" ] || { echo "no package: $DEB"; exit 1; }

# Distinct JPEGs (imaged stores each content once), as tests/package.sh makes them, N per round.
mkdir -p "$WORK/img"
for r in $(seq 1 $((2 * ROUNDS))); do
    mkdir -p "$WORK/img/$r"
    for i in $(seq 1 "$IMAGES"); do
        { head -c -2 sample.jpg; printf 'journald bench %s %s' "$r" "$i"; printf '\xff\xd9'; } >"$WORK/img/$r/$i.jpg"
    done
done
tar -C "$WORK" -cf "$WORK/img.tar" img

sb stop >/dev/null 2>&1 || true
sb boot >/dev/null
sb apt mosquitto-clients >/dev/null
sb install "$DEB" >/dev/null
# The benchmark's broker settings (docs/BENCHMARKS.md, "The broker's config"): the broker does not bound the window.
printf 'max_inflight_messages 1000\nmax_queued_messages 1000000\nset_tcp_nodelay true\n' >"$WORK/broker.conf"
sb mosquitto "$WORK/broker.conf" >/dev/null
sb cp "$WORK/img.tar" /root/img.tar
in_sb tar -C /root -xf /root/img.tar

# cpu PID: utime + stime in clock ticks.
cpu() { in_sb cat "/proc/$1/stat" | sed 's/.*) //' | awk '{print $12 + $13}'; }
stored() { in_sb find /var/lib/imaged/images -name '*.jpg' | wc -l; }
hz=$(getconf CLK_TCK)

echo "journald bench: $IMAGES images of $(stat -c %s sample.jpg) bytes per round, $ROUNDS rounds per level"
printf '| round | log.level | imaged CPU ms per image | systemd-journald CPU ms per image | journal lines per image | images/s |\n'
printf '|---|---|---|---|---|---|\n'
round=0
for r in $(seq 1 "$ROUNDS"); do
    for level in info warn; do
        round=$((round + 1))
        in_sb sed -i "s/^level = .*/level = \"$level\"/" /etc/imaged.toml
        in_sb systemctl restart imaged
        pid=$(in_sb systemctl show -p MainPID --value imaged)
        jpid=$(in_sb systemctl show -p MainPID --value systemd-journald)
        before=$(stored)
        lines0=$(in_sb journalctl -u imaged -o cat --no-pager | wc -l)
        i0=$(cpu "$pid")
        j0=$(cpu "$jpid")
        t0=$(date +%s.%N)
        in_sb imaged send --log-level warn --window 256 "/root/img/$round" >/dev/null
        until [ "$(stored)" -ge $((before + IMAGES)) ]; do sleep 0.1; done
        t1=$(date +%s.%N)
        i1=$(cpu "$pid")
        j1=$(cpu "$jpid")
        # journald may still be writing what it was sent.
        sleep 1
        lines1=$(in_sb journalctl -u imaged -o cat --no-pager | wc -l)
        j2=$(cpu "$jpid")
        awk -v r="$r" -v l="$level" -v n="$IMAGES" -v hz="$hz" -v i="$((i1 - i0))" -v j="$((j2 - j0))" \
            -v lines="$((lines1 - lines0))" -v t0="$t0" -v t1="$t1" \
            'BEGIN { printf "| %d | %s | %.3f | %.3f | %.2f | %.0f |\n", r, l, i * 1000 / hz / n, j * 1000 / hz / n, lines / n, n / (t1 - t0) }'
    done
done
