"""A function that reports what its sandbox lets it see and do, over its WebSocket: the
sandbox tests ask, it answers. Each message is a command; each answer one text message."""

import asyncio
import ctypes
import json
import os

from websockets.asyncio.server import serve


def status():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def try_write(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        os.unlink(path)
        return "ok"
    except OSError as e:
        return e.strerror


def limits():
    """The cgroup limits this process runs under, v1 or v2, by file name."""
    found = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.strip().split(":", 2)
            if controllers == "":
                base = "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else "/sys/fs/cgroup"
                names = ["memory.max", "pids.max", "cpu.max"]
            else:
                base = "/sys/fs/cgroup/" + controllers
                names = ["memory.limit_in_bytes", "pids.max", "cpu.cfs_quota_us", "cpu.cfs_period_us"]
            for name in names:
                try:
                    with open(base + path + "/" + name) as g:
                        found[name] = g.read().strip()
                except OSError:
                    pass
    return found


def forks(limit):
    """Forks children that sleep until told, up to `limit`; how many the kernel allowed."""
    children = []
    try:
        for _ in range(limit):
            pid = os.fork()
            if pid == 0:
                os.close(0)
                import time
                time.sleep(30)
                os._exit(0)
            children.append(pid)
    except OSError:
        pass
    for pid in children:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return len(children)


async def handle(ws):
    async for message in ws:
        cmd, _, arg = message.partition(" ")
        if cmd == "whoami":
            s = status()
            await ws.send(json.dumps({
                "uid": os.getuid(),
                "gid": os.getgid(),
                "cap_eff": s["CapEff"],
                "cap_bnd": s["CapBnd"],
                "no_new_privs": s["NoNewPrivs"],
                "seccomp": s["Seccomp"],
                "env": dict(os.environ),
                "cwd": os.getcwd(),
            }))
        elif cmd == "write":
            await ws.send(try_write(arg))
        elif cmd == "unshare":
            libc = ctypes.CDLL(None, use_errno=True)
            CLONE_NEWUSER = 0x10000000
            if libc.unshare(CLONE_NEWUSER) == 0:
                await ws.send("ok")
            else:
                await ws.send(os.strerror(ctypes.get_errno()))
        elif cmd == "limits":
            await ws.send(json.dumps(limits()))
        elif cmd == "fork":
            await ws.send(str(forks(int(arg))))
        elif cmd == "allocate":
            # Touches every page, so the memory is really charged to the instance.
            hog = bytearray(int(arg) * 1024 * 1024)
            for i in range(0, len(hog), 4096):
                hog[i] = 1
            await ws.send("allocated")
        else:
            await ws.send("unknown")


async def main():
    async with serve(handle, "0.0.0.0", int(os.environ["PORT"])):
        await asyncio.get_running_loop().create_future()


asyncio.run(main())
