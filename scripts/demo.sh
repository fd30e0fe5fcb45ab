#!/usr/bin/env bash
# The whole system in one command: a private Mosquitto on a free loopback port, imaged storing into
# ./stored_images, `imaged receive` saving ./latest_from_server.jpg, and sample.jpg sent through it.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGED=${IMAGED:-target/release/imaged}
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
work=$(mktemp -d /tmp/imaged-demo.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The demo's own output from an earlier run goes, so this run shows a fresh "Image saved".
rm -rf stored_images latest_from_server.jpg

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for _ in $(seq 50); do
    port=$(( (RANDOM % 20000) + 30000 ))
    port_free "$port" || continue
    printf 'listener %s 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nuser root\n' "$port" > "$work/mosquitto.conf"
    "$MOSQUITTO" -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
    broker=$!
    for _ in $(seq 50); do port_free "$port" || break; sleep 0.1; done
    if kill -0 "$broker" 2>/dev/null && ! port_free "$port"; then pids+=("$broker"); break; fi
    broker=
done
[ -n "${broker:-}" ] || { echo "demo: could not start mosquitto" >&2; exit 1; }
echo "== Mosquitto listening on 127.0.0.1:$port (private, config in $work)"

cat > "$work/imaged.toml" <<TOML
[broker]
host = "127.0.0.1"
port = $port
client_id = "imaged-demo"

[storage]
dir = "stored_images"
TOML
"$IMAGED" --config "$work/imaged.toml" 2>"$work/imaged.log" &
pids+=($!)
for _ in $(seq 100); do grep -q "Ready:" "$work/imaged.log" && break; sleep 0.1; done
grep -q "Ready:" "$work/imaged.log" || { cat "$work/imaged.log"; echo "demo: imaged did not get ready" >&2; exit 1; }
echo "== imaged is running (storage ./stored_images)"

"$IMAGED" --config "$work/imaged.toml" receive --count 1 --output latest_from_server.jpg 2>/dev/null > "$work/receive.out" &
receiver=$!
pids+=("$receiver")
sleep 0.5

echo "== imaged send sample.jpg"
"$IMAGED" --config "$work/imaged.toml" send sample.jpg
# Not a hang when the image does not come through (a disk short of retention.min_free, say): imaged says why.
for _ in $(seq 150); do kill -0 "$receiver" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$receiver" 2>/dev/null; then
    cat "$work/imaged.log" >&2
    echo "demo: sample.jpg did not come back on image/stored within 15 s; imaged's log is above" >&2
    exit 1
fi
wait "$receiver"

echo "== the daemon said:"
grep -E "Image saved|Image re-published" "$work/imaged.log" | sed -E 's/^[^ ]+ +INFO //; s/ path=.*//; s/ name=.*//'
echo "== the receiver said:"
cat "$work/receive.out"
echo "== stored files:"
ls -l stored_images/*.jpg
stored=$(ls stored_images/*.jpg | head -n1)
cmp sample.jpg "$stored" && cmp sample.jpg latest_from_server.jpg \
    && echo "== sample.jpg, $stored and latest_from_server.jpg are byte-identical"
