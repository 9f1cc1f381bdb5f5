/**
 * The default seccomp profile of app containers.
 *
 * runc has no built-in default (`runc spec` emits none; the "default profile" people mean is
 * Docker's, an allow-list of ~350 syscalls that is easy to get subtly wrong by hand). This one is
 * the other way round: every syscall is allowed except the clearly dangerous ones below, which
 * fail with EPERM (a few with ENOSYS, see below). Most of them already fail for lack of a
 * capability (apps keep only runc's defaults: AUDIT_WRITE, KILL, NET_BIND_SERVICE); the filter is
 * the second wall, and it closes what no capability guards: new user namespaces (from which a
 * process gains every capability over new namespaces — the door to most container escapes),
 * the keyring, bpf, perf events, userfaultfd, io_uring.
 *
 * CRIU and the filter (verified by test/oci-runtime.test.ts, seccomp case):
 * - dump: CRIU's parasite code runs inside the app's processes, but CRIU seizes them with
 *   PTRACE_O_SUSPEND_SECCOMP, so the filter does not apply to it; the filter itself is dumped
 *   (PTRACE_SECCOMP_GET_FILTER) as part of the image.
 * - restore: CRIU forks the tree, maps memory, makes threads (clone3 with set_tid) and opens
 *   userfaultfd for lazy pages BEFORE it installs each task's filters, as the restorer's very last
 *   step; mounts, namespaces and the network lock are done by criu itself outside the container.
 *   So nothing in this list is needed by a checkpoint or a restore — and a restored app is
 *   filtered exactly as before (checked: `Seccomp: 2` and EPERM again after the restore). Lazy
 *   restore too, by hand (criu lazy-pages + runc restore --lazy-pages, CRIU 4.2.1): the restorer
 *   opened its userfaultfd, then installed the filter; the app answered from lazily served pages.
 *
 * ENOSYS instead of EPERM, where "not there" makes programs fall back:
 * - clone3: its flags sit in a struct the filter cannot look into, so a clone3 that makes a user
 *   namespace cannot be told apart; glibc (and Docker's profile) fall back to clone, whose flags
 *   the filter does check.
 * - io_uring_setup: libuv and others fall back to threads. CRIU cannot dump an io_uring
 *   either, so an app that used one could never be swapped out.
 *
 * The rules name the x86-64, x86 and x32 ABIs, so the 32-bit syscall numbers of a 64-bit process
 * (int 0x80) are filtered too. Names libseccomp does not know are skipped by runc.
 */

/** One rule of the OCI runtime spec's `linux.seccomp.syscalls`. */
export interface SeccompRule {
  names: string[];
  action: 'SCMP_ACT_ERRNO' | 'SCMP_ACT_ALLOW' | 'SCMP_ACT_KILL';
  errnoRet?: number;
  args?: Array<{ index: number; value: number; valueTwo?: number; op: string }>;
}

/** `linux.seccomp` of the OCI runtime spec. */
export interface SeccompProfile {
  defaultAction: string;
  architectures: string[];
  syscalls: SeccompRule[];
}

const EPERM = 1;
const ENOSYS = 38;

/** Syscalls the default profile denies with EPERM, grouped by why. */
export const DENIED_SYSCALLS: Readonly<Record<string, readonly string[]>> = {
  'replace the kernel or reboot': ['kexec_load', 'kexec_file_load', 'reboot'],
  'kernel modules': ['init_module', 'finit_module', 'delete_module', 'create_module', 'query_module', 'get_kernel_syms'],
  'file handles (open_by_handle_at reads any file of a mounted fs: the "shocker" escape)': ['open_by_handle_at', 'name_to_handle_at'],
  'mounts': ['mount', 'umount', 'umount2', 'pivot_root', 'move_mount', 'open_tree', 'fsopen', 'fsconfig', 'fsmount', 'fspick', 'mount_setattr'],
  'namespaces': ['unshare', 'setns'],
  'swap': ['swapon', 'swapoff'],
  'kernel attack surface no app needs': ['bpf', 'perf_event_open', 'userfaultfd', 'io_uring_enter', 'io_uring_register'],
  'the keyring is not namespaced': ['keyctl', 'add_key', 'request_key'],
  'host-wide state': ['acct', 'quotactl', 'settimeofday', 'clock_settime', 'clock_adjtime', 'stime', 'iopl', 'ioperm', 'kcmp'],
  'obsolete': ['lookup_dcookie', 'nfsservctl', 'uselib', 'ustat', 'sysfs', '_sysctl', 'vm86', 'vm86old'],
};

/** Syscalls the default profile answers with ENOSYS (see above). */
export const ENOSYS_SYSCALLS: readonly string[] = ['clone3', 'io_uring_setup'];

/**
 * clone flags that make a new namespace (CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID,
 * NEWNET): a clone with any of them is denied, one rule per flag (seccomp compares with a mask and
 * a value, so "any of" is several rules).
 */
export const CLONE_NAMESPACE_FLAGS: Readonly<Record<string, number>> = {
  CLONE_NEWNS: 0x00020000,
  CLONE_NEWCGROUP: 0x02000000,
  CLONE_NEWUTS: 0x04000000,
  CLONE_NEWIPC: 0x08000000,
  CLONE_NEWUSER: 0x10000000,
  CLONE_NEWPID: 0x20000000,
  CLONE_NEWNET: 0x40000000,
};

/** The default profile: allow everything but the syscalls above. */
export function defaultSeccomp(): SeccompProfile {
  return {
    defaultAction: 'SCMP_ACT_ALLOW',
    architectures: ['SCMP_ARCH_X86_64', 'SCMP_ARCH_X86', 'SCMP_ARCH_X32'],
    syscalls: [
      { names: Object.values(DENIED_SYSCALLS).flat(), action: 'SCMP_ACT_ERRNO', errnoRet: EPERM },
      { names: [...ENOSYS_SYSCALLS], action: 'SCMP_ACT_ERRNO', errnoRet: ENOSYS },
      // clone(flags, …) on x86-64: flags is argument 0 (on s390 it is 1; not a target).
      ...Object.values(CLONE_NAMESPACE_FLAGS).map(
        (flag): SeccompRule => ({ names: ['clone'], action: 'SCMP_ACT_ERRNO', errnoRet: EPERM, args: [{ index: 0, value: flag, valueTwo: flag, op: 'SCMP_CMP_MASKED_EQ' }] }),
      ),
    ],
  };
}
