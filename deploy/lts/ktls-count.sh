#!/bin/bash
# What one wss:// message costs wsedge's own process, counted rather than timed (the kernel
# with TLS runs under qemu's CPU emulation here, where times mean little): syscalls, and bytes
# through userspace (what its reads returned and its writes took), per message, with kernel TLS
# (data_plane = "auto": userspace-ktls) and with rustls in userspace (data_plane =
# "userspace": userspace-tls), for the edge and bulk workloads. strace counts them, attached
# for the whole load (the connections' set-up is in the counts too, spread over its messages).
# Run it where the kernel has TLS:  cargo xtask vm --kernel debian-6.1 -- bash deploy/lts/ktls-count.sh
# Build first: cargo build --release -p proxy -p bench
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BIN=$REPO/target/release
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
"$BIN"/bench cert --dir "$W"/tls >/dev/null
"$BIN"/bench echo --listen 127.0.0.1:19000 >/dev/null 2>&1 &
echo "kernel $(uname -r); tls module: $([ -e /proc/net/tls_stat ] && echo loaded || echo absent)"

printf "%-8s %-20s %9s %13s %13s\n" workload data_plane messages "syscalls/msg" "bytes/msg"
for plane in auto userspace; do
  cat >"$W"/w.toml <<EOF
[server]
listen = "127.0.0.1:18080"
tls_listen = "127.0.0.1:18443"
tls_cert = "$W/tls/cert.pem"
tls_key = "$W/tls/key.pem"
admin_listen = "127.0.0.1:19901"
data_plane = "$plane"
state_dir = "$W"
[[function]]
name = "echo"
route = "/echo"
upstreams = ["127.0.0.1:19000"]
EOF
  "$BIN"/wsedge run -c "$W"/w.toml 2>"$W/wsedge-$plane.log" &
  pid=$!
  for _ in $(seq 100); do grep -q "wsedge serving" "$W/wsedge-$plane.log" && break; sleep 0.2; done
  for workload in edge bulk; do
    case $workload in
      edge) args=(--connections 20 --rate 10 --size 512 --duration-s 10) ;;
      bulk) args=(--connections 2 --size 65536 --duration-s 5) ;;
    esac
    strace -f -qq -s 0 -o "$W/trace" -p $pid &
    tracer=$!
    sleep 1
    "$BIN"/bench load --url wss://localhost:18443/echo --trust "$W"/tls/cert.pem \
      --workload $workload "${args[@]}" --warmup-s 0 >"$W/load.json" 2>/dev/null &
    load=$!
    sleep 2
    shown=$(python3 -c 'import json,urllib.request as u; c=json.load(u.urlopen("http://127.0.0.1:19901/connections")); print(",".join(sorted({x["data_plane"] for x in c})))')
    wait $load
    kill -INT $tracer; wait $tracer 2>/dev/null || true
    python3 - "$workload" "$shown" "$W/trace" "$W/load.json" <<'PY'
import json, re, sys
workload, shown, trace, load = sys.argv[1:]
reads = ("read", "recvfrom", "recvmsg", "readv")
writes = ("write", "sendto", "sendmsg", "writev")
calls = moved = 0
# A call another thread interrupted is split in two lines: counted at its "resumed" half.
line_re = re.compile(r"^\d+\s+(?:(\w+)\(|<\.\.\. (\w+) resumed>).*\)\s+=\s+(-?\d+)")
for line in open(trace):
    m = line_re.match(line)
    if not m:
        continue
    calls += 1
    name, result = m.group(1) or m.group(2), int(m.group(3))
    if result > 0 and (name in reads or name in writes):
        moved += result
r = json.load(open(load))
msgs = max(r["messages_sent"] + r["messages_received"], 1)
print(f"{workload:<8} {shown:<20} {msgs:>9} {calls / msgs:>13.2f} {moved / msgs:>13.0f}")
PY
  done
  kill $pid; wait $pid 2>/dev/null || true
done
