#!/bin/sh
# Checks deploy/ on a host without systemd running (a container, CI): what can be checked of
# the unit and the install script without booting systemd. Needs root, systemd-analyze,
# useradd, unshare, setpriv, curl, and python3 with `websockets` (PYTHONPATH may point at it).
#
#   deploy/tests/check.sh WSEDGE ECHO_FN
#
# 1. `systemd-analyze verify` on the unit, with WSEDGE at its ExecStart path (a tmpfs over
#    /usr/local/bin in a mount namespace of its own: nothing on the host changes).
# 2. install.sh --root into a tree holding copies of /etc/passwd and /etc/group: the files, the
#    wsedge-fn user line; a second run changes nothing and keeps an edited config.
# 3. install.sh as root on a copy of this host (mount and network namespaces: /etc, /usr/local
#    /bin, /var/lib, /srv private), then what the unit would start, run under the unit's
#    capability bounding set and no_new_privs: ready, an echo through a sandboxed egress
#    instance running as wsedge-fn, SIGHUP reload, SIGTERM drain and exit 0, the ledger row.
#    No pid namespace: wsedge finds its leftover cgroups (node-wide) by pid, and in a pid
#    namespace of its own it would take other wsedges' for leftovers.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
fail() { echo "check: FAIL: $*" >&2; exit 1; }
ok() { echo "check: ok: $*"; }

if [ "${1:-}" = --inside ]; then
    # Step 3, inside the namespaces.
    wsedge=$2 echo_fn=$3 work=$4
    mkdir -p "$work/etc"
    cp -a /etc/. "$work/etc/"
    mount --bind "$work/etc" /etc
    for dir in /usr/local/bin /var/lib /srv; do mount -t tmpfs tmpfs "$dir"; done
    ip link set lo up
    sh "$here/install.sh" --binary "$wsedge" > "$work/install.out"
    grep -q "systemd is not running here" "$work/install.out" || fail "install.sh output: $(cat "$work/install.out")"
    getent passwd wsedge-fn | grep -q ':/nonexistent:' || fail "no wsedge-fn user on the host copy"
    ok "install.sh as root: wsedge-fn $(id wsedge-fn)"
    mkdir -p /srv/fn
    cp "$echo_fn" /srv/fn/echo-fn
    chmod 0755 /srv/fn /srv/fn/echo-fn
    cat >> /etc/wsedge/wsedge.toml <<'EOF'

[[function]]
name = "spawned"
route = "/spawned"
command = ["/srv/fn/echo-fn"]
network = "egress"
EOF
    # The unit's CapabilityBoundingSet and NoNewPrivileges=yes.
    caps=$(sed -n 's/^CapabilityBoundingSet=//p' "$here/systemd/wsedge.service" |
        tr 'A-Z' 'a-z' | sed 's/cap_/+/g; s/ /,/g')
    setpriv --bounding-set "-all,$caps" --inh-caps -all --no-new-privs -- \
        /usr/local/bin/wsedge run -c /etc/wsedge/wsedge.toml --log-format json \
        > "$work/run.log" 2>&1 &
    pid=$!
    # A failed check must not leave it running (nor holding this script's output open).
    trap 'kill -KILL $pid 2>/dev/null || true' EXIT
    i=0
    until curl -sf http://127.0.0.1:9901/ready > /dev/null; do
        i=$((i + 1)); [ $i -lt 100 ] || fail "not ready in 20 s: $(tail -5 "$work/run.log")"
        sleep 0.2
    done
    ok "ready under bounding set $caps ($(grep CapBnd /proc/$pid/status | tr -s '\t' ' '))"
    python3 - <<'EOF' || fail "echo through the spawned function"
import asyncio, websockets
async def main():
    async with websockets.connect("ws://127.0.0.1:80/spawned") as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
asyncio.run(main())
EOF
    ipid=$(curl -s http://127.0.0.1:9901/instances | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["pid"])')
    status=$(grep -E '^(Uid|CapEff|CapBnd|NoNewPrivs|Seccomp):' "/proc/$ipid/status" | tr -s '\t' ' ' | tr '\n' ';')
    uid=$(id -u wsedge-fn)
    echo "$status" | grep -q "Uid: $uid $uid $uid $uid;CapEff: 0000000000000000;CapBnd: 0000000000000000;NoNewPrivs: 1;Seccomp: 2;" ||
        fail "instance status: $status"
    ok "echo through an egress instance: $status"
    kill -HUP $pid
    i=0
    until grep -q '"functions reloaded"' "$work/run.log"; do
        i=$((i + 1)); [ $i -lt 50 ] || fail "no reload after SIGHUP"; sleep 0.2
    done
    kill -TERM $pid
    wait $pid || fail "wsedge exited $? after SIGTERM: $(tail -5 "$work/run.log")"
    ok "SIGHUP reloaded, SIGTERM drained, exit 0"
    if grep -E '"level":"(WARN|ERROR)"' "$work/run.log"; then fail "warnings above"; fi
    /usr/local/bin/wsedge billing -c /etc/wsedge/wsedge.toml --format csv > "$work/ledger.csv"
    grep -q ',spawned,spawned-1,.*,200,1000,client,' "$work/ledger.csv" || fail "ledger: $(cat "$work/ledger.csv")"
    ok "ledger row in /var/lib/wsedge: status 200, closed by the client"
    exit 0
fi

[ $# -eq 2 ] || { echo "usage: $0 WSEDGE ECHO_FN" >&2; exit 2; }
wsedge=$(realpath "$1")
echo_fn=$(realpath "$2")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. The unit.
unshare --mount --propagation private sh -c '
    mount -t tmpfs tmpfs /usr/local/bin && cp "$1" /usr/local/bin/wsedge &&
    systemd-analyze verify "$2"' sh "$wsedge" "$here/systemd/wsedge.service" ||
    fail "systemd-analyze verify"
ok "systemd-analyze verify wsedge.service"

# 2. Into a tree.
tree=$work/tree
mkdir -p "$tree/etc"
cp /etc/passwd /etc/group "$tree/etc/"
cp /etc/passwd "$work/passwd.before"
sh "$here/install.sh" --binary "$wsedge" --root "$tree" > "$work/first.out"
for f in usr/local/bin/wsedge etc/systemd/system/wsedge.service etc/wsedge/wsedge.toml; do
    [ -f "$tree/$f" ] || fail "$f not installed"
done
cmp -s "$here/systemd/wsedge.service" "$tree/etc/systemd/system/wsedge.service" || fail "unit differs"
[ -x "$tree/usr/local/bin/wsedge" ] || fail "binary not executable"
grep -Eq '^wsedge-fn:[^:]*:[0-9]+:[0-9]+:[^:]*:/nonexistent:(/usr/sbin/nologin|/sbin/nologin|/bin/false)$' \
    "$tree/etc/passwd" || fail "no wsedge-fn line in the tree's passwd"
gid=$(sed -n 's/^wsedge-fn:[^:]*:[0-9]*:\([0-9]*\):.*/\1/p' "$tree/etc/passwd")
grep -q "^wsedge-fn:[^:]*:$gid:" "$tree/etc/group" || fail "no wsedge-fn group $gid"
cmp -s /etc/passwd "$work/passwd.before" || fail "the host's /etc/passwd was changed"
grep -q "systemctl restart wsedge.service" "$work/first.out" || fail "first run: $(cat "$work/first.out")"
echo "# edited" >> "$tree/etc/wsedge/wsedge.toml"
sh "$here/install.sh" --binary "$wsedge" --root "$tree" > "$work/second.out"
[ "$(grep -c 'up to date\|exists' "$work/second.out")" -eq 5 ] || fail "second run changed something: $(cat "$work/second.out")"
grep -q "systemctl start wsedge.service" "$work/second.out" || fail "second run would restart"
tail -1 "$tree/etc/wsedge/wsedge.toml" | grep -q '# edited' || fail "the edited config was replaced"
ok "install.sh --root: files, wsedge-fn $(grep '^wsedge-fn:' "$tree/etc/passwd"); second run changes nothing"

# 3. As root on a copy of this host.
unshare --mount --propagation private --net -- sh "$0" --inside "$wsedge" "$echo_fn" "$work/host"
