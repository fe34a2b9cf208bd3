#!/bin/sh
# Installs wsedge as a systemd service on one host: the `wsedge-fn` user its instances run as,
# the binary, an example config (never overwriting one) and the unit; checks the config, then
# enables and (re)starts the unit when systemd runs this host. Safe to run again: it changes
# only what differs, and restarts wsedge only when its binary or unit changed.
#
#   deploy/install.sh --binary target/release/wsedge            # as root, on the host
#   deploy/install.sh --binary target/release/wsedge --no-start # install and enable only
#   deploy/install.sh --binary ... --root /tmp/tree             # into a directory tree
#
# With --root (or its alias --prefix) everything goes under DIR, the user included (into
# DIR/etc/passwd and DIR/etc/group, which must exist), and nothing is started: the commands it
# would run on the host are printed instead.
set -eu

USER_NAME=wsedge-fn
here=$(cd "$(dirname "$0")" && pwd)
binary=
root=/
start=yes

usage() {
    echo "usage: $0 --binary PATH [--root DIR | --prefix DIR] [--no-start]" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --binary) [ $# -ge 2 ] || usage; binary=$2; shift 2 ;;
        --binary=*) binary=${1#*=}; shift ;;
        --root|--prefix) [ $# -ge 2 ] || usage; root=$2; shift 2 ;;
        --root=*|--prefix=*) root=${1#*=}; shift ;;
        --no-start) start=no; shift ;;
        -h|--help) usage ;;
        *) echo "$0: unknown argument: $1" >&2; usage ;;
    esac
done

[ -n "$binary" ] || { echo "$0: --binary PATH is required (e.g. target/release/wsedge)" >&2; usage; }
[ -f "$binary" ] && [ -x "$binary" ] || { echo "$0: $binary is not an executable file" >&2; exit 1; }
case "$root" in /*) ;; *) root=$(pwd)/$root ;; esac
root=${root%/}
# `$root` is "" for the host itself, so "$root/etc" is always the right path.
[ -d "$root/" ] || { echo "$0: $root is not a directory" >&2; exit 1; }

if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    echo "$0: installing on this host needs root (or use --root DIR)" >&2
    exit 1
fi

say() { echo "install: $*"; }

# 1. The instance user: a system user and group, no login shell, no home directory. wsedge
# refuses to start an instance as a user that does not exist or has uid 0.
nologin=/usr/sbin/nologin
[ -x "$root$nologin" ] || [ -x "$nologin" ] || nologin=/sbin/nologin
[ -x "$root$nologin" ] || [ -x "$nologin" ] || nologin=/bin/false
if [ -n "$root" ]; then
    [ -f "$root/etc/passwd" ] && [ -f "$root/etc/group" ] || {
        echo "$0: $root/etc/passwd and $root/etc/group must exist to add $USER_NAME there" >&2
        exit 1
    }
    # --prefix edits the files under the tree without chroot (no binaries needed there).
    prefix_arg="--prefix $root"
else
    prefix_arg=
fi
# The host asks NSS (a user from LDAP counts); a tree has only its files.
has_entry() {
    if [ -n "$root" ]; then grep -q "^$2:" "$root/etc/$1"; else getent "$1" "$2" >/dev/null; fi
}
if has_entry group "$USER_NAME"; then
    say "group $USER_NAME exists"
else
    # shellcheck disable=SC2086  # prefix_arg is empty or two words
    groupadd $prefix_arg --system "$USER_NAME"
    say "created group $USER_NAME"
fi
if has_entry passwd "$USER_NAME"; then
    say "user $USER_NAME exists"
else
    # shellcheck disable=SC2086
    useradd $prefix_arg --system --gid "$USER_NAME" --no-create-home \
        --home-dir /nonexistent --shell "$nologin" \
        --comment "wsedge function instances" "$USER_NAME"
    say "created user $USER_NAME (no login, no home)"
fi

# Copies $1 to $2 (mode $3) unless identical; a new file is moved into place, so a running
# wsedge's binary is replaced, not written over. Sets `changed` when it copied.
changed=no
put() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        say "$2 is up to date"
        return
    fi
    mkdir -p "$(dirname "$2")"
    cp "$1" "$2.new.$$"
    chmod "$3" "$2.new.$$"
    mv -f "$2.new.$$" "$2"
    changed=yes
    say "installed $2"
}

# 2. The binary and the unit.
put "$binary" "$root/usr/local/bin/wsedge" 0755
put "$here/systemd/wsedge.service" "$root/etc/systemd/system/wsedge.service" 0644

# 3. The example config, only where there is none: the operator's config is theirs.
config=$root/etc/wsedge/wsedge.toml
if [ -f "$config" ]; then
    say "$config exists, left as it is"
else
    mkdir -p "$root/etc/wsedge"
    cp "$here/wsedge.toml" "$config"
    chmod 0644 "$config"
    say "installed the example config $config"
fi

# 4. The config must validate before anything starts.
"$root/usr/local/bin/wsedge" check -c "$config" >/dev/null
say "wsedge check -c $config: ok"

# 5. Enable and start. /run/systemd/system exists exactly when systemd is the running init
# (what sd_booted() tests); in a container or a chroot it does not.
if [ "$changed" = yes ]; then action=restart; else action=start; fi
if [ -n "$root" ] || [ ! -d /run/systemd/system ]; then
    if [ -n "$root" ]; then why="installed under --root $root"; else why="systemd is not running here"; fi
    say "$why; on the host this would run:"
    echo "  systemctl daemon-reload"
    echo "  systemctl enable wsedge.service"
    [ "$start" = yes ] && echo "  systemctl $action wsedge.service"
    exit 0
fi
systemctl daemon-reload
systemctl enable wsedge.service
if [ "$start" = no ]; then
    say "enabled; not started (--no-start)"
    exit 0
fi
# Restart (a drain: open WebSockets get 1001) only when something wsedge runs changed.
systemctl "$action" wsedge.service
say "systemctl $action wsedge.service: done"
systemctl --no-pager status wsedge.service || true
