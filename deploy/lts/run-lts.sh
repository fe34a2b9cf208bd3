#!/bin/bash
# Checks wsedge's kernel data plane on the LTS kernel edge hosts run: boots Debian bookworm's
# 6.1 cloud kernel under qemu (TCG; KVM does not work on the development VM) with a busybox
# initramfs holding the release wsedge and bench binaries, starts the echo backend and wsedge
# with data_plane = "kernel" (then "auto" if that fails), and runs a short edge and bulk load;
# then the same loads on the zero-hop data plane, the backend spawned by wsedge as a function.
# Build first: cargo build --release -p proxy -p bench
# Usage: deploy/lts/run-lts.sh [kernel-package]; work files and serial.log go to target/lts.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
W=$REPO/target/lts
mkdir -p "$W"
cd "$W"
cp "$REPO"/target/release/wsedge "$REPO"/target/release/bench "$W"/
LOG=$W/serial.log

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

# --- kernel ---------------------------------------------------------------
PKG=${1:-$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' \
          | awk '{print $1}' | sort -V | tail -1)}
mkdir -p kdeb
if ! ls kdeb/"$PKG"_*.deb >/dev/null 2>&1; then
  (cd kdeb && apt-get download "$PKG")
fi
rm -rf kroot && mkdir kroot && dpkg-deb -x kdeb/"$PKG"_*.deb kroot
VMLINUZ=$(ls kroot/boot/vmlinuz-* | head -1)
echo "kernel package: $PKG -> $VMLINUZ"

# --- initramfs ------------------------------------------------------------
R=$W/initrd
rm -rf "$R"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,lib64,lib/x86_64-linux-gnu}
cp /bin/busybox "$R"/bin/busybox
for a in $(/bin/busybox --list); do
  [ "$a" = busybox ] || ln -sf /bin/busybox "$R/bin/$a"
done
cp /lib64/ld-linux-x86-64.so.2 "$R"/lib64/
for l in libc.so.6 libm.so.6 libgcc_s.so.1; do
  cp -L /lib/x86_64-linux-gnu/$l "$R"/lib/x86_64-linux-gnu/
done
cp "$W"/wsedge "$W"/bench "$R"/
cat > "$R"/init <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /sys/fs/bpf
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
ulimit -n 4096
echo "=== uname -r: $(uname -r)"
ls -l /sys/kernel/btf/vmlinux
mount | grep bpf

/bench echo --listen 127.0.0.1:9000 > /echo.log 2>&1 &
sleep 1; cat /echo.log

mkconf() {
cat > /w.toml <<EOC
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9901"
data_plane = "$1"
state_dir = "/tmp"
[[function]]
name = "echo"
route = "/echo"
upstreams = ["127.0.0.1:9000"]
EOC
}

runload() {
  echo "=== bench edge ($1)"
  /bench load --url ws://127.0.0.1:8080/echo --workload edge --connections 20 --rate 10 --size 512 --duration-s 5 --warmup-s 1 &
  BP=$!
  sleep 3
  echo "=== /connections during edge load ($1)"
  wget -qO- http://127.0.0.1:9901/connections | head -c 3000; echo
  wait $BP; echo "bench edge rc=$?"
  echo "=== bench bulk ($1)"
  /bench load --url ws://127.0.0.1:8080/echo --workload bulk --connections 2 --size 65536 --duration-s 3
  echo "bench bulk rc=$?"
}

started=0
for mode in kernel auto; do
  mkconf $mode
  echo "=== starting wsedge data_plane=$mode"
  /wsedge run -c /w.toml > /wsedge-$mode.log 2>&1 &
  WP=$!
  sleep 2
  echo "--- wsedge-$mode.log"; cat /wsedge-$mode.log; echo "---"
  if kill -0 $WP 2>/dev/null; then
    echo "=== wsedge ($mode) is running"
    runload $mode
    echo "--- wsedge-$mode.log after load"; cat /wsedge-$mode.log; echo "---"
    ls -lR /sys/fs/bpf
    kill $WP; sleep 1
    started=1
    break
  else
    wait $WP; echo "=== wsedge ($mode) exited rc=$?"
  fi
done

# Zero-hop: the same backend as an instance wsedge spawns itself (own netns, own cgroup).
pkill -f "bench echo"
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup
cat > /z.toml <<EOC
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9901"
data_plane = "kernel"
state_dir = "/tmp"
[[function]]
name = "echo"
route = "/echo"
command = ["/bench", "echo"]
instance_concurrency = 1000
max_instances = 1
EOC
echo "=== starting wsedge zero-hop"
/wsedge run -c /z.toml > /wsedge-zh.log 2>&1 &
WP=$!
sleep 2
echo "--- wsedge-zh.log"; cat /wsedge-zh.log; echo "---"
if kill -0 $WP 2>/dev/null; then
  runload zero-hop
  echo "--- wsedge-zh.log after load"; cat /wsedge-zh.log; echo "---"
  kill $WP; sleep 1
fi

# Zero-hop slow reader: a client flooding an instance that reads nothing until /go exists is
# held back (the client socket's stream parser stops), then every byte arrives in order.
cat > /h.toml <<EOC
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9901"
data_plane = "kernel"
state_dir = "/tmp"
[[function]]
name = "hold"
route = "/hold"
command = ["/bench", "hold-instance", "--go", "/go"]
EOC
echo "=== starting wsedge zero-hop, instance that stops reading"
/wsedge run -c /h.toml > /wsedge-hold.log 2>&1 &
WP=$!
sleep 2
if kill -0 $WP 2>/dev/null; then
  echo "=== bench flood (zero-hop)"
  /bench flood --addr 127.0.0.1:8080 --path /hold --go /go
  echo "bench flood rc=$?"
  sleep 1
  echo "--- wsedge-hold.log"; cat /wsedge-hold.log; echo "---"
  kill $WP; sleep 1
fi
echo "=== uname -r: $(uname -r)"
echo "=== TEST DONE"
poweroff -f
INIT
chmod +x "$R"/init
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$W"/initrd.cpio.gz
echo "initramfs: $(du -h "$W"/initrd.cpio.gz | cut -f1)"

# --- boot -----------------------------------------------------------------
rm -f "$LOG"
timeout 600 qemu-system-x86_64 -accel tcg -m 2048 -smp 2 -nographic -no-reboot \
  -kernel "$VMLINUZ" -initrd "$W"/initrd.cpio.gz \
  -append "console=ttyS0 quiet panic=-1" \
  -serial file:"$LOG" -monitor none -display none </dev/null || echo "qemu rc=$?"
echo "serial log: $LOG"
cat "$LOG"
