#!/bin/bash
# The Debian package under a real systemd: builds target/debian/imaged_*.deb (make deb), checks it with
# lintian, then boots a Debian bookworm container with systemd as PID 1 (tests/sandbox) and
# walks the README's "Install on Debian/Ubuntu" path in it:
#   1. apt-get install (mosquitto comes as a Recommends): the service is enabled and active at once,
#      Type=notify, active only after READY=1 (it stays activating while the broker is down), no restarts
#   2. images sent with mosquitto_pub and `imaged send` land in /var/lib/imaged/images, journal fields
#   3. a hung daemon (SIGSTOP) is killed by the watchdog and restarted; images sent meanwhile are stored
#   4. a local edit of /etc/imaged.toml survives an upgrade; `systemctl restart` applies it
#   5. a broken config: the service fails with file, line and key in the journal, and is not restarted;
#      `systemctl reload` applies a new topic in the same process, and refuses a broken file, keeping the old
#   6. the broker password from password_file, then from the systemd credential mqtt-password
#   7. remove keeps config and images; purge removes the unit, the config and /var/lib/imaged
# One PASS/FAIL line per check; exits non-zero on any failure. Needs root (prints SKIP otherwise).
#
# Environment: IMAGED_DEB=path skips the build and tests that package; SANDBOX=path to the sandbox script;
# KEEP_LOG=1 keeps the command log.

set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SANDBOX=${SANDBOX:-$ROOT/tests/sandbox/sandbox}
NAME=imaged-test
START=$SECONDS

if [ "$(id -u)" -ne 0 ]; then
    echo "SKIP: package test (tests/package.sh): needs root to boot the systemd sandbox"
    exit 0
fi

WORK=$(mktemp -d /tmp/imaged-package-test.XXXXXX)
chmod 755 "$WORK"
LOG=$WORK/commands.log
passed=0
failed=0

pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); echo "FAIL: $*" >>"$LOG"; }
# check WHAT CMD...: PASS when CMD succeeds (its output goes to the log).
check() {
    local what=$1
    shift
    echo "+ $*" >>"$LOG"
    if "$@" >>"$LOG" 2>&1; then pass "$what"; else fail "$what"; fi
}
# eventually SECS CMD...: retries CMD every 0.2 s until it succeeds or SECS have passed.
eventually() {
    local end=$((SECONDS + $1))
    shift
    while :; do
        "$@" >>"$LOG" 2>&1 && return 0
        [ "$SECONDS" -ge "$end" ] && return 1
        sleep 0.2
    done
}
fatal() {
    fail "$*"
    echo "package test: stopped early; $passed passed, $failed failed"
    exit 1
}

sb() { "$SANDBOX" -n "$NAME" "$@"; }
in_sb() { sb exec "$@"; }
# prop NAME: one property of imaged.service.
prop() { in_sb systemctl show -p "$1" --value imaged.service; }
is_active() { [ "$(prop ActiveState)" = active ]; }
is_failed() { [ "$(prop ActiveState)" = failed ]; }
journal() { in_sb journalctl -u imaged --no-pager "$@"; }
fails() { ! "$@"; }
journal_has() { journal | grep -F -- "$1" >/dev/null; }  # not -q: with pipefail, SIGPIPE would fail it

cleanup() {
    local rc=$?
    if [ "$failed" -gt 0 ] && sb status >/dev/null 2>&1; then
        echo "---- journalctl -u imaged (last 40 lines) ----"
        journal -n 40 2>&1 | sed 's/^/    /'
        echo "---- end ----"
    fi
    sb stop >>"$LOG" 2>&1
    if [ "$failed" -gt 0 ] || [ -n "${KEEP_LOG:-}" ]; then
        echo "package test: command log kept in $LOG"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "package test: interrupted"; exit 130' INT TERM

[ -x "$SANDBOX" ] || fatal "systemd sandbox not found at $SANDBOX"
# One run at a time on this host: a second one would stop this one's sandbox (same name).
exec 8>"${TMPDIR:-/tmp}/imaged-package-test.lock"
flock -w 900 8 || fatal "another package test still runs after 15 minutes (lock ${TMPDIR:-/tmp}/imaged-package-test.lock)"

# Distinct JPEGs (imaged stores each content once): sample.jpg with a tag before its end marker.
make_jpeg() { # N -> $WORK/img-N.jpg, copied to /root/img-N.jpg in the sandbox; prints its sha256
    local f=$WORK/img-$1.jpg
    { head -c -2 sample.jpg; printf 'imaged package test image %s' "$1"; printf '\xff\xd9'; } >"$f"
    sb cp "$f" "/root/img-$1.jpg" >>"$LOG" 2>&1
    sha256sum "$f" | cut -d' ' -f1
}
# saved_path SHA: the PATH field of the journal's structured "Image saved" entry with that SHA256.
saved_path() {
    journal -o json | grep -F "\"SHA256\":\"$1\"" | grep -F '"MESSAGE":"Image saved: ' \
        | sed -n 's/.*"PATH":"\([^"]*\)".*/\1/p' | tail -n 1
}
# is_stored SHA: logged as saved under /var/lib/imaged/images, and the file there has that content.
is_stored() {
    local p
    p=$(saved_path "$1")
    case "$p" in /var/lib/imaged/images/*) ;; *) return 1 ;; esac
    [ "$(in_sb sha256sum "$p" | cut -d' ' -f1)" = "$1" ]
}
publish() { # FILE-INSIDE TOPIC
    in_sb mosquitto_pub -h 127.0.0.1 -q 1 -t "$2" -f "$1"
}

# ---------------------------------------------------------------- the package
if [ -n "${IMAGED_DEB:-}" ]; then
    DEB=$IMAGED_DEB
else
    t=$SECONDS
    echo "+ make deb" >>"$LOG"
    out=$(${MAKE:-make} --no-print-directory deb 2>>"$LOG") || { echo "$out" >>"$LOG"; tail -n 30 "$LOG"; fatal "make deb"; }
    echo "$out" >>"$LOG"
    DEB=$(echo "$out" | tail -n 1)
    [ -f "$DEB" ] || DEB=$(ls -t target/debian/imaged_*.deb 2>/dev/null | head -n 1)
    [ -f "$DEB" ] && pass "make deb built $(basename "$DEB") ($((SECONDS - t))s)"
fi
[ -f "$DEB" ] || fatal "no package to test (make deb, or IMAGED_DEB=$DEB)"

contents=$(dpkg-deb -c "$DEB" | awk '{print $6}')
has_all() {
    local p
    for p in ./usr/bin/imaged ./etc/imaged.toml ./usr/lib/systemd/system/imaged.service \
        ./usr/lib/sysusers.d/imaged.conf ./usr/share/man/man8/imaged.8.gz ./usr/share/man/man5/imaged.toml.5.gz \
        ./usr/share/bash-completion/completions/imaged ./usr/share/zsh/vendor-completions/_imaged \
        ./usr/share/doc/imaged/copyright ./usr/share/doc/imaged/changelog.Debian.gz; do
        grep -qx -- "$p" <<<"$contents" || { echo "missing $p"; return 1; }
    done
    [ "$(dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./conffiles)" = /etc/imaged.toml ] || { echo "conffiles"; return 1; }
    dpkg-deb -f "$DEB" Depends | grep -qF 'systemd | systemd-sysusers' || { echo "Depends"; return 1; }
    [ "$(dpkg-deb -f "$DEB" Recommends)" = mosquitto ] || { echo "Recommends"; return 1; }
}
check "package holds binary, conffile, unit, sysusers, man pages, completions, copyright, changelog; Depends/Recommends" has_all

if ! command -v lintian >/dev/null; then
    echo "+ apt-get install lintian" >>"$LOG"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends lintian \
        || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends lintian; }; } >>"$LOG" 2>&1
fi
lint=$(lintian -I -E --pedantic "$DEB" 2>/dev/null)
lint_rc=$?
echo "$lint" >>"$LOG"
if [ $lint_rc -eq 0 ] && ! grep -q '^[EW]:' <<<"$lint"; then
    pass "lintian -I -E --pedantic: no error, no warning ($(grep -c '^[A-Z]:' <<<"$lint") other tags)"
else
    fail "lintian -I -E --pedantic (exit $lint_rc):"
    sed 's/^/    /' <<<"$lint"
fi

# ---------------------------------------------------------------- 1. install
sb stop >>"$LOG" 2>&1 # a sandbox left over from an interrupted run
sb boot >>"$LOG" 2>&1 || fatal "sandbox boot (systemd as PID 1)"

# The README's commands. No broker yet: apt pulls mosquitto in (Recommends) and may configure it after imaged,
# so the install must not wait for imaged's READY=1 (postinst starts it with --no-block).
# mosquitto-clients first (mosquitto_pub; not the broker), which also refreshes the package lists.
sb apt mosquitto-clients >>"$LOG" 2>&1 || fatal "sandbox apt mosquitto-clients"
t=$SECONDS
check "apt-get install ./$(basename "$DEB") (pulls mosquitto in: Recommends)" sb install "$DEB"
check "install took $((SECONDS - t))s: apt did not wait for imaged's READY (TimeoutStartSec=30s)" \
    test $((SECONDS - t)) -lt 25
check "mosquitto was installed as a recommendation" \
    test "$(in_sb dpkg-query -W -f='${db:Status-Status}' mosquitto)" = installed
check "imaged.service is enabled" test "$(in_sb systemctl is-enabled imaged)" = enabled
if eventually 10 is_active; then
    pass "imaged.service is active ($((SECONDS - t))s after the install began)"
else
    fail "imaged.service is active within 10s of the install (ActiveState=$(prop ActiveState))"
fi
check "systemctl enable --now imaged (already done by the package: no change)" in_sb systemctl enable --now imaged
sb mosquitto >>"$LOG" 2>&1 || fatal "sandbox mosquitto (mosquitto-clients, broker on 127.0.0.1:1883)"
shown=$(in_sb systemctl show -p Type,NRestarts,Result,WatchdogUSec,User imaged | sort | tr '\n' ' ')
check "systemctl show: $shown" test "$shown" = "NRestarts=0 Result=success Type=notify User=imaged WatchdogUSec=30s "
check "systemd status line comes from imaged: $(prop StatusText | cut -c1-40)..." \
    bash -c '[[ "$1" == "connected to localhost:1883"* ]]' _ "$(prop StatusText)"
check "user imaged exists; /var/lib/imaged is imaged:imaged 750" \
    test "$(in_sb stat -c '%U:%G %a' /var/lib/imaged)" = "imaged:imaged 750"

# READY: with the broker down imaged cannot subscribe, so it must stay "activating" (not active) until it can.
not_yet_ready() {
    [ "$(prop ActiveState)/$(prop SubState)" = activating/start ] && [ "$(prop MainPID)" != 0 ]
}
in_sb systemctl stop mosquitto >>"$LOG" 2>&1
in_sb systemctl restart --no-block imaged >>"$LOG" 2>&1
if eventually 10 not_yet_ready && sleep 3 && not_yet_ready; then
    pass "broker down: imaged runs but stays activating (no READY=1) for 3s"
else
    fail "broker down: imaged stays activating until READY=1 (state $(prop ActiveState)/$(prop SubState))"
fi
in_sb systemctl start mosquitto >>"$LOG" 2>&1
t=$SECONDS
if eventually 20 is_active; then
    pass "broker back: READY=1, active $((SECONDS - t))s later"
else
    fail "broker back: imaged becomes active (state $(prop ActiveState)/$(prop SubState))"
fi

exposure=$(in_sb systemd-analyze security imaged.service 2>/dev/null | grep 'Overall exposure level' \
    | tr -cd '[:print:]' | sed 's/^ *//; s/ *$//')
echo "systemd-analyze security imaged: $exposure"
level=$(grep -o '[0-9][0-9]*\.[0-9]' <<<"$exposure" | head -n 1)
check "systemd-analyze security: exposure ${level:-?} <= 2.0" awk -v l="${level:-99}" 'BEGIN { exit !(l <= 2.0) }'

# ---------------------------------------------------------------- 2. images
sha1=$(make_jpeg 1)
check "mosquitto_pub -f img-1.jpg -q 1 -t image/upload" publish /root/img-1.jpg image/upload
check "img-1 stored under /var/lib/imaged/images with the same sha256" eventually 10 is_stored "$sha1"
p1=$(saved_path "$sha1")
check "journalctl -u imaged shows 'Image saved: $p1'" journal_has "Image saved: $p1"
json_fields() {
    local line
    line=$(journal -o json | grep -F "\"SHA256\":\"$sha1\"" | grep -F '"MESSAGE":"Image saved: ' | tail -n 1)
    grep -qF "\"PATH\":\"$p1\"" <<<"$line" && grep -qF '"TOPIC":"image/upload"' <<<"$line" \
        && grep -qF "\"BYTES\":\"$(stat -c %s "$WORK/img-1.jpg")\"" <<<"$line"
}
check "journalctl -u imaged -o json: fields PATH, SHA256, BYTES, TOPIC" json_fields
check "stored image is imaged:imaged 640" test "$(in_sb stat -c '%U:%G %a' "$p1")" = "imaged:imaged 640"

sha2=$(make_jpeg 2)
check "imaged send --help" in_sb imaged send --help
check "imaged send img-2.jpg (inside the sandbox, broker from /etc/imaged.toml)" in_sb imaged send /root/img-2.jpg
check "img-2 stored" eventually 10 is_stored "$sha2"

# A large image goes to the disk a chunk at a time (sync_file_range): allowed by the unit's system call filter.
big=$WORK/img-big.jpg
{ printf '\xff\xd8\xff\xe0'; head -c 3000000 /dev/urandom; printf '\xff\xd9'; } >"$big"
sb cp "$big" /root/img-big.jpg >>"$LOG" 2>&1
sha_big=$(sha256sum "$big" | cut -d' ' -f1)
check "mosquitto_pub a 3 MB image" publish /root/img-big.jpg image/upload
check "the 3 MB image stored whole under the unit's sandboxing" eventually 15 is_stored "$sha_big"
check "imaged prune --dry-run beside the running daemon: what the policy would delete, nothing deleted" \
    eval "in_sb imaged prune --dry-run | grep 'Stored: ' >/dev/null"
check "the images are all still there after the dry run" is_stored "$sha_big"

# ---------------------------------------------------------------- 3. watchdog
printf '[Service]\nWatchdogSec=4s\n' >"$WORK/watchdog.conf"
sb cp "$WORK/watchdog.conf" /etc/systemd/system/imaged.service.d/90-package-test.conf >>"$LOG" 2>&1
in_sb systemctl daemon-reload >>"$LOG" 2>&1
check "drop-in WatchdogSec=4s for the test; systemctl restart imaged" in_sb systemctl restart imaged
check "WatchdogUSec=4s" test "$(prop WatchdogUSec)" = 4s
n0=$(prop NRestarts)
pid0=$(prop MainPID)
check "systemctl kill --kill-who=main --signal=SIGSTOP imaged (PID $pid0)" \
    in_sb systemctl kill --kill-who=main --signal=SIGSTOP imaged
sha3=$(make_jpeg 3)
sha4=$(make_jpeg 4)
check "while hung: mosquitto_pub img-3.jpg" publish /root/img-3.jpg image/upload
check "while hung: imaged send img-4.jpg" in_sb imaged send /root/img-4.jpg
t=$SECONDS
restarted() { [ "$(prop NRestarts)" -gt "$n0" ]; }
if eventually 20 restarted; then
    pass "watchdog killed and restarted hung imaged: NRestarts $n0 -> $(prop NRestarts) after $((SECONDS - t))s"
else
    fail "watchdog restarts hung imaged (NRestarts still $(prop NRestarts))"
fi
check "journal: systemd reported the watchdog timeout" journal_has "Watchdog timeout"
new_pid() { is_active && [ "$(prop MainPID)" != "$pid0" ] && [ "$(prop MainPID)" != 0 ]; }
check "active again with a new main PID" eventually 20 new_pid
both_stored() { is_stored "$sha3" && is_stored "$sha4"; }
check "img-3 and img-4 (sent during the hang) stored after the restart" eventually 20 both_stored
in_sb rm -rf /etc/systemd/system/imaged.service.d >>"$LOG" 2>&1
in_sb systemctl daemon-reload >>"$LOG" 2>&1

# ---------------------------------------------------------------- 4. local edit + upgrade
in_sb sed -i 's|^upload = "image/upload"|upload = "cameras/+/jpeg"|' /etc/imaged.toml >>"$LOG" 2>&1
check "edit /etc/imaged.toml: topics.upload = \"cameras/+/jpeg\"" in_sb grep -q '^upload = "cameras/+/jpeg"' /etc/imaged.toml
# The upgrade: the same package with a higher version and a changed shipped config, so dpkg meets a
# conffile changed on both sides (it would prompt; --force-confold keeps the local file).
make_upgrade() {
    local dir=$WORK/upgrade version
    rm -rf "$dir" && dpkg-deb -R "$DEB" "$dir" || return 1
    version=$(dpkg-deb -f "$DEB" Version)+test1
    sed -i "s/^Version: .*/Version: $version/" "$dir/DEBIAN/control"
    echo "# (a line added by the package test's upgrade)" >>"$dir/etc/imaged.toml"
    UPGRADE=$WORK/imaged_${version}_$(dpkg-deb -f "$DEB" Architecture).deb
    dpkg-deb -Zgzip --root-owner-group -b "$dir" "$UPGRADE"
}
check "build an upgrade package (version +test1, changed /etc/imaged.toml)" make_upgrade
pid0=$(prop MainPID)
check "upgrade: apt-get install -o Dpkg::Options::=--force-confold ./$(basename "${UPGRADE:-none}")" sb install "${UPGRADE:-none}"
check "upgraded to $(dpkg-deb -f "$DEB" Version)+test1" \
    test "$(in_sb dpkg-query -W -f='${Version}' imaged)" = "$(dpkg-deb -f "$DEB" Version)+test1"
check "the local edit survived the upgrade" in_sb grep -q '^upload = "cameras/+/jpeg"' /etc/imaged.toml
check "the new shipped config is in /etc/imaged.toml.dpkg-dist" \
    in_sb grep -q 'added by the package test' /etc/imaged.toml.dpkg-dist
check "the upgrade restarted imaged (new main PID, active)" eventually 15 new_pid
pid0=$(prop MainPID)
check "systemctl restart imaged" in_sb systemctl restart imaged
check "restarted (new main PID) and active" new_pid
sha5=$(make_jpeg 5)
check "mosquitto_pub img-5.jpg -t cameras/cam1/jpeg (the edited topic)" publish /root/img-5.jpg cameras/cam1/jpeg
check "img-5 stored: the restart applied the edit" eventually 10 is_stored "$sha5"

# ---------------------------------------------------------------- 5. broken config
in_sb cp /etc/imaged.toml /root/imaged.toml.good
in_sb sed -i 's/^port = 1883/prot = 1883/' /etc/imaged.toml
line=$(in_sb grep -n '^prot = ' /etc/imaged.toml | cut -d: -f1)
n0=$(prop NRestarts)
check "broken config (broker.prot, line $line): systemctl restart imaged fails" fails in_sb systemctl restart imaged
check "failed with exit status 78 (config error)" \
    test "$(prop ActiveState) $(prop Result) $(prop ExecMainStatus)" = "failed exit-code 78"
err="/etc/imaged.toml:$line: broker.prot: unknown field"
check "journal names file, line and key: '$err ...'" journal_has "$err"
sleep 6 # three times RestartSec=2s
check "no restart storm: still failed, NRestarts still $n0 after 6s" \
    test "$(prop ActiveState) $(prop NRestarts)" = "failed $n0"
in_sb cp /root/imaged.toml.good /etc/imaged.toml
check "fixed config: systemctl restart imaged" in_sb systemctl restart imaged
check "active again" is_active

# ---------------------------------------------------------------- 5b. reload
# systemctl reload runs the unit's ExecReload=, `imaged reload`: SIGHUP, then it waits for imaged's answer, so
# systemctl returns once the new topic is subscribed (no waiting for the journal here), and fails on a broken
# file while imaged runs on with the old config.
pid0=$(prop MainPID)
n0=$(prop NRestarts)
same_process() { [ "$(prop MainPID) $(prop ActiveState) $(prop NRestarts)" = "$pid0 active $n0" ]; }
in_sb sed -i 's|^upload = "cameras/+/jpeg"|upload = "reloaded/+/jpeg"|' /etc/imaged.toml
check "edit topics.upload = \"reloaded/+/jpeg\"; systemctl reload imaged" in_sb systemctl reload imaged
sha8=$(make_jpeg 8)
check "right after it returned: mosquitto_pub img-8.jpg -t reloaded/cam1/jpeg" publish /root/img-8.jpg reloaded/cam1/jpeg
check "img-8 stored: the reload had applied the new topic when systemctl returned" eventually 10 is_stored "$sha8"
check "same main PID, still active, no restart" same_process
in_sb sed -i 's/^port = 1883/prot = 1883/' /etc/imaged.toml
line=$(in_sb grep -n '^prot = ' /etc/imaged.toml | cut -d: -f1)
check "broken config (broker.prot, line $line): systemctl reload imaged fails" fails in_sb systemctl reload imaged
check "the unit stays active: same main PID, no restart" same_process
err="Reload refused: /etc/imaged.toml:$line: broker.prot: unknown field"
check "journal names file, line and key: '$err ...'" eventually 10 journal_has "$err"
sha9=$(make_jpeg 9)
check "mosquitto_pub img-9.jpg -t reloaded/cam1/jpeg" publish /root/img-9.jpg reloaded/cam1/jpeg
check "img-9 stored: imaged runs on the old config" eventually 10 is_stored "$sha9"
in_sb cp /root/imaged.toml.good /etc/imaged.toml
check "fixed config: systemctl reload imaged" in_sb systemctl reload imaged
sha10=$(make_jpeg 10)
check "right after it returned: mosquitto_pub img-10.jpg -t cameras/cam1/jpeg" publish /root/img-10.jpg cameras/cam1/jpeg
check "img-10 stored: topics.upload is back to cameras/+/jpeg" eventually 10 is_stored "$sha10"

# ---------------------------------------------------------------- 6. broker password
# The broker now wants a login. imaged gets its password from password_file, then from the credential.
printf 'listener 1883 127.0.0.1\nallow_anonymous false\npassword_file /etc/mosquitto/passwd\n' >"$WORK/auth.conf"
setup_auth() {
    in_sb sh -c 'install -m 0600 -o mosquitto -g mosquitto /dev/null /etc/mosquitto/passwd &&
        mosquitto_passwd -b /etc/mosquitto/passwd imaged imaged-secret &&
        mosquitto_passwd -b /etc/mosquitto/passwd camera camera-secret' &&
        sb mosquitto "$WORK/auth.conf"
}
check "broker requires a user name and password (mosquitto password_file)" setup_auth
publish_auth() { in_sb mosquitto_pub -h 127.0.0.1 -u camera -P camera-secret -q 1 -t "$2" -f "$1"; }
# README, "The broker password", 1: password_file, readable by the group imaged only.
password_file() {
    in_sb install -d /etc/imaged &&
        in_sb install -m 0640 -o root -g imaged /dev/null /etc/imaged/mqtt-password &&
        in_sb sh -c 'echo imaged-secret >/etc/imaged/mqtt-password' &&
        in_sb sed -i -e 's|^# username = "imaged"|username = "imaged"|' \
            -e 's|^# password_file = "/etc/imaged/mqtt-password"|password_file = "/etc/imaged/mqtt-password"|' \
            /etc/imaged.toml
}
check "/etc/imaged/mqtt-password root:imaged 0640; username and password_file in /etc/imaged.toml" password_file
check "systemctl restart imaged" in_sb systemctl restart imaged
check "logged in with password_file: active" is_active
sha6=$(make_jpeg 6)
check "mosquitto_pub -u camera img-6.jpg" publish_auth /root/img-6.jpg cameras/cam1/jpeg
check "img-6 stored" eventually 10 is_stored "$sha6"
# Without password_file and without a credential the broker refuses imaged: it never becomes ready.
in_sb sed -i 's|^password_file = |# password_file = |' /etc/imaged.toml
in_sb systemctl restart --no-block imaged >>"$LOG" 2>&1
if eventually 10 not_yet_ready && sleep 2 && not_yet_ready; then
    pass "no password: the broker refuses imaged, which stays activating"
else
    fail "no password: imaged must not become ready (state $(prop ActiveState)/$(prop SubState))"
fi
# README, "The broker password", 2: the systemd credential. The file may be root's alone; systemd hands imaged
# a private copy. `systemctl edit` wants a terminal (script gives it one) and an editor (cp writes the lines).
credential() {
    printf '[Service]\nLoadCredential=mqtt-password:/etc/imaged/mqtt-password\n' >"$WORK/credential.conf"
    sb cp "$WORK/credential.conf" /root/credential.conf &&
        in_sb install -m 0600 -o root -g root /dev/null /etc/imaged/mqtt-password &&
        in_sb sh -c 'echo imaged-secret >/etc/imaged/mqtt-password' &&
        in_sb script -qec 'SYSTEMD_EDITOR="cp /root/credential.conf" systemctl edit imaged' /dev/null &&
        [ "$(prop DropInPaths)" = /etc/systemd/system/imaged.service.d/override.conf ]
}
check "/etc/imaged/mqtt-password root 0600; systemctl edit imaged: LoadCredential=mqtt-password:..." credential
check "systemctl restart imaged" in_sb systemctl restart imaged
check "logged in with the credential: active" is_active
sha7=$(make_jpeg 7)
check "mosquitto_pub -u camera img-7.jpg" publish_auth /root/img-7.jpg cameras/cam1/jpeg
check "img-7 stored" eventually 10 is_stored "$sha7"
# Back to the package's own unit for the rest.
in_sb rm -rf /etc/systemd/system/imaged.service.d >>"$LOG" 2>&1
in_sb systemctl daemon-reload >>"$LOG" 2>&1

# ---------------------------------------------------------------- 7. remove, purge
stored_before=$(in_sb sh -c 'ls /var/lib/imaged/images/*.jpg | wc -l')
check "apt-get remove imaged" in_sb apt-get remove -y -q imaged
check "removed: service stopped, no imaged process" fails in_sb pgrep -x imaged
check "remove keeps /etc/imaged.toml and the $stored_before images" \
    in_sb sh -c "test -f /etc/imaged.toml && test \"\$(ls /var/lib/imaged/images/*.jpg | wc -l)\" = $stored_before"
check "apt-get purge imaged" in_sb apt-get purge -y -q imaged
check "purged: unit file gone, LoadState=not-found" \
    in_sb sh -c '! test -e /usr/lib/systemd/system/imaged.service && ! test -e /lib/systemd/system/imaged.service &&
        test "$(systemctl show -p LoadState --value imaged.service)" = not-found'
check "purged: no enable or mask symlink left in /etc/systemd/system" \
    in_sb sh -c '! find /etc/systemd/system -name "imaged.service*" | grep -q .'
check "purged: /etc/imaged.toml (and .dpkg-dist) removed" in_sb sh -c '! ls /etc/imaged.toml* 2>/dev/null | grep -q .'
check "purged: /var/lib/imaged removed" in_sb sh -c '! test -e /var/lib/imaged'
not_installed() {
    local st
    st=$(in_sb dpkg-query -W -f='${db:Status-Status}' imaged 2>/dev/null)
    [ -z "$st" ] || [ "$st" = not-installed ]
}
check "purged: dpkg lists imaged as not installed (no config-files state)" not_installed

echo "package test: $passed passed, $failed failed in $((SECONDS - START))s"
[ "$failed" -eq 0 ]
