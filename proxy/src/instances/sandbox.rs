//! What an instance process is confined to before it executes the function's command: its
//! own mount namespace with a read-only view of the host (its working directory writable, a
//! private `/tmp` and `/dev/shm`), an unprivileged user with no capabilities at all, no way
//! to gain privileges (`no_new_privs`), and a seccomp filter refusing what a function never
//! needs. A function is untrusted code: this is what keeps it off the host's files, the
//! kernel's attack surface and the other instances.
//!
//! Everything that allocates (paths, the seccomp program, the user's ids) is prepared in the
//! parent by [`Sandbox::prepare`]; [`Sandbox::enter`] runs between `fork` and `exec` and only
//! makes system calls.
//!
//! No user namespace: the instance already runs as a user without capabilities, and one
//! would only let it map itself to a namespace-local root (which the filter refuses, since
//! that is where most kernel privilege bugs are reached).

use std::{collections::BTreeMap, ffi::CString, io, os::unix::ffi::OsStrExt, path::Path};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// An unprivileged user as the system knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("user {0:?} does not exist (the install script creates it)")]
    NoSuchUser(String),
    #[error("user {0:?} is root (uid 0): instances never run as root")]
    Root(String),
    #[error("building the seccomp filter: {0}")]
    Seccomp(String),
    #[error("{0:?} contains a NUL byte")]
    Path(std::path::PathBuf),
}

impl User {
    /// Looks `name` up in the user database; refuses uid 0 whatever its name.
    pub fn lookup(name: &str) -> Result<User, SandboxError> {
        let c_name = CString::new(name).map_err(|_| SandboxError::NoSuchUser(name.into()))?;
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; `buf` outlives the use of `entry`.
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc != 0 || found.is_null() {
            return Err(SandboxError::NoSuchUser(name.into()));
        }
        if entry.pw_uid == 0 {
            return Err(SandboxError::Root(name.into()));
        }
        Ok(User {
            name: name.into(),
            uid: entry.pw_uid,
            gid: entry.pw_gid,
        })
    }
}

/// System calls a function never needs, refused with EPERM: loading kernel code or BPF,
/// mounting, namespaces, tracing other processes, keyrings, the clock, rebooting, io_uring.
const REFUSED: &[i64] = &[
    libc::SYS_bpf,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_mount_setattr,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_syslog,
    libc::SYS_vhangup,
    libc::SYS_lookup_dcookie,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// `clone` flags that create namespaces (refused like `unshare`).
const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP) as u64;

fn filters() -> Result<[BpfProgram; 2], SandboxError> {
    let err = |e: &dyn std::fmt::Display| SandboxError::Seccomp(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        REFUSED.iter().map(|&nr| (nr, Vec::new())).collect();
    // One rule per flag: the filter's conditions compare a masked argument for equality.
    let mut clone_rules = Vec::new();
    for bit in 0..64 {
        let flag = 1u64 << bit;
        if NAMESPACE_FLAGS & flag != 0 {
            let condition = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .map_err(|e| err(&e))?;
            clone_rules.push(SeccompRule::new(vec![condition]).map_err(|e| err(&e))?);
        }
    }
    rules.insert(libc::SYS_clone, clone_rules);
    let refuse = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| err(&e))?;
    // clone3 passes its flags in memory, where a filter cannot look: "not implemented" makes
    // the C library fall back to clone, whose flags the filter above sees.
    let no_clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| err(&e))?;
    Ok([
        refuse.try_into().map_err(|e| err(&e))?,
        no_clone3.try_into().map_err(|e| err(&e))?,
    ])
}

/// Everything [`Sandbox::enter`] needs, prepared in the parent.
#[derive(Debug)]
pub struct Sandbox {
    user: User,
    workdir: CString,
    filters: [BpfProgram; 2],
    /// Host entries directly under /tmp the function lives in (its working directory, its
    /// program): the private /tmp would hide them, so they are mounted back into it.
    /// `true`: a directory.
    keep_in_tmp: [Option<(CString, bool)>; 2],
}

/// The entry directly under /tmp that holds `path` (`/tmp/a` for `/tmp/a/b/c`), if any.
fn tmp_entry(path: &Path) -> Option<std::path::PathBuf> {
    let mut parts = path.components();
    let (Some(std::path::Component::RootDir), Some(tmp), Some(first)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    (tmp.as_os_str() == "tmp").then(|| Path::new("/tmp").join(first))
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

impl Sandbox {
    /// For instances working in `workdir` and running `program` (as configured: a bare
    /// name is looked up in `PATH`, outside /tmp).
    pub fn prepare(user: User, workdir: &Path, program: &Path) -> Result<Sandbox, SandboxError> {
        let c_path = |p: &Path| {
            CString::new(p.as_os_str().as_bytes()).map_err(|_| SandboxError::Path(p.into()))
        };
        let mut keep_in_tmp: [Option<(CString, bool)>; 2] = [None, None];
        let mut entries: Vec<std::path::PathBuf> = [workdir, program]
            .iter()
            .filter_map(|p| tmp_entry(p))
            .collect();
        entries.dedup();
        for (slot, entry) in keep_in_tmp.iter_mut().zip(entries) {
            *slot = Some((c_path(&entry)?, entry.is_dir()));
        }
        Ok(Sandbox {
            user,
            workdir: c_path(workdir)?,
            filters: filters()?,
            keep_in_tmp,
        })
    }

    /// Confines the calling process (a child about to `exec`; wsedge runs as root).
    ///
    /// # Safety
    /// Only between `fork` and `exec`: it makes system calls and allocates nothing.
    pub unsafe fn enter(&self) -> io::Result<()> {
        unsafe {
            self.enter_mount_namespace()?;
            self.drop_privileges()?;
            for filter in &self.filters {
                seccompiler::apply_filter(filter).map_err(|_| io::Error::last_os_error())?;
            }
        }
        Ok(())
    }

    unsafe fn enter_mount_namespace(&self) -> io::Result<()> {
        let root = c"/";
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Mounts made here stay here; the host's later mounts and unmounts still show.
            check(libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ))?;
            // The working directory becomes a mount of its own, so it can be writable below
            // while the rest is read-only.
            check(libc::mount(
                self.workdir.as_ptr(),
                self.workdir.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            let read_only = MountAttr {
                attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID,
                attr_clr: 0,
                propagation: 0,
                userns_fd: 0,
            };
            match setattr(root, &read_only) {
                Ok(()) => {
                    let writable = MountAttr {
                        attr_set: 0,
                        attr_clr: MOUNT_ATTR_RDONLY,
                        propagation: 0,
                        userns_fd: 0,
                    };
                    setattr(&self.workdir, &writable)?;
                }
                // Kernels before 5.12 have no recursive mount_setattr: the host stays
                // writable where Unix permissions allow, and /tmp is still private.
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {}
                Err(e) => return Err(e),
            }
            // Held across the /tmp mount below, which would hide a working directory under /tmp.
            let workdir = libc::open(
                self.workdir.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            );
            if workdir < 0 {
                return Err(io::Error::last_os_error());
            }
            // Copies of the host's /tmp entries the function lives in, taken before the private
            // /tmp hides them and mounted back into it below.
            let mut kept = [-1; 2];
            for (fd, keep) in kept.iter_mut().zip(&self.keep_in_tmp) {
                if let Some((path, _)) = keep {
                    let rc = libc::syscall(
                        libc::SYS_open_tree,
                        libc::AT_FDCWD,
                        path.as_ptr(),
                        OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE,
                    );
                    if rc < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    *fd = rc as libc::c_int;
                }
            }
            for dir in [c"/tmp", c"/dev/shm"] {
                // Private, and charged to the instance's memory limit.
                let options = c"mode=1777,size=64m";
                let rc = libc::mount(
                    c"tmpfs".as_ptr(),
                    dir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    options.as_ptr().cast(),
                );
                if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT) {
                    return Err(io::Error::last_os_error());
                }
            }
            for (fd, keep) in kept.into_iter().zip(&self.keep_in_tmp) {
                let Some((path, is_dir)) = keep else {
                    continue;
                };
                // A mount point for it in the fresh tmpfs, then the copy on top.
                let made = if *is_dir {
                    libc::mkdir(path.as_ptr(), 0o755)
                } else {
                    let file = libc::open(
                        path.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    if file >= 0 {
                        libc::close(file);
                        0
                    } else {
                        -1
                    }
                };
                check(made)?;
                let rc = libc::syscall(
                    libc::SYS_move_mount,
                    fd,
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                );
                libc::close(fd);
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // The process's directory was entered before the mounts above, on the mount now
            // hidden under the writable bind: enter it again.
            let entered = check(libc::fchdir(workdir));
            libc::close(workdir);
            entered
        }
    }

    unsafe fn drop_privileges(&self) -> io::Result<()> {
        unsafe {
            // The bounding set too (while still root): nothing executed later can regain a
            // capability, whatever file capabilities it carries.
            for cap in 0..64 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
            }
            check(libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ))?;
            let gid = self.user.gid;
            check(libc::setgroups(1, &gid))?;
            check(libc::setresgid(gid, gid, gid))?;
            // Leaving uid 0 clears the permitted, effective and ambient capability sets.
            check(libc::setresuid(self.user.uid, self.user.uid, self.user.uid))?;
            // A change of credentials clears the parent-death signal: set it again, so the
            // instance still dies with wsedge.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        }
    }
}

/// A system call's return value as a result: 0 is success, anything else the errno.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

unsafe fn setattr(path: &std::ffi::CStr, attr: &MountAttr) -> io::Result<()> {
    // SAFETY: a plain syscall with a valid path and attribute struct.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            AT_RECURSIVE,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_refused_by_uid_and_a_missing_user_is_named() {
        assert!(matches!(User::lookup("root"), Err(SandboxError::Root(_))));
        let nobody = User::lookup("nobody").expect("Debian has nobody");
        assert_ne!(nobody.uid, 0);
        assert!(matches!(
            User::lookup("no-such-user-here"),
            Err(SandboxError::NoSuchUser(n)) if n == "no-such-user-here"
        ));
    }

    #[test]
    fn only_entries_directly_under_tmp_are_kept() {
        assert_eq!(
            tmp_entry(Path::new("/tmp/clone/target/debug/echo-fn")),
            Some("/tmp/clone".into())
        );
        assert_eq!(
            tmp_entry(Path::new("/tmp/echo-fn")),
            Some("/tmp/echo-fn".into())
        );
        assert_eq!(tmp_entry(Path::new("/tmpx/a")), None);
        assert_eq!(tmp_entry(Path::new("/work/tmp/a")), None);
        assert_eq!(tmp_entry(Path::new("python3")), None);
        assert_eq!(tmp_entry(Path::new("/tmp")), None);
    }

    #[test]
    fn the_filters_build_for_this_architecture() {
        let [refuse, clone3] = filters().unwrap();
        assert!(
            refuse.len() > REFUSED.len(),
            "one jump per refused call at least"
        );
        assert!(!clone3.is_empty());
    }
}
