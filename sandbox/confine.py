"""The first process inside the candidate's namespaces (run by `unshare`, as root of
its own mount and pid namespaces): build a filesystem that shows only what the
candidate may see, give up every privilege, and exec the candidate.

    python3 -I confine.py SPEC_JSON

SPEC: root (an empty folder to build the view in), ro (folders and files shown
read-only at their own paths), rw (folders shown writable: the scratch folder),
overlays ([lower, upper, work, target]: `lower` (folders joined by ":", the top one first)
shown writable at `target`, every write
going to `upper`, a folder the candidate does not see; where the kernel refuses an overlay, `lower`
is copied into `upper` instead), hide (paths to blank out if a folder above made them
visible), devices, uid (the user to become, or null to stay the namespace's root without
capabilities), cwd, argv. Kernel keyrings are refused (seccomp), as in Docker's default
profile: they belong to a user, not to a namespace, so two processes running as the same
user could leave notes there for each other. Stdlib only, and nothing imported from the
project: this runs before the candidate and must not read anything the candidate could
have written. Exit 121 means the view could not be built (the caller then uses a weaker
isolation).
"""

import ctypes
import json
import os
import platform
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH, AT_RECURSIVE, AT_FDCWD = 2, 0x8000, -100
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
SYS = {"x86_64": dict(pivot_root=155, mount_setattr=442), "aarch64": dict(pivot_root=41, mount_setattr=442)}
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_CAP_AMBIENT = 38, 24, 28, 47
PR_SET_SECCOMP, SECCOMP_MODE_FILTER, SECCOMP_RET_ALLOW, SECCOMP_RET_EPERM = 22, 2, 0x7FFF0000, 0x00050001
# audit arch, then the numbers of add_key, request_key and keyctl
KEYRING_CALLS = {"x86_64": (0xC000003E, (248, 249, 250)), "aarch64": (0xC00000B7, (217, 218, 219))}
SECURE_NOROOT_LOCKED = 0b101111  # noroot, no-setuid-fixup, keep-caps off: each locked
FAILED = 121

libc = ctypes.CDLL(None, use_errno=True)


def check(rc, what):
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None
    check(libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {src} on {dst}")


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def read_only(path):
    """Make the mount at path, and every mount below it, read-only."""
    nr = SYS.get(platform.machine(), {}).get("mount_setattr")
    if nr is not None:
        attr = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
        if libc.syscall(nr, AT_FDCWD, path.encode(), AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)) == 0:
            return
    # older kernels: the top mount only, keeping the flags a user namespace may not clear
    st = os.statvfs(path)
    keep = sum(ms for st_flag, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC))
               if st.f_flag & st_flag)
    mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep)


def place(root, path, is_dir):
    """The empty folder or file at `path` inside `root`, to mount over."""
    target = root + path
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "w").close()
    return target


def bind(root, path, writable=False):
    if not os.path.exists(path):
        return
    target = place(root, path, os.path.isdir(path))
    mount(path, target, None, MS_BIND | MS_REC)
    if not writable:
        read_only(target)


def overlay(root, lower, upper, work, target, uid):
    """`lower` writable at `target`, copy-on-write into `upper`: a candidate sees the shared
    compile cache at the very path the trusted run wrote it (compiled code records its
    absolute paths) and changes only its own layer. Copying is the fallback."""
    os.makedirs(root + target, exist_ok=True)
    for d in (upper, work):
        os.makedirs(d, exist_ok=True)
    own = (lambda path: os.lchown(path, uid, uid)) if uid is not None else (lambda path: None)
    own(upper)  # before the mount: the overlay's top folder takes the upper one's owner
    try:
        mount("overlay", root + target, "overlay", MS_NOSUID | MS_NODEV,
              f"lowerdir={lower},upperdir={upper},workdir={work}")
    except OSError:
        import shutil
        for folder in reversed(lower.split(":")):  # the bottom one first, so that upper ones win
            shutil.copytree(folder, upper, symlinks=True, dirs_exist_ok=True)
        for dirpath, dirnames, filenames in os.walk(upper):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                own(name)
        mount(upper, root + target, None, MS_BIND | MS_REC)


def build_view(spec):
    root = spec["root"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path in spec["ro"]:
        bind(root, path)
    for path in spec["rw"]:
        bind(root, path, writable=True)
    for lower, upper, work, target in spec.get("overlays", ()):
        overlay(root, lower, upper, work, target, spec["uid"])
    for path in spec["hide"]:  # shown by a folder above: cover it
        if os.path.lexists(root + path):
            if os.path.isdir(root + path):
                mount("tmpfs", root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k")
            else:
                mount("/dev/null", root + path, None, MS_BIND)
    os.makedirs(root + "/dev", exist_ok=True)
    mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID, "size=64k,mode=755")
    for dev in spec["devices"]:
        if os.path.exists(dev):
            mount(dev, place(root, dev, os.path.isdir(dev)), None, MS_BIND | MS_REC)
    os.makedirs(root + "/dev/shm")
    mount("tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={spec['shm_bytes']},mode=1777")
    for name, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2")):
        os.symlink(to, f"{root}/dev/{name}")
    os.makedirs(root + "/proc", exist_ok=True)
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this pid namespace's only
    os.makedirs(root + "/.old")
    check(libc.syscall(SYS[platform.machine()]["pivot_root"], root.encode(), (root + "/.old").encode()), "pivot_root")
    os.chdir("/")
    check(libc.umount2(b"/.old", MNT_DETACH), "umount the old root")  # the rest of the machine is gone
    os.rmdir("/.old")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


def drop_privileges(uid):
    """No capabilities now or after exec, no way to gain any; a real uid if given."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "drop the capability bounding set")
    check(libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0), "clear ambient capabilities")
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    else:
        check(libc.prctl(PR_SET_SECUREBITS, SECURE_NOROOT_LOCKED, 0, 0, 0), "set secure bits")
    data = (ctypes.c_uint32 * 6)()
    check(libc.capset(ctypes.byref(CapHeader(0x20080522, 0)), data), "capset")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def refuse_keyrings():
    """A seccomp filter: the keyring calls fail with EPERM, and so does every call made
    through another architecture's numbers (x32, or 32-bit entry points), where the
    keyring calls are numbered differently."""
    if platform.machine() not in KEYRING_CALLS:
        raise OSError(f"no seccomp filter for {platform.machine()}")
    arch, calls = KEYRING_CALLS[platform.machine()]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    program = [(ld, 0, 0, 4), (jeq, 0, 6, arch), (ld, 0, 0, 0), (jge, 4, 0, 0x40000000),  # seccomp_data: nr, arch
               *((jeq, 3 - i, 0, nr) for i, nr in enumerate(calls)), (ret, 0, 0, SECCOMP_RET_ALLOW),
               (ret, 0, 0, SECCOMP_RET_EPERM)]
    filters = (SockFilter * len(program))(*(SockFilter(*op) for op in program))
    prog = SockFprog(len(program), filters)
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")


def main():
    spec = json.loads(sys.argv[1])
    try:
        build_view(spec)
        drop_privileges(spec["uid"])
        refuse_keyrings()
        os.chdir(spec["cwd"])
    except OSError as e:
        print(f"sandbox: cannot confine the candidate: {e}", file=sys.stderr, flush=True)
        os._exit(FAILED)
    os.execv(spec["argv"][0], spec["argv"])


if __name__ == "__main__":
    main()
