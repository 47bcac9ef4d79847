/*
 * sk-runtime: the container executor of sandbox-kernel.
 *
 * The normative description is docs/runtime-protocol.md; this file implements it.
 * Three processes are involved:
 *
 *   supervisor  host namespaces: parses the plan, clones init, writes id maps,
 *               relays progress to the status fd, forwards signals, watches the
 *               control fd, reports the final status and exits with it.
 *   init        PID 1 of the new pid namespace: joins cgroups, builds the mount
 *               tree (every in-root path is resolved with openat2 RESOLVE_IN_ROOT
 *               so a hostile image cannot redirect a mount onto the host),
 *               pivots, forks the main process, then reaps and forwards signals.
 *   main        child of init: identity, capabilities, no_new_privs, fd cleanup,
 *               seccomp, execve.
 *
 * Internal channels:
 *   p2c  supervisor -> init: 'S' once the id maps are written, 'G' to relay
 *        `go`. Its write end open (no POLLHUP) after init armed PDEATHSIG
 *        proves the supervisor was alive then.
 *   c2p  init -> supervisor: ready-made status lines (`exec`, `error`, `exit`).
 *   rep  main -> init (O_CLOEXEC): "T<us>\n" just before execve, then on
 *        failure an `error ...` line. EOF after only the T line = exec succeeded.
 *
 * Only glibc is used; capabilities, seccomp, openat2, pivot_root and close_range
 * go through raw syscalls / prctl.
 */

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/netlink.h>
#include <linux/openat2.h>
#include <linux/seccomp.h>

#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
/* The new mount API (idmapped mounts), spelled out for older C libraries. */
#define SK_OPEN_TREE_CLONE         1
#define SK_MOVE_MOUNT_F_EMPTY_PATH 0x00000004
#define SK_MOVE_MOUNT_T_EMPTY_PATH 0x00000040
#define SK_MOUNT_ATTR_RDONLY       0x00000001
#define SK_MOUNT_ATTR_NOSUID       0x00000002
#define SK_MOUNT_ATTR_NODEV        0x00000004
#define SK_MOUNT_ATTR_NOEXEC       0x00000008
#define SK_MOUNT_ATTR_IDMAP        0x00100000
/* the kernel reads every member (its ABI); the code sets two of them */
struct sk_mount_attr {
    uint64_t attr_set;    // cppcheck-suppress unusedStructMember
    uint64_t attr_clr;    // cppcheck-suppress unusedStructMember
    uint64_t propagation; // cppcheck-suppress unusedStructMember
    uint64_t userns_fd;   // cppcheck-suppress unusedStructMember
};
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT           47
#define PR_CAP_AMBIENT_RAISE     2
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

/* ------------------------------------------------------------------------- */
/* Limits and constants                                                       */
/* ------------------------------------------------------------------------- */

#define MAX_PLAN_BYTES   (16u << 20) /* whole plan file */
#define MAX_LINE_BYTES   (1u << 20)  /* one record */
#define MAX_RECORDS      65536u
#define MAX_FIELDS       5     /* fields after the keyword (mount has 5) */
#define MAX_SECCOMP_INSN 4096u /* BPF_MAXINSNS */
#define MSG_MAX          1024
#define LINE_MAX_OUT     8192

#define EXIT_SETUP    125
#define EXIT_NOEXEC   126
#define EXIT_NOTFOUND 127

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* Signals the supervisor forwards to init and init forwards to the main pid. */
static const int forwarded_signals[] = { SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 };

/* ------------------------------------------------------------------------- */
/* Global state                                                               */
/* ------------------------------------------------------------------------- */

enum role { ROLE_SUPERVISOR, ROLE_INIT, ROLE_MAIN };

static enum role g_role = ROLE_SUPERVISOR;
static int g_status_fd = -1;  /* supervisor: --status-fd */
static int g_report_fd = -1;  /* init: c2p write end; main: exec-report pipe */
static int g_share_fd = -1;   /* --share-fd: a unix socket; init sends `share` dirs there */
static pid_t g_init_pid = -1; /* supervisor: host pid of init, for cleanup */
static const char *g_id = "?";
static struct timespec g_t0; /* supervisor start, inherited by init and main */
static char *g_args;         /* the executor's argv strings, contiguous (main's argv[0]) */
static size_t g_args_len;    /* their length, the last NUL included */
static int g_last_cap = 63;  /* read from /proc before pivot */

/* ------------------------------------------------------------------------- */
/* Small helpers: time, I/O, percent-encoding                                 */
/* ------------------------------------------------------------------------- */

static long long us_since_start(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long long)(now.tv_sec - g_t0.tv_sec) * 1000000LL + (now.tv_nsec - g_t0.tv_nsec) / 1000;
}

/* Write everything (retrying on EINTR and short writes). Errors are returned,
 * never fatal: a vanished status reader must not kill the supervisor. */
static int write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int need_escape(unsigned char c)
{
    return c == '%' || c == ' ' || c < 0x20 || c == 0x7f;
}

/* Percent-encode SRC (LEN bytes) into DST (capacity CAP, always NUL-terminated;
 * output is truncated at an escape boundary if it does not fit). */
static void pct_encode(char *dst, size_t cap, const char *src, size_t len)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    if (cap < 3)
        return;
    if (len == 0) {
        memcpy(dst, "%-", 3);
        return;
    }
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)src[i];
        if (need_escape(c)) {
            if (o + 4 > cap)
                break;
            dst[o++] = '%';
            dst[o++] = hex[c >> 4];
            dst[o++] = hex[c & 15];
        } else {
            if (o + 2 > cap)
                break;
            dst[o++] = (char)c;
        }
    }
    dst[o] = '\0';
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* Decode a percent-encoded field in place (S has LEN bytes, no terminator
 * needed). Returns the decoded length, or -1 for a malformed field: a raw byte
 * that must have been escaped, a bad or truncated escape, or `%-` anywhere but
 * as the whole field. The result is NUL-terminated. */
static long pct_decode(char *s, size_t len)
{
    size_t o = 0;
    if (len == 2 && s[0] == '%' && s[1] == '-') {
        s[0] = '\0';
        return 0;
    }
    if (len == 0)
        return -1;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '%') {
            int hi, lo;
            if (i + 2 >= len)
                return -1;
            hi = hexval(s[i + 1]);
            lo = hexval(s[i + 2]);
            if (hi < 0 || lo < 0)
                return -1;
            s[o++] = (char)(hi << 4 | lo);
            i += 2;
        } else if (c == ' ' || c < 0x20 || c == 0x7f) {
            return -1;
        } else {
            s[o++] = (char)c;
        }
    }
    s[o] = '\0';
    return (long)o;
}

/* ------------------------------------------------------------------------- */
/* Error reporting                                                            */
/* ------------------------------------------------------------------------- */

static char g_stage_buf[PATH_MAX + 64];

/* Format a stage name such as "mount /proc" into a static buffer. */
__attribute__((format(printf, 1, 2))) static const char *stagef(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    (void)vsnprintf(g_stage_buf, sizeof g_stage_buf, fmt, ap); /* truncation is fine */
    va_end(ap);
    return g_stage_buf;
}

static void print_stderr_error(const char *stage, const char *msg)
{
    char line[LINE_MAX_OUT];
    int n = snprintf(line, sizeof line, "sk-runtime: %s: %s: %s\n", g_id, stage, msg);
    if (n > 0)
        write_all(2, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

/* Copy SRC plus a newline into DST (capacity CAP >= 2), truncating SRC. */
static void copy_line(char *dst, size_t cap, const char *src)
{
    size_t n = strnlen(src, cap - 2);
    memcpy(dst, src, n);
    dst[n] = '\n';
    dst[n + 1] = '\0';
}

static void status_line(const char *line)
{
    if (g_status_fd >= 0)
        write_all(g_status_fd, line, strlen(line));
}

/*
 * Report a setup failure and exit with CODE.
 * Supervisor: `error` status line + readable stderr line, kill init if cloned.
 * Init/main: the `error` line goes to the report fd; the supervisor relays it
 * and prints the stderr line (one place that prints).
 * Messages must never contain environment values.
 */
__attribute__((noreturn, format(printf, 4, 5))) static void
die(int code, int err, const char *stage, const char *fmt, ...)
{
    /* sized so that the encoded line always fits: 2048 + 3072 + 32 < 8192 */
    char msg[MSG_MAX], estage[2048], emsg[MSG_MAX * 3], line[LINE_MAX_OUT];
    va_list ap;
    va_start(ap, fmt);
    (void)vsnprintf(msg, sizeof msg, fmt, ap); /* truncation is fine */
    va_end(ap);
    pct_encode(estage, sizeof estage, stage, strlen(stage));
    pct_encode(emsg, sizeof emsg, msg, strlen(msg));
    (void)snprintf(line, sizeof line, "error %s %d %s\n", estage, err, emsg);

    if (g_role == ROLE_SUPERVISOR) {
        if (g_init_pid > 0) {
            kill(g_init_pid, SIGKILL);
            while (waitpid(g_init_pid, NULL, 0) < 0 && errno == EINTR)
                ;
        }
        status_line(line);
        print_stderr_error(stage, msg);
        exit(code);
    }
    write_all(g_report_fd, line, strlen(line));
    _exit(code);
}

/* ------------------------------------------------------------------------- */
/* The plan                                                                   */
/* ------------------------------------------------------------------------- */

/* MS_NOSYMFOLLOW (Linux 5.10; older C libraries lack the name): no path resolution through
 * the mount follows a symlink on it, the host's included. */
#define SK_MS_NOSYMFOLLOW 256

/* kept by hand: the keywords grouped by phase, in kwtab order */
/* clang-format off */
enum kw {
    /* supervisor */
    K_ID, K_NAMESPACES, K_CGROUP, K_SECCOMP, K_SYNC, K_UIDMAP, K_GIDMAP, K_IDMAPHELPER,
    K_NOUSERNS, K_BINDMAP, K_LOWERMAP, K_NETLINK,
    /* mount phase, in order */
    K_HOSTNAME, K_SCRATCH, K_SHIMDIR, K_SHIMFILE, K_ROOTFS, K_REALDIR, K_MKDIR, K_TOUCH, K_FILE, K_SYMLINK,
    K_MOUNT, K_BIND, K_MASK, K_READONLY, K_REMOUNT, K_SHARE, K_PIVOT,
    /* main process */
    K_ENV, K_CWD, K_USER, K_GROUPS, K_UMASK, K_RLIMIT, K_CAPABILITIES, K_NONEWPRIVS, K_ARGV,
    K_COUNT
};
/* clang-format on */

enum phase { PH_SUPERVISOR, PH_MOUNT, PH_PROCESS };

static const struct kwdef {
    const char *name;
    int nfields;
    enum phase phase;
    int once; /* may appear at most once */
} kwtab[K_COUNT] = {
    [K_ID] = { "id", 1, PH_SUPERVISOR, 1 },
    [K_NAMESPACES] = { "namespaces", 1, PH_SUPERVISOR, 1 },
    [K_CGROUP] = { "cgroup", 1, PH_SUPERVISOR, 0 },
    [K_SECCOMP] = { "seccomp", 1, PH_SUPERVISOR, 1 },
    [K_SYNC] = { "sync", 1, PH_SUPERVISOR, 1 },
    [K_UIDMAP] = { "uidmap", 3, PH_SUPERVISOR, 0 },
    [K_GIDMAP] = { "gidmap", 3, PH_SUPERVISOR, 0 },
    [K_IDMAPHELPER] = { "idmap-helper", 2, PH_SUPERVISOR, 1 },
    [K_NOUSERNS] = { "nouserns", 0, PH_SUPERVISOR, 1 },
    [K_BINDMAP] = { "bindmap", 3, PH_SUPERVISOR, 0 },
    [K_LOWERMAP] = { "lowermap", 3, PH_SUPERVISOR, 0 },
    [K_NETLINK] = { "netlink", 1, PH_SUPERVISOR, 0 },
    [K_HOSTNAME] = { "hostname", 1, PH_MOUNT, 1 },
    [K_SCRATCH] = { "scratch", 3, PH_MOUNT, 1 },
    [K_SHIMDIR] = { "shimdir", 2, PH_MOUNT, 0 },
    [K_SHIMFILE] = { "shimfile", 2, PH_MOUNT, 0 },
    [K_ROOTFS] = { "rootfs", 1, PH_MOUNT, 1 },
    [K_REALDIR] = { "realdir", 1, PH_MOUNT, 0 },
    [K_MKDIR] = { "mkdir", 2, PH_MOUNT, 0 },
    [K_TOUCH] = { "touch", 2, PH_MOUNT, 0 },
    [K_FILE] = { "file", 3, PH_MOUNT, 0 },
    [K_SYMLINK] = { "symlink", 2, PH_MOUNT, 0 },
    [K_MOUNT] = { "mount", 5, PH_MOUNT, 0 },
    [K_BIND] = { "bind", 3, PH_MOUNT, 0 },
    [K_MASK] = { "mask", 1, PH_MOUNT, 0 },
    [K_READONLY] = { "readonly", 1, PH_MOUNT, 0 },
    [K_REMOUNT] = { "remount", 2, PH_MOUNT, 0 },
    [K_SHARE] = { "share", 1, PH_MOUNT, 0 },
    [K_PIVOT] = { "pivot", 0, PH_MOUNT, 1 },
    [K_ENV] = { "env", 1, PH_PROCESS, 0 },
    [K_CWD] = { "cwd", 1, PH_PROCESS, 1 },
    [K_USER] = { "user", 2, PH_PROCESS, 1 },
    [K_GROUPS] = { "groups", 1, PH_PROCESS, 1 },
    [K_UMASK] = { "umask", 1, PH_PROCESS, 1 },
    [K_RLIMIT] = { "rlimit", 3, PH_PROCESS, 0 },
    [K_CAPABILITIES] = { "capabilities", 1, PH_PROCESS, 1 },
    [K_NONEWPRIVS] = { "nonewprivs", 1, PH_PROCESS, 1 },
    [K_ARGV] = { "argv", 1, PH_PROCESS, 0 },
};

/* One mount-phase record, fields decoded in place in the plan buffer. */
struct rec {
    enum kw kw;
    unsigned line;
    char *f[MAX_FIELDS];
    size_t len[MAX_FIELDS];
    unsigned long mflags; /* parsed FLAGS for mount/bind/remount */
    int recursive;        /* bind: `rec` */
    int idmap;            /* bind: `idmap` (the source seen through the bindmap ids) */
    int src_fd;           /* bind: the source, opened with the host credentials (O_PATH) */
    int tree_fd;          /* bind with idmap: the idmapped detached tree (supervisor) */
    mode_t mode;          /* mkdir/touch/file */
};

struct rlim_entry {
    const char *name;
    int resource;
    struct rlimit rl;
};

static struct plan {
    int clone_flags;
    int ns_cgroup, ns_user, ns_uts, ns_net;
    char **cgroups;
    size_t ncgroups;
    struct sock_filter *filter;
    unsigned short nfilter;
    int sync_net;
    unsigned char netlink[4][1024]; /* rtnetlink requests init sends in the container's netns */
    size_t netlink_len[4], nnetlink;
    char uidmap[4096], gidmap[4096];
    size_t uidmap_len, gidmap_len;
    int uid0_mapped, gid0_mapped;        /* container root exists (the maps have inside id 0) */
    const char *uid_helper, *gid_helper; /* newuidmap/newgidmap: they write the maps */
    int setgroups_denied; /* unprivileged direct maps: /proc/PID/setgroups is "deny" */
    int no_userns;        /* user.max_user_namespaces = 0 inside */
    char bindmap[4096], lowermap[4096];
    size_t bindmap_len, lowermap_len;
    const char *lowers[64]; /* rootfs: the layer dirs, top-most first */
    int lower_fds[64];      /* ... opened (or idmapped) before init becomes namespace root */
    size_t nlowers;
    size_t nshim; /* shimdir/shimfile records: a top layer made in the scratch tmpfs */
    struct rec *mounts;
    size_t nmounts;
    char **env;
    size_t nenv;
    char **argv;
    size_t nargv;
    const char *cwd;
    int has_user;
    uid_t uid;
    gid_t gid;
    int has_groups;
    gid_t *groups;
    size_t ngroups;
    int has_umask;
    mode_t umask;
    struct rlim_entry rlimits[16];
    size_t nrlimits;
    uint64_t caps; /* kept capabilities (default: none) */
} P;

/* kept by hand: several a line, in capability-number order */
/* clang-format off */
static const char *const cap_names[] = {
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
};
/* clang-format on */

static const struct {
    const char *name;
    int res;
} rlimit_names[] = {
    { "core", RLIMIT_CORE },   { "nofile", RLIMIT_NOFILE },   { "nproc", RLIMIT_NPROC },
    { "fsize", RLIMIT_FSIZE }, { "stack", RLIMIT_STACK },     { "as", RLIMIT_AS },
    { "cpu", RLIMIT_CPU },     { "memlock", RLIMIT_MEMLOCK },
};

static unsigned g_lineno;

__attribute__((noreturn, format(printf, 1, 2))) static void plan_error(const char *fmt, ...)
{
    char msg[MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    (void)vsnprintf(msg, sizeof msg, fmt, ap); /* truncation is fine */
    va_end(ap);
    die(EXIT_SETUP, 0, stagef("plan %u", g_lineno), "%s", msg);
}

/* Parse an unsigned decimal (no sign, no spaces) not above MAX. */
static int parse_u64(const char *s, uint64_t max, uint64_t *out)
{
    uint64_t v = 0;
    if (!*s)
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        if (v > (max - (uint64_t)(*s - '0')) / 10)
            return -1;
        v = v * 10 + (uint64_t)(*s - '0');
    }
    *out = v;
    return 0;
}

static mode_t parse_mode(const char *s)
{
    unsigned v = 0;
    if (!*s || strlen(s) > 5)
        plan_error("bad octal mode");
    for (; *s; s++) {
        if (*s < '0' || *s > '7')
            plan_error("bad octal mode");
        v = v * 8 + (unsigned)(*s - '0');
    }
    if (v > 07777)
        plan_error("mode out of range");
    return (mode_t)v;
}

static uint32_t parse_id(const char *s)
{
    uint64_t v;
    if (parse_u64(s, UINT32_MAX - 1, &v) < 0)
        plan_error("bad numeric id");
    return (uint32_t)v;
}

/* In-root paths must be absolute and normalized: no empty, "." or ".."
 * components. openat2 would contain them anyway, but a normalized path makes
 * "parent + last component" splitting exact. */
static void check_root_path(const char *p)
{
    if (p[0] != '/')
        plan_error("path must be absolute");
    if (strlen(p) >= PATH_MAX)
        plan_error("path too long");
    if (p[1] == '\0')
        return;
    for (const char *c = p + 1;;) {
        const char *e = strchr(c, '/');
        size_t n = e ? (size_t)(e - c) : strlen(c);
        if (n == 0 || (n == 1 && c[0] == '.') || (n == 2 && c[0] == '.' && c[1] == '.'))
            plan_error("path must be normalized (no empty, . or .. components)");
        if (!e)
            break;
        c = e + 1;
    }
}

static void check_host_path(const char *p)
{
    if (p[0] != '/')
        plan_error("host path must be absolute");
    if (strlen(p) >= PATH_MAX)
        plan_error("path too long");
}

/* Copy the comma list S into BUF (capacity CAP) for strtok_r; WHAT names the list in the error. */
static void copy_list(char *buf, size_t cap, const char *s, const char *what)
{
    size_t n = strlen(s);
    if (n >= cap)
        plan_error("%s list too long", what);
    memcpy(buf, s, n + 1);
}

/* Parse a comma list of mount flags. REC (bind only): accept `rec` and `idmap`. */
static unsigned long parse_mount_flags(const char *s, int allow_atime, int *rec, int *idmap)
{
    unsigned long fl = 0;
    char buf[256];
    if (strcmp(s, "-") == 0)
        return 0;
    copy_list(buf, sizeof buf, s, "flag");
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        /* kept by hand: one flag a line */
        /* clang-format off */
        if (strcmp(t, "ro") == 0) fl |= MS_RDONLY;
        else if (strcmp(t, "nosuid") == 0) fl |= MS_NOSUID;
        else if (strcmp(t, "nodev") == 0) fl |= MS_NODEV;
        else if (strcmp(t, "noexec") == 0) fl |= MS_NOEXEC;
        else if (strcmp(t, "nosymfollow") == 0) fl |= SK_MS_NOSYMFOLLOW;
        else if (allow_atime && strcmp(t, "relatime") == 0) fl |= MS_RELATIME;
        else if (allow_atime && strcmp(t, "strictatime") == 0) fl |= MS_STRICTATIME;
        else if (allow_atime && strcmp(t, "noatime") == 0) fl |= MS_NOATIME;
        else if (rec && strcmp(t, "rec") == 0) *rec = 1;
        else if (idmap && strcmp(t, "idmap") == 0) *idmap = 1;
        else plan_error("unknown mount flag \"%s\"", t);
        /* clang-format on */
    }
    return fl;
}

static void parse_namespaces(const char *s)
{
    char buf[256];
    copy_list(buf, sizeof buf, s, "namespace");
    int have_mount = 0, have_pid = 0;
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        /* kept by hand: one namespace a line */
        /* clang-format off */
        if (strcmp(t, "mount") == 0) { P.clone_flags |= CLONE_NEWNS; have_mount = 1; }
        else if (strcmp(t, "pid") == 0) { P.clone_flags |= CLONE_NEWPID; have_pid = 1; }
        else if (strcmp(t, "uts") == 0) { P.clone_flags |= CLONE_NEWUTS; P.ns_uts = 1; }
        else if (strcmp(t, "ipc") == 0) P.clone_flags |= CLONE_NEWIPC;
        else if (strcmp(t, "net") == 0) { P.clone_flags |= CLONE_NEWNET; P.ns_net = 1; }
        else if (strcmp(t, "user") == 0) { P.clone_flags |= CLONE_NEWUSER; P.ns_user = 1; }
        else if (strcmp(t, "cgroup") == 0) P.ns_cgroup = 1;  /* unshared by init, later */
        else plan_error("unknown namespace \"%s\"", t);
        /* clang-format on */
    }
    if (!have_mount || !have_pid)
        plan_error("namespaces must include mount and pid");
}

static void parse_caps(const char *s)
{
    char buf[2048];
    copy_list(buf, sizeof buf, s, "capability");
    if (strcmp(buf, "-") == 0 || buf[0] == '\0')
        return;
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        size_t i;
        for (i = 0; i < sizeof cap_names / sizeof cap_names[0]; i++)
            if (strcmp(t, cap_names[i]) == 0)
                break;
        if (i == sizeof cap_names / sizeof cap_names[0])
            plan_error("unknown capability \"%s\"", t);
        P.caps |= 1ULL << i;
    }
}

static void parse_groups(const char *s)
{
    size_t n = 1;
    for (const char *c = s; *c; c++)
        n += *c == ',';
    if (n > 65536)
        plan_error("too many groups");
    P.groups = calloc(n, sizeof *P.groups);
    if (!P.groups)
        plan_error("out of memory");
    char *list = strdup(s);
    if (!list)
        plan_error("out of memory");
    P.ngroups = 0;
    if (strcmp(s, "-") != 0 && *s) {
        char *save = NULL;
        for (char *t = strtok_r(list, ",", &save); t; t = strtok_r(NULL, ",", &save))
            P.groups[P.ngroups++] = parse_id(t);
    }
    free(list);
    P.has_groups = 1;
}

static void parse_rlimit(char **f)
{
    size_t i;
    uint64_t v;
    struct rlim_entry e;
    for (i = 0; i < sizeof rlimit_names / sizeof rlimit_names[0]; i++)
        if (strcmp(f[0], rlimit_names[i].name) == 0)
            break;
    if (i == sizeof rlimit_names / sizeof rlimit_names[0])
        plan_error("unknown rlimit \"%s\"", f[0]);
    e.name = rlimit_names[i].name;
    e.resource = rlimit_names[i].res;
    for (int k = 0; k < 2; k++) {
        if (strcmp(f[k + 1], "inf") == 0)
            v = RLIM_INFINITY;
        else if (parse_u64(f[k + 1], UINT64_MAX - 1, &v) < 0)
            plan_error("bad rlimit value");
        if (k == 0)
            e.rl.rlim_cur = v;
        else
            e.rl.rlim_max = v;
    }
    if (e.rl.rlim_cur > e.rl.rlim_max)
        plan_error("rlimit soft above hard");
    if (P.nrlimits >= sizeof P.rlimits / sizeof P.rlimits[0])
        plan_error("too many rlimit records");
    P.rlimits[P.nrlimits++] = e;
}

/* Append one map line; returns whether it maps inside id 0. */
static int append_map(char *buf, size_t *len, char **f)
{
    uint32_t a = parse_id(f[0]), b = parse_id(f[1]), c = parse_id(f[2]);
    if (c == 0)
        plan_error("id map line with a count of 0");
    int n = snprintf(buf + *len, 4096 - *len, "%u %u %u\n", a, b, c);
    if (n < 0 || (size_t)n >= 4096 - *len)
        plan_error("id map too long");
    *len += (size_t)n;
    return a == 0;
}

/* Read a whole file into a fresh buffer (bounded). Returns NULL + errno. */
static char *read_file(const char *path, size_t max, size_t *out_len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap + 1);
    for (;;) {
        if (!buf) {
            close(fd);
            errno = ENOMEM;
            return NULL;
        }
        if (len == cap) {
            /* one byte of slack past MAX tells "exactly MAX" from "too big" */
            if (cap > max) {
                free(buf);
                close(fd);
                errno = EFBIG;
                return NULL;
            }
            cap = cap * 2 > max + 1 ? max + 1 : cap * 2;
            char *nb = realloc(buf, cap + 1);
            if (!nb)
                free(buf);
            buf = nb;
            continue;
        }
        ssize_t n = read(fd, buf + len, cap - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int e = errno;
            free(buf);
            close(fd);
            errno = e;
            return NULL;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = '\0';
    *out_len = len;
    return buf;
}

static void load_seccomp(const char *path)
{
    size_t len;
    char *buf = read_file(path, MAX_SECCOMP_INSN * sizeof(struct sock_filter), &len);
    if (!buf)
        die(EXIT_SETUP, errno, "seccomp", "cannot read seccomp filter %s: %s", path,
            strerror(errno));
    if (len == 0 || len % sizeof(struct sock_filter) != 0)
        die(EXIT_SETUP, EINVAL, "seccomp",
            "seccomp filter %s: size %zu is not a positive multiple of 8", path, len);
    P.filter = (struct sock_filter *)(void *)buf;
    P.nfilter = (unsigned short)(len / sizeof(struct sock_filter));
}

/* Parse the whole plan. Fields are decoded in place; mount-phase records are
 * kept in order, everything else is folded into P. */
/* netlink HEX: one rtnetlink request (built by the planner, with pyroute2), at most four of
 * 1 KiB each; init sends them in the container's network namespace and reports each reply. */
static void parse_netlink(const char *hex, size_t len)
{
    if (P.nnetlink == 4)
        plan_error("netlink: at most 4 requests");
    if (len < 32 || len % 2 || len / 2 > sizeof P.netlink[0])
        plan_error("netlink: expected the hex of one request of 16 to 1024 bytes");
    unsigned char *out = P.netlink[P.nnetlink];
    for (size_t i = 0; i < len; i += 2) {
        int hi = hexval(hex[i]), lo = hexval(hex[i + 1]);
        if (hi < 0 || lo < 0)
            plan_error("netlink: not hex");
        out[i / 2] = (unsigned char)(hi << 4 | lo);
    }
    P.netlink_len[P.nnetlink++] = len / 2;
}

static void parse_plan(const char *path)
{
    size_t len;
    char *buf = read_file(path, MAX_PLAN_BYTES, &len);
    if (!buf)
        die(EXIT_SETUP, errno, "plan", "cannot read plan %s: %s", path, strerror(errno));

    size_t nlines = 1;
    for (size_t i = 0; i < len; i++)
        nlines += buf[i] == '\n';
    if (nlines > MAX_RECORDS + 1)
        die(EXIT_SETUP, 0, "plan", "too many records (limit %u)", MAX_RECORDS);
    P.mounts = calloc(nlines, sizeof *P.mounts);
    P.env = calloc(nlines + 1, sizeof *P.env);
    P.argv = calloc(nlines + 1, sizeof *P.argv);
    P.cgroups = calloc(nlines, sizeof *P.cgroups);
    if (!P.mounts || !P.env || !P.argv || !P.cgroups)
        die(EXIT_SETUP, ENOMEM, "plan", "out of memory");

    int seen[K_COUNT] = { 0 };
    int nidmap = 0;      /* binds with the idmap flag */
    int nshare = 0;      /* share records */
    int mount_stage = 0; /* 0: nothing yet, 1: scratch seen, 2: rootfs seen, 3: pivot seen */
    char *p = buf, *end = buf + len;
    g_lineno = 0;
    while (p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        char *le = nl ? nl : end;
        g_lineno++;
        if ((size_t)(le - p) > MAX_LINE_BYTES)
            plan_error("line longer than %u bytes", MAX_LINE_BYTES);
        *le = '\0';
        char *line = p;
        p = nl ? nl + 1 : end;

        if (g_lineno == 1) {
            if (strcmp(line, "sk-runtime-plan 1") != 0)
                plan_error("first line must be \"sk-runtime-plan 1\"");
            continue;
        }
        if (*line == '\0')
            plan_error("empty line");

        /* split on single spaces */
        char *fields[MAX_FIELDS + 1];
        size_t flen[MAX_FIELDS + 1];
        int nf = 0;
        for (char *c = line;;) {
            char *sp = strchr(c, ' ');
            if (nf == MAX_FIELDS + 1)
                plan_error("too many fields");
            fields[nf] = c;
            flen[nf] = sp ? (size_t)(sp - c) : strlen(c);
            nf++;
            if (!sp)
                break;
            *sp = '\0';
            c = sp + 1;
        }
        /* keyword (not encoded: it is a fixed word) */
        int kw;
        for (kw = 0; kw < K_COUNT; kw++)
            if (strcmp(fields[0], kwtab[kw].name) == 0)
                break;
        if (kw == K_COUNT) {
            char ek[64];
            pct_encode(ek, sizeof ek, fields[0], flen[0]);
            plan_error("unknown keyword \"%s\"", ek);
        }
        const struct kwdef *d = &kwtab[kw];
        if (nf - 1 != d->nfields)
            plan_error("%s: expected %d fields, got %d", d->name, d->nfields, nf - 1);
        if (d->once && seen[kw])
            plan_error("%s: may appear only once", d->name);
        seen[kw]++;

        /* Slots past the record's fields are never read (nf - 1 == d->nfields),
         * but hold an empty string rather than garbage. */
        static char no_field[1];
        char *f[MAX_FIELDS];
        size_t fl[MAX_FIELDS] = { 0 };
        for (int i = 0; i < MAX_FIELDS; i++)
            f[i] = no_field;
        for (int i = 1; i < nf; i++) {
            long n = pct_decode(fields[i], flen[i]);
            if (n < 0)
                plan_error("%s: field %d is not correctly percent-encoded", d->name, i);
            /* only file CONTENT may carry NUL bytes */
            if (!(kw == K_FILE && i == 3) && memchr(fields[i], '\0', (size_t)n))
                plan_error("%s: field %d contains a NUL byte", d->name, i);
            f[i - 1] = fields[i];
            fl[i - 1] = (size_t)n;
        }

        if (d->phase == PH_MOUNT) {
            if (mount_stage == 3)
                plan_error("%s after pivot: pivot must be the last mount-phase record", d->name);
            struct rec *r = &P.mounts[P.nmounts++];
            r->kw = (enum kw)kw;
            r->line = g_lineno;
            r->src_fd = r->tree_fd = -1;
            for (int i = 0; i < d->nfields; i++) {
                r->f[i] = f[i];
                r->len[i] = fl[i];
            }
            switch (kw) {
            case K_HOSTNAME:
                if (fl[0] == 0 || fl[0] > 64)
                    plan_error("hostname must be 1..64 bytes");
                break;
            case K_SCRATCH:
                check_host_path(f[0]);
                if (strcmp(f[1], "-") != 0) {
                    uint64_t v;
                    if (parse_u64(f[1], UINT64_MAX, &v) < 0 || v == 0)
                        plan_error("scratch: bad size");
                    if (parse_u64(f[2], UINT64_MAX, &v) < 0 || v == 0)
                        plan_error("scratch: bad inode count");
                } else if (strcmp(f[2], "-") != 0) {
                    plan_error("scratch: an inode count needs a size");
                }
                mount_stage = 1;
                break;
            case K_SHIMDIR:
            case K_SHIMFILE:
                if (mount_stage != 1)
                    plan_error("%s must come between scratch and rootfs", d->name);
                check_root_path(f[0]);
                if (strcmp(f[0], "/") == 0)
                    plan_error("%s: cannot operate on the root itself", d->name);
                r->mode = parse_mode(f[1]);
                P.nshim++;
                break;
            case K_ROOTFS:
                if (mount_stage != 1)
                    plan_error("rootfs requires an earlier scratch record");
                /* the lowers are split in place: do_rootfs uses P.lowers */
                for (char *c = f[0], *e;; c = e + 1) {
                    e = strchr(c, ':');
                    if (e)
                        *e = '\0';
                    check_host_path(c);
                    if (P.nlowers == sizeof P.lowers / sizeof P.lowers[0])
                        plan_error("rootfs: more than %zu layers", P.nlowers);
                    P.lower_fds[P.nlowers] = -1;
                    P.lowers[P.nlowers++] = c;
                    if (!e)
                        break;
                }
                mount_stage = 2;
                break;
            case K_PIVOT:
                if (mount_stage != 2)
                    plan_error("pivot requires an earlier rootfs record");
                mount_stage = 3;
                break;
            default:
                if (mount_stage != 2)
                    plan_error("%s requires an earlier rootfs record", d->name);
                break;
            }
            switch (kw) {
            case K_SHARE: nshare++; /* fall through */
            case K_REALDIR:
            case K_MASK:
            case K_READONLY: check_root_path(f[0]); break;
            case K_MKDIR:
            case K_TOUCH:
            case K_FILE:
                check_root_path(f[0]);
                r->mode = parse_mode(f[1]);
                break;
            case K_SYMLINK:
                check_root_path(f[1]);
                if (fl[0] == 0)
                    plan_error("symlink: empty target");
                break;
            case K_MOUNT:
                check_root_path(f[2]);
                r->mflags = parse_mount_flags(f[3], 1, NULL, NULL);
                break;
            case K_BIND:
                check_host_path(f[0]);
                check_root_path(f[1]);
                r->mflags = parse_mount_flags(f[2], 0, &r->recursive, &r->idmap);
                nidmap += r->idmap;
                break;
            case K_REMOUNT:
                check_root_path(f[0]);
                r->mflags = parse_mount_flags(f[1], 1, NULL, NULL);
                break;
            default: break;
            }
            /* creating or mounting over the root itself makes no sense */
            if ((kw == K_TOUCH || kw == K_FILE || kw == K_MASK) && strcmp(f[0], "/") == 0)
                plan_error("%s: cannot operate on the root itself", d->name);
            if ((kw == K_SYMLINK || kw == K_BIND) && strcmp(f[1], "/") == 0)
                plan_error("%s: cannot operate on the root itself", d->name);
            if (kw == K_MOUNT && strcmp(f[2], "/") == 0)
                plan_error("%s: cannot operate on the root itself", d->name);
            continue;
        }

        switch (kw) {
        case K_ID: g_id = f[0]; break;
        case K_NAMESPACES: parse_namespaces(f[0]); break;
        case K_CGROUP:
            check_host_path(f[0]);
            P.cgroups[P.ncgroups++] = f[0];
            break;
        case K_SECCOMP:
            check_host_path(f[0]);
            load_seccomp(f[0]);
            break;
        case K_SYNC:
            if (strcmp(f[0], "net") != 0)
                plan_error("sync: only \"net\" is known");
            P.sync_net = 1;
            break;
        case K_UIDMAP: P.uid0_mapped |= append_map(P.uidmap, &P.uidmap_len, f); break;
        case K_GIDMAP: P.gid0_mapped |= append_map(P.gidmap, &P.gidmap_len, f); break;
        case K_IDMAPHELPER:
            check_host_path(f[0]);
            check_host_path(f[1]);
            P.uid_helper = f[0];
            P.gid_helper = f[1];
            break;
        case K_NOUSERNS: P.no_userns = 1; break;
        case K_NETLINK: parse_netlink(f[0], fl[0]); break;
        case K_BINDMAP: append_map(P.bindmap, &P.bindmap_len, f); break;
        case K_LOWERMAP: append_map(P.lowermap, &P.lowermap_len, f); break;
        case K_ENV:
            if (fl[0] == 0 || f[0][0] == '=' || !strchr(f[0], '='))
                plan_error("env: expected KEY=VALUE");
            P.env[P.nenv++] = f[0];
            break;
        case K_CWD:
            if (f[0][0] != '/')
                plan_error("cwd must be absolute");
            P.cwd = f[0];
            break;
        case K_USER:
            P.has_user = 1;
            P.uid = parse_id(f[0]);
            P.gid = parse_id(f[1]);
            break;
        case K_GROUPS: parse_groups(f[0]); break;
        case K_UMASK:
            P.has_umask = 1;
            P.umask = parse_mode(f[0]) & 0777;
            break;
        case K_RLIMIT: parse_rlimit(f); break;
        case K_CAPABILITIES: parse_caps(f[0]); break;
        case K_NONEWPRIVS:
            if (strcmp(f[0], "1") != 0)
                plan_error("nonewprivs: only 1 is accepted (it is always set)");
            break;
        case K_ARGV: P.argv[P.nargv++] = f[0]; break;
        default: break;
        }
    }
    g_lineno++;
    if (g_lineno == 1)
        plan_error("empty plan");
    if (!seen[K_NAMESPACES])
        plan_error("missing namespaces record");
    if (P.nargv == 0)
        plan_error("missing argv records");
    if (mount_stage != 0 && mount_stage != 3)
        plan_error("scratch/rootfs given but no pivot");
    if ((seen[K_UIDMAP] || seen[K_GIDMAP] || seen[K_IDMAPHELPER] || seen[K_NOUSERNS] ||
         seen[K_BINDMAP] || seen[K_LOWERMAP] || nidmap) &&
        !P.ns_user)
        plan_error("uidmap, gidmap, idmap-helper, nouserns, bindmap, lowermap and idmap binds "
                   "need the user namespace");
    if (nidmap && !P.bindmap_len)
        plan_error("a bind with the idmap flag needs bindmap records");
    if (P.bindmap_len && !nidmap)
        plan_error("bindmap records without a bind with the idmap flag");
    if (P.lowermap_len && !P.nlowers)
        plan_error("lowermap records need a rootfs record");
    if (P.ns_user && !P.uidmap_len)
        plan_error("the user namespace needs uidmap records");
    if (P.uid_helper && geteuid() == 0)
        plan_error("idmap-helper is for unprivileged callers (root writes the maps itself)");
    P.setgroups_denied = P.ns_user && P.gidmap_len && !P.uid_helper && geteuid() != 0;
    if (seen[K_HOSTNAME] && !P.ns_uts)
        plan_error("hostname needs the uts namespace");
    if (P.sync_net && !P.ns_net)
        plan_error("sync net needs the net namespace");
    if (P.nnetlink && !P.ns_net)
        plan_error("netlink needs the net namespace");
    if (nshare && g_share_fd < 0)
        plan_error("share records need --share-fd");
}

/* ------------------------------------------------------------------------- */
/* Process helpers: fds, signals, capabilities                                */
/* ------------------------------------------------------------------------- */

/* Block SIGCHLD and the forwarded signals; SET gets that set (for a signalfd). */
static void block_forwarded_signals(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGCHLD);
    for (size_t i = 0; i < sizeof forwarded_signals / sizeof forwarded_signals[0]; i++)
        sigaddset(set, forwarded_signals[i]);
    sigprocmask(SIG_BLOCK, set, NULL);
}

static int sys_close_range(unsigned lo, unsigned hi)
{
    return (int)syscall(SYS_close_range, lo, hi, 0);
}

/* Close every fd >= 3 except those in KEEP (ascending not required). */
static void close_fds_except(const int *keep, int nkeep)
{
    unsigned lo = 3;
    for (;;) {
        /* next kept fd at or above lo */
        int next = -1;
        for (int i = 0; i < nkeep; i++)
            if (keep[i] >= (int)lo && (next < 0 || keep[i] < next))
                next = keep[i];
        if (next < 0) {
            sys_close_range(lo, ~0U);
            return;
        }
        if ((unsigned)next > lo)
            sys_close_range(lo, (unsigned)next - 1);
        lo = (unsigned)next + 1;
    }
}

static int caps_set(uint64_t eff, uint64_t prm, uint64_t inh)
{
    struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct d[2] = {
        { (uint32_t)eff, (uint32_t)prm, (uint32_t)inh },
        { (uint32_t)(eff >> 32), (uint32_t)(prm >> 32), (uint32_t)(inh >> 32) },
    };
    return (int)syscall(SYS_capset, &h, d);
}

/* The permitted set of this process (the host may not grant every cap). */
static uint64_t caps_permitted(void)
{
    struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct d[2];
    memset(d, 0, sizeof d);
    if (syscall(SYS_capget, &h, d) < 0)
        return 0;
    return (uint64_t)d[0].permitted | (uint64_t)d[1].permitted << 32;
}

/* Drop every bounding-set capability not in KEEP. EINVAL means "past the
 * kernel's last cap": stop there. Returns 0 or -1 with errno. */
static int drop_bounding(uint64_t keep)
{
    for (int c = 0; c <= g_last_cap && c < 64; c++) {
        if (keep & (1ULL << c))
            continue;
        if (prctl(PR_CAPBSET_DROP, (unsigned long)c, 0, 0, 0) < 0) {
            if (errno == EINVAL)
                break;
            return -1;
        }
    }
    return 0;
}

static void read_last_cap(void)
{
    char buf[16];
    int fd = open("/proc/sys/kernel/cap_last_cap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return; /* keep 63: drop_bounding stops at EINVAL */
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n > 0) {
        buf[n] = '\0';
        long v = strtol(buf, NULL, 10);
        if (v > 0 && v < 64)
            g_last_cap = (int)v;
    }
}

/* ------------------------------------------------------------------------- */
/* Init: the mount phase                                                      */
/* ------------------------------------------------------------------------- */

static int g_rootfd = -1;     /* the new root (overlay), O_PATH */
static const char *g_scratch; /* HOSTDIR of `scratch` */
static int g_scratch_kept;    /* `scratch HOSTDIR -`: the upper dir is kept as a layer */
static int g_upper_created;
static char g_root_path[PATH_MAX + 16]; /* HOSTDIR/root, the overlay mount point */

/* Resolve PATH inside the new root. Symlinks are followed but can never leave
 * the root; magic links (/proc/PID/fd/...) are refused. */
static int root_open(const char *path, int flags, uint64_t resolve)
{
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = (uint64_t)(unsigned)(flags | O_CLOEXEC);
    how.resolve = resolve;
    int fd;
    do
        fd = (int)syscall(SYS_openat2, g_rootfd, path, &how, sizeof how);
    while (fd < 0 && (errno == EINTR || errno == EAGAIN));
    return fd;
}

static int root_target(const char *path)
{
    return root_open(path, O_PATH, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS);
}

static const char *fdpath(char *buf, size_t cap, int fd)
{
    (void)snprintf(buf, cap, "/proc/self/fd/%d", fd);
    return buf;
}

/* Open the parent directory of PATH inside the root; *BASE gets the last
 * component. PATH is normalized (checked at parse time) and not "/". */
static int root_parent(const char *path, const char *stage, const char **base)
{
    char parent[PATH_MAX];
    const char *slash = strrchr(path, '/');
    size_t n = (size_t)(slash - path);
    if (n == 0)
        n = 1; /* parent of "/x" is "/" */
    memcpy(parent, path, n);
    parent[n] = '\0';
    *base = slash + 1;
    int fd = root_open(parent, O_PATH | O_DIRECTORY, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS);
    if (fd < 0)
        die(EXIT_SETUP, errno, stage, "parent directory of %s: %s", path, strerror(errno));
    return fd;
}

/* The statvfs flag of a nosymfollow mount (Linux 5.10; older C libraries lack the name):
 * kept by a bind-remount, which would otherwise clear it. */
#ifdef ST_NOSYMFOLLOW
#define SK_ST_NOSYMFOLLOW ST_NOSYMFOLLOW
#else
#define SK_ST_NOSYMFOLLOW 0x2000
#endif

/* Mount flags currently on the mount FD is on, kept across bind-remounts (in a
 * user namespace the kernel refuses to clear locked flags, and we never want
 * to weaken nosuid/nodev/noexec by omission). */
static unsigned long current_mount_flags(int fd)
{
    /* statvfs ST_* flag -> the mount flag it reports */
    static const struct {
        unsigned long st, ms;
    } map[] = {
        { ST_RDONLY, MS_RDONLY },     { ST_NOSUID, MS_NOSUID },
        { ST_NODEV, MS_NODEV },       { ST_NOEXEC, MS_NOEXEC },
        { ST_NOATIME, MS_NOATIME },   { ST_NODIRATIME, MS_NODIRATIME },
        { ST_RELATIME, MS_RELATIME }, { SK_ST_NOSYMFOLLOW, SK_MS_NOSYMFOLLOW },
    };
    struct statvfs sv;
    unsigned long fl = 0;
    if (fstatvfs(fd, &sv) < 0)
        return 0;
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (sv.f_flag & map[i].st)
            fl |= map[i].ms;
    return fl;
}

/* Bind-remount the mount now on top of PATH, adding FLAGS. The target is
 * opened again: the fd from before the mount refers to the covered directory. */
static void bind_remount(const char *path, unsigned long flags, const char *stage)
{
    char b[64];
    int fd = root_target(path);
    if (fd < 0)
        die(EXIT_SETUP, errno, stage, "reopen %s: %s", path, strerror(errno));
    unsigned long fl = current_mount_flags(fd) | flags;
    if (mount(NULL, fdpath(b, sizeof b, fd), NULL, MS_REMOUNT | MS_BIND | fl, NULL) < 0)
        die(EXIT_SETUP, errno, stage, "remount %s: %s", path, strerror(errno));
    close(fd);
}

static void do_scratch(struct rec *r)
{
    const char *dir = r->f[0];
    char path[PATH_MAX + 16];
    const char *stage = stagef("scratch %s", dir);
    if (strcmp(r->f[1], "-") != 0) {
        char data[96];
        (void)snprintf(data, sizeof data, "size=%s,nr_inodes=%s,mode=0700", r->f[1], r->f[2]);
        if (mount("tmpfs", dir, "tmpfs", MS_NOSUID | MS_NODEV, data) < 0)
            die(EXIT_SETUP, errno, stage, "tmpfs on %s: %s", dir, strerror(errno));
    }
    (void)snprintf(path, sizeof path, "%s/upper", dir);
    if (mkdir(path, 0755) == 0)
        g_upper_created = 1;
    else if (errno != EEXIST)
        die(EXIT_SETUP, errno, stage, "mkdir %s: %s", path, strerror(errno));
    (void)snprintf(path, sizeof path, "%s/work", dir);
    if (mkdir(path, 0700) < 0 && errno != EEXIST)
        die(EXIT_SETUP, errno, stage, "mkdir %s: %s", path, strerror(errno));
    g_scratch = dir;
    g_scratch_kept = strcmp(r->f[1], "-") == 0;
}

/* The overlay's lowerdir: each layer through the descriptor init opened for it with the
 * host's credentials (/proc/self/fd/N), or, when idmapped, attached under the scratch dir
 * first (overlay wants its layers in the caller's mount namespace). */
static void lowerdir_option(char *buf, size_t cap, const char *stage)
{
    size_t len = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < P.nlowers; i++) {
        char one[PATH_MAX + 32];
        if (P.lowermap_len) { /* relative to the scratch dir, the working directory */
            (void)snprintf(one, sizeof one, "l%zu", i);
            if (mkdir(one, 0700) < 0 && errno != EEXIST)
                die(EXIT_SETUP, errno, stage, "mkdir %s: %s", one, strerror(errno));
            if (syscall(SYS_move_mount, P.lower_fds[i], "", AT_FDCWD, one,
                        SK_MOVE_MOUNT_F_EMPTY_PATH) < 0)
                die(EXIT_SETUP, errno, stage, "attach idmapped layer %s: %s", P.lowers[i],
                    strerror(errno));
        } else {
            (void)snprintf(one, sizeof one, "/proc/self/fd/%d", P.lower_fds[i]);
        }
        int n = snprintf(buf + len, cap - len, "%s%s", i ? ":" : "", one);
        if (n < 0 || (size_t)n >= cap - len)
            die(EXIT_SETUP, E2BIG, stage, "too many layers for the overlay options");
        len += (size_t)n;
    }
}

/* shimdir/shimfile: make PATH (its parents too, as 0755 directories) in the shim layer,
 * HOSTDIR/shim, which becomes the top-most lower layer. A rootless container cannot create
 * anything in image directories owned by host root (unmapped: overlay cannot copy them up),
 * so what the runtime itself needs there (mount points, /etc files) is made here first,
 * owned by the container's root. */
static void do_shim(struct rec *r)
{
    const char *stage = stagef("%s %s", r->kw == K_SHIMDIR ? "shimdir" : "shimfile", r->f[0]);
    char path[PATH_MAX + 32];
    int n = snprintf(path, sizeof path, "%s/shim%s", g_scratch, r->f[0]);
    if (n < 0 || (size_t)n >= sizeof path)
        die(EXIT_SETUP, ENAMETOOLONG, stage, "path too long");
    size_t base = strlen(g_scratch); /* the '/' before "shim": the loop makes it too */
    for (char *c = path + base + 1; *c; c++) {
        if (*c != '/')
            continue;
        *c = '\0';
        if (mkdir(path, 0755) < 0 && errno != EEXIST)
            die(EXIT_SETUP, errno, stage, "mkdir %s: %s", path, strerror(errno));
        *c = '/';
    }
    if (r->kw == K_SHIMDIR) {
        if (mkdir(path, r->mode) < 0 && errno != EEXIST)
            die(EXIT_SETUP, errno, stage, "mkdir %s: %s", path, strerror(errno));
    } else {
        int fd = open(path, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, r->mode);
        if (fd < 0)
            die(EXIT_SETUP, errno, stage, "create %s: %s", path, strerror(errno));
        close(fd);
    }
    if (chmod(path, r->mode) < 0)
        die(EXIT_SETUP, errno, stage, "chmod %s: %s", path, strerror(errno));
}

static void do_rootfs(struct rec *r)
{
    (void)r;
    char lowers[3072];
    char upper[PATH_MAX + 16], work[PATH_MAX + 16], root[PATH_MAX + 16], data[4096];
    const char *stage = "rootfs";
    /* a comma would inject overlay options */
    if (strchr(g_scratch, ','))
        die(EXIT_SETUP, EINVAL, stage, "overlay paths must not contain ','");
    for (size_t i = 0; i < P.nlowers; i++)
        if (strchr(P.lowers[i], ','))
            die(EXIT_SETUP, EINVAL, stage, "overlay paths must not contain ','");
    /* The overlay's options are what /proc/self/mountinfo shows inside: name the scratch
     * dir's entries relative to it (overlay resolves them from the working directory), so
     * that no host path of the run dir appears there. */
    if (chdir(g_scratch) < 0)
        die(EXIT_SETUP, errno, stage, "chdir %s: %s", g_scratch, strerror(errno));
    if (P.nshim) {
        int n0 = snprintf(lowers, sizeof lowers, "shim:");
        if (n0 < 0 || (size_t)n0 >= sizeof lowers)
            die(EXIT_SETUP, E2BIG, stage, "scratch path too long");
        lowerdir_option(lowers + n0, sizeof lowers - (size_t)n0, stage);
    } else {
        lowerdir_option(lowers, sizeof lowers, stage);
    }
    (void)snprintf(upper, sizeof upper, "%s/upper", g_scratch);
    (void)snprintf(work, sizeof work, "%s/work", g_scratch);
    (void)snprintf(root, sizeof root, "%s/root", g_scratch);
    (void)snprintf(g_root_path, sizeof g_root_path, "%s", root);

    /* The merged root directory takes its attributes from the upper dir: give a
     * fresh upper dir the mode of the top-most image layer. Its owner stays
     * init's uid (root of the container): copying the layer's owner could hand
     * "/" to an unprivileged uid when the layer's owner is unmapped in a user
     * namespace (it then reads as the overflow uid, usually 65534). */
    if (g_upper_created && P.nlowers) {
        struct stat st;
        if (fstat(P.lower_fds[0], &st) == 0 && chmod(upper, st.st_mode & 07777) < 0)
            die(EXIT_SETUP, errno, stage, "set attributes of %s: %s", upper, strerror(errno));
    }
    if (mkdir(root, 0755) < 0 && errno != EEXIST)
        die(EXIT_SETUP, errno, stage, "mkdir %s: %s", root, strerror(errno));
    /* A kept upper dir becomes an image layer: it must hold plain files and whiteouts only,
     * none of the overlay features that store state in xattrs (whatever the host's module
     * defaults are). */
    /* (userxattr, below, rules out redirect_dir and metacopy by itself, and refuses
     * redirect_dir=off where the module's redirect_always_follow makes that "follow") */
    const char *plain = !g_scratch_kept ? ""
                        : P.ns_user     ? ",index=off"
                                        : ",index=off,metacopy=off,redirect_dir=off";
    /* In a user namespace overlay cannot use trusted.overlay.* xattrs: the layers carry
     * user.overlay.opaque as well, which userxattr reads. */
    const char *xattrs = P.ns_user ? ",userxattr" : "";
    int n = snprintf(data, sizeof data, "lowerdir=%s,upperdir=upper,workdir=work%s%s", lowers,
                     plain, xattrs);
    if (n < 0 || (size_t)n >= sizeof data)
        die(EXIT_SETUP, E2BIG, stage, "overlay options longer than %zu bytes", sizeof data - 1);
    /* nodev: device nodes shipped inside an image never work; /dev is built
     * from binds of a few host nodes. */
    if (mount("overlay", root, "overlay", MS_NODEV, data) < 0)
        die(EXIT_SETUP, errno, stage, "overlay on %s: %s", root, strerror(errno));
    if (chdir("/") < 0)
        die(EXIT_SETUP, errno, stage, "chdir /: %s", strerror(errno));
    for (size_t i = 0; i < P.nlowers; i++) { /* the overlay holds its own references */
        close(P.lower_fds[i]);
        P.lower_fds[i] = -1;
    }
    g_rootfd = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (g_rootfd < 0)
        die(EXIT_SETUP, errno, stage, "open %s: %s", root, strerror(errno));
}

static void do_realdir(struct rec *r)
{
    const char *path = r->f[0];
    const char *stage = stagef("realdir %s", path);
    struct stat st;
    int fd = root_open(path, O_PATH, RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS);
    if (fd < 0)
        die(EXIT_SETUP, errno, stage, "image path %s is not a real directory", path);
    if (fstat(fd, &st) < 0 || !S_ISDIR(st.st_mode))
        die(EXIT_SETUP, ENOTDIR, stage, "image path %s is not a real directory", path);
    close(fd);
}

static void do_mkdir(struct rec *r)
{
    const char *path = r->f[0];
    const char *stage = stagef("mkdir %s", path);
    char prefix[PATH_MAX];
    size_t len = strlen(path);
    if (len == 1)
        return; /* "/" exists */
    /* mkdir -p: walk prefixes "/a", "/a/b", ...; each is resolved from the root
     * (RESOLVE_IN_ROOT), created in its resolved parent when missing. */
    for (size_t i = 1; i <= len; i++) {
        if (i < len && path[i] != '/')
            continue;
        memcpy(prefix, path, i);
        prefix[i] = '\0';
        int fd = root_open(prefix, O_PATH | O_DIRECTORY, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS);
        if (fd >= 0) {
            close(fd);
            continue;
        }
        if (errno != ENOENT)
            die(EXIT_SETUP, errno, stage, "%s: %s", prefix, strerror(errno));
        const char *base;
        int pfd = root_parent(prefix, stage, &base);
        if (mkdirat(pfd, base, r->mode) < 0 && errno != EEXIST)
            die(EXIT_SETUP, errno, stage, "mkdir %s: %s", prefix, strerror(errno));
        close(pfd);
        fd = root_open(prefix, O_PATH | O_DIRECTORY, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS);
        if (fd < 0)
            die(EXIT_SETUP, errno, stage, "%s: %s", prefix, strerror(errno));
        close(fd);
    }
}

static void do_touch(struct rec *r)
{
    const char *path = r->f[0], *base;
    const char *stage = stagef("touch %s", path);
    int pfd = root_parent(path, stage, &base);
    int fd = openat(pfd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC,
                    r->mode);
    if (fd < 0 && errno != EEXIST)
        die(EXIT_SETUP, errno, stage, "create %s: %s", path, strerror(errno));
    if (fd >= 0)
        close(fd);
    close(pfd);
}

static void do_file(struct rec *r)
{
    const char *path = r->f[0], *base;
    const char *stage = stagef("file %s", path);
    struct stat st;
    int pfd = root_parent(path, stage, &base);
    /* never open an existing device/fifo/socket: only regular files are written */
    if (fstatat(pfd, base, &st, AT_SYMLINK_NOFOLLOW) == 0 && !S_ISREG(st.st_mode))
        die(EXIT_SETUP, EEXIST, stage, "%s exists and is not a regular file", path);
    int fd = openat(pfd, base, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC,
                    r->mode);
    if (fd < 0)
        die(EXIT_SETUP, errno, stage, "open %s: %s", path, strerror(errno));
    if (write_all(fd, r->f[2], r->len[2]) < 0 || fchmod(fd, r->mode) < 0 || close(fd) < 0)
        die(EXIT_SETUP, errno, stage, "write %s: %s", path, strerror(errno));
    close(pfd);
}

static void do_symlink(struct rec *r)
{
    const char *target = r->f[0], *path = r->f[1], *base;
    const char *stage = stagef("symlink %s", path);
    int pfd = root_parent(path, stage, &base);
    if (symlinkat(target, pfd, base) < 0) {
        char cur[PATH_MAX];
        int e = errno;
        ssize_t n = e == EEXIST ? readlinkat(pfd, base, cur, sizeof cur - 1) : -1;
        if (n < 0 || (size_t)n != strlen(target) || memcmp(cur, target, (size_t)n) != 0)
            die(EXIT_SETUP, e, stage, "create symlink %s: %s", path, strerror(e));
    }
    close(pfd);
}

static void do_mount(struct rec *r)
{
    const char *fstype = r->f[0], *source = r->f[1], *path = r->f[2], *data = r->f[4];
    const char *stage = stagef("mount %s", path);
    char b[64];
    int fd = root_target(path);
    if (fd < 0)
        die(EXIT_SETUP, errno, stage, "target %s: %s", path, strerror(errno));
    if (mount(source, fdpath(b, sizeof b, fd), fstype, r->mflags,
              strcmp(data, "-") == 0 ? NULL : data) < 0)
        die(EXIT_SETUP, errno, stage, "mount %s on %s: %s", fstype, path, strerror(errno));
    close(fd);
}

static void do_bind(struct rec *r)
{
    const char *src = r->f[0], *path = r->f[1];
    const char *stage = stagef("bind %s", path);
    char bs[64], bt[64];
    int tfd = root_target(path);
    if (tfd < 0)
        die(EXIT_SETUP, errno, stage, "target %s: %s", path, strerror(errno));
    if (r->tree_fd >= 0) {
        /* idmapped by the supervisor, flags included: attach it */
        if (syscall(SYS_move_mount, r->tree_fd, "", tfd, "",
                    SK_MOVE_MOUNT_F_EMPTY_PATH | SK_MOVE_MOUNT_T_EMPTY_PATH) < 0)
            die(EXIT_SETUP, errno, stage, "attach idmapped %s on %s: %s", src, path,
                strerror(errno));
        close(r->tree_fd);
        r->tree_fd = -1;
        close(tfd);
        return;
    }
    /* src_fd was opened by init with the host's credentials (before it became root of its
     * user namespace, which may not reach the source) */
    if (mount(fdpath(bs, sizeof bs, r->src_fd), fdpath(bt, sizeof bt, tfd), NULL,
              MS_BIND | (r->recursive ? MS_REC : 0), NULL) < 0)
        die(EXIT_SETUP, errno, stage, "bind %s on %s: %s", src, path, strerror(errno));
    close(r->src_fd);
    r->src_fd = -1;
    close(tfd);
    unsigned long extra = r->mflags & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC);
    if (extra)
        bind_remount(path, extra, stage);
}

static int g_devnull = -1;

/* share PATH: hand the directory now at PATH (the mount on top of it) to the owner, as an
 * O_PATH descriptor sent over --share-fd with PATH as the message. The owner reaches what
 * the container makes there (a kernel's sockets) through it, without any host path. */
static void do_share(struct rec *r)
{
    const char *path = r->f[0];
    const char *stage = stagef("share %s", path);
    struct stat st;
    int fd = root_target(path);
    if (fd < 0)
        die(EXIT_SETUP, errno, stage, "target %s: %s", path, strerror(errno));
    if (fstat(fd, &st) < 0 || !S_ISDIR(st.st_mode))
        die(EXIT_SETUP, ENOTDIR, stage, "%s is not a directory", path);
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    memset(&u, 0, sizeof u);
    struct iovec iov = { .iov_base = r->f[0], .iov_len = r->len[0] };
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf
    };
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    if (sendmsg(g_share_fd, &msg, MSG_NOSIGNAL) < 0)
        die(EXIT_SETUP, errno, stage, "send %s to the owner: %s", path, strerror(errno));
    close(fd);
}

static void do_mask(struct rec *r)
{
    const char *path = r->f[0];
    const char *stage = stagef("mask %s", path);
    char b[64];
    struct stat st;
    int fd = root_target(path);
    if (fd < 0) {
        if (errno == ENOENT)
            return;
        die(EXIT_SETUP, errno, stage, "target %s: %s", path, strerror(errno));
    }
    if (fstat(fd, &st) < 0)
        die(EXIT_SETUP, errno, stage, "stat %s: %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) {
        if (mount("tmpfs", fdpath(b, sizeof b, fd), "tmpfs",
                  MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555") < 0)
            die(EXIT_SETUP, errno, stage, "mask %s: %s", path, strerror(errno));
    } else {
        char bn[64];
        if (g_devnull < 0) {
            g_devnull = open("/dev/null", O_PATH | O_CLOEXEC);
            if (g_devnull < 0)
                die(EXIT_SETUP, errno, stage, "open host /dev/null: %s", strerror(errno));
        }
        fdpath(bn, sizeof bn, g_devnull);
        fdpath(b, sizeof b, fd);
        if (mount(bn, b, NULL, MS_BIND, NULL) < 0)
            die(EXIT_SETUP, errno, stage, "mask %s: %s", path, strerror(errno));
        /* not nodev: reads of a masked file must give EOF, not EACCES */
        bind_remount(path, MS_RDONLY | MS_NOSUID | MS_NOEXEC, stage);
    }
    close(fd);
}

static void do_readonly(struct rec *r)
{
    const char *path = r->f[0];
    const char *stage = stagef("readonly %s", path);
    char b[64];
    int fd = root_target(path);
    if (fd < 0) {
        if (errno == ENOENT)
            return;
        die(EXIT_SETUP, errno, stage, "target %s: %s", path, strerror(errno));
    }
    fdpath(b, sizeof b, fd);
    if (mount(b, b, NULL, MS_BIND | MS_REC, NULL) < 0)
        die(EXIT_SETUP, errno, stage, "bind %s onto itself: %s", path, strerror(errno));
    close(fd);
    if (strcmp(path, "/") == 0) {
        /* g_rootfd still names the covered overlay: lookups through it would
         * not see the new mount. Re-open the root by its host path, which
         * does end on the top-most mount. */
        int nfd = open(g_root_path, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (nfd < 0)
            die(EXIT_SETUP, errno, stage, "reopen root: %s", strerror(errno));
        close(g_rootfd);
        g_rootfd = nfd;
    }
    bind_remount(path, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, stage);
}

static void do_remount(struct rec *r)
{
    const char *path = r->f[0];
    const char *stage = stagef("remount %s", path);
    char b[64];
    int fd = root_target(path);
    if (fd < 0)
        die(EXIT_SETUP, errno, stage, "target %s: %s", path, strerror(errno));
    /* keep nosuid/nodev/noexec/atime flags the mount already has */
    unsigned long keep = current_mount_flags(fd) & ~(unsigned long)MS_RDONLY;
    if (mount(NULL, fdpath(b, sizeof b, fd), NULL, MS_REMOUNT | keep | r->mflags, NULL) < 0)
        die(EXIT_SETUP, errno, stage, "remount %s: %s", path, strerror(errno));
    close(fd);
}

static void do_pivot(void)
{
    /* pivot_root(".", ".") stacks the old root on top of the new one; the
     * detach then removes it, so no directory for the old root is needed. */
    /* Enter the root through its host path, not g_rootfd: a mount stacked on
     * the root itself (e.g. `readonly /`) must be the one we pivot into. */
    struct stat want, got;
    if (chdir(g_root_path) < 0)
        die(EXIT_SETUP, errno, "pivot", "chdir to new root: %s", strerror(errno));
    /* ...and it must still be the very directory opened by `rootfs` */
    if (fstat(g_rootfd, &want) < 0 || stat(".", &got) < 0 || want.st_dev != got.st_dev ||
        want.st_ino != got.st_ino)
        die(EXIT_SETUP, EXDEV, "pivot", "%s is no longer the new root", g_root_path);
    if (syscall(SYS_pivot_root, ".", ".") < 0)
        die(EXIT_SETUP, errno, "pivot", "pivot_root: %s", strerror(errno));
    if (umount2(".", MNT_DETACH) < 0)
        die(EXIT_SETUP, errno, "pivot", "detach old root: %s", strerror(errno));
    if (chdir("/") < 0)
        die(EXIT_SETUP, errno, "pivot", "chdir /: %s", strerror(errno));
}

static void mount_phase(void)
{
    for (size_t i = 0; i < P.nmounts; i++) {
        struct rec *r = &P.mounts[i];
        switch (r->kw) {
        case K_HOSTNAME:
            if (sethostname(r->f[0], r->len[0]) < 0)
                die(EXIT_SETUP, errno, "hostname", "sethostname: %s", strerror(errno));
            break;
        case K_SCRATCH: do_scratch(r); break;
        case K_SHIMDIR:
        case K_SHIMFILE: do_shim(r); break;
        case K_ROOTFS: do_rootfs(r); break;
        case K_REALDIR: do_realdir(r); break;
        case K_MKDIR: do_mkdir(r); break;
        case K_TOUCH: do_touch(r); break;
        case K_FILE: do_file(r); break;
        case K_SYMLINK: do_symlink(r); break;
        case K_MOUNT: do_mount(r); break;
        case K_BIND: do_bind(r); break;
        case K_MASK: do_mask(r); break;
        case K_READONLY: do_readonly(r); break;
        case K_REMOUNT: do_remount(r); break;
        case K_SHARE: do_share(r); break;
        case K_PIVOT: do_pivot(); break;
        default: break;
        }
    }
    if (g_rootfd >= 0)
        close(g_rootfd);
    if (g_devnull >= 0)
        close(g_devnull);
    g_rootfd = g_devnull = -1;
}

/* ------------------------------------------------------------------------- */
/* Main process: identity, capabilities, seccomp, exec                         */
/* ------------------------------------------------------------------------- */

static const char *env_path(void)
{
    const char *path = NULL;
    for (size_t i = 0; i < P.nenv; i++) /* the last PATH= wins, like a shell */
        if (strncmp(P.env[i], "PATH=", 5) == 0)
            path = P.env[i] + 5;
    return path ? path : DEFAULT_PATH;
}

__attribute__((noreturn)) static void exec_main(int report_fd)
{
    char *const *argv = P.argv;
    const char *a0 = argv[0];
    const char *stage = stagef("exec %s", a0);
    char line[64];
    int err = ENOENT;

    int n = snprintf(line, sizeof line, "T%lld\n", us_since_start());
    write_all(report_fd, line, (size_t)n);

    /* seccomp last: nothing of ours runs under the filter except execve */
    if (P.nfilter) {
        struct sock_fprog prog = { .len = P.nfilter, .filter = P.filter };
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) < 0)
            die(EXIT_SETUP, errno, "seccomp", "load filter: %s", strerror(errno));
    }

    if (a0[0] == '\0') {
        err = ENOENT;
    } else if (strchr(a0, '/')) {
        execve(a0, argv, P.env);
        err = errno;
    } else {
        const char *path = env_path();
        size_t alen = strlen(a0);
        int seen_eacces = 0;
        char buf[PATH_MAX];
        err = ENOENT;
        for (const char *p = path;;) {
            const char *e = strchr(p, ':');
            size_t dl = e ? (size_t)(e - p) : strlen(p);
            /* empty PATH elements (the current directory) are skipped */
            if (dl > 0 && dl + 1 + alen < sizeof buf) {
                /* NOLINTNEXTLINE(bugprone-not-null-terminated-result): "/" and A0's NUL follow */
                memcpy(buf, p, dl);
                buf[dl] = '/';
                memcpy(buf + dl + 1, a0, alen + 1);
                execve(buf, argv, P.env);
                if (errno == EACCES)
                    seen_eacces = 1;
                else if (errno != ENOENT && errno != ENOTDIR) {
                    err = errno;
                    break;
                }
            }
            if (!e)
                break;
            p = e + 1;
        }
        if (err == ENOENT && seen_eacces)
            err = EACCES;
    }
    if (err == ENOENT || err == ENOTDIR)
        die(EXIT_NOTFOUND, err, stage, "command not found: %s", a0);
    die(EXIT_NOEXEC, err, stage, "command not executable: %s: %s", a0, strerror(err));
}

__attribute__((noreturn)) static void main_process(int report_fd)
{
    char cwd[PATH_MAX];
    sigset_t none;

    g_role = ROLE_MAIN;
    g_report_fd = report_fd;

    /* fresh signal state: the supervisor ignored SIGPIPE and everything
     * forwarded was blocked; both would be inherited across execve */
    for (int s = 1; s < NSIG; s++)
        if (s != SIGKILL && s != SIGSTOP)
            (void)signal(s, SIG_DFL); /* fails only for the signals glibc reserves */
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);

    if (setsid() < 0)
        die(EXIT_SETUP, errno, "setsid", "setsid: %s", strerror(errno));

    const char *dir = P.cwd ? P.cwd : "/";
    if (chdir(dir) < 0)
        die(EXIT_SETUP, errno, "cwd", "chdir %s: %s", dir, strerror(errno));
    errno = 0;
    if (!getcwd(cwd, sizeof cwd) || cwd[0] != '/')
        die(EXIT_SETUP, errno ? errno : EXDEV, "cwd", "working directory %s is outside the root",
            dir);

    umask(P.has_umask ? P.umask : 022);

    for (size_t i = 0; i < P.nrlimits; i++)
        if (setrlimit(P.rlimits[i].resource, &P.rlimits[i].rl) < 0)
            die(EXIT_SETUP, errno, stagef("rlimit %s", P.rlimits[i].name), "setrlimit: %s",
                strerror(errno));

    /* Identity. KEEPCAPS lets the permitted set survive a switch away from
     * uid 0 so the capability steps below can still run; they end by
     * leaving only the kept list. */
    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0)
        die(EXIT_SETUP, errno, "user", "keepcaps: %s", strerror(errno));
    /* With setgroups denied (an unprivileged single-id map) the groups cannot change: the
     * process keeps the caller's, which the namespace shows as the overflow gid. */
    if (P.setgroups_denied && P.has_groups)
        die(EXIT_SETUP, EPERM, "groups", "supplementary groups need newgidmap (uidmap)");
    if (!P.setgroups_denied &&
        setgroups(P.has_groups ? P.ngroups : 0, P.has_groups ? P.groups : NULL) < 0)
        die(EXIT_SETUP, errno, "groups", "setgroups: %s", strerror(errno));
    if (P.has_user) {
        if (setresgid(P.gid, P.gid, P.gid) < 0)
            die(EXIT_SETUP, errno, "user", "setresgid %u: %s", P.gid, strerror(errno));
        if (setresuid(P.uid, P.uid, P.uid) < 0)
            die(EXIT_SETUP, errno, "user", "setresuid %u: %s", P.uid, strerror(errno));
    }

    /* Capabilities: bounding set first (needs CAP_SETPCAP effective, hence
     * re-raising the effective set after setresuid), ambient, then capset. */
    uint64_t prm = caps_permitted();
    uint64_t keep = P.caps;
    if (keep & ~prm)
        die(EXIT_SETUP, EPERM, "capabilities",
            "a kept capability is not available to the executor");
    if (caps_set(prm, prm, 0) < 0)
        die(EXIT_SETUP, errno, "capabilities", "capset: %s", strerror(errno));
    if (drop_bounding(keep) < 0)
        die(EXIT_SETUP, errno, "capabilities", "drop bounding set: %s", strerror(errno));
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
        die(EXIT_SETUP, errno, "capabilities", "clear ambient set: %s", strerror(errno));
    if (caps_set(keep, keep, keep) < 0)
        die(EXIT_SETUP, errno, "capabilities", "capset: %s", strerror(errno));
    for (int c = 0; c < 64; c++)
        if ((keep & (1ULL << c)) &&
            prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, (unsigned long)c, 0, 0) < 0)
            die(EXIT_SETUP, errno, "capabilities", "raise ambient %s: %s", cap_names[c],
                strerror(errno));
    if (prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0) < 0)
        die(EXIT_SETUP, errno, "capabilities", "keepcaps: %s", strerror(errno));

    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        die(EXIT_SETUP, errno, "nonewprivs", "PR_SET_NO_NEW_PRIVS: %s", strerror(errno));

    /* only 0, 1, 2 survive; the report pipe is O_CLOEXEC */
    close_fds_except(&report_fd, 1);

    exec_main(report_fd);
}

/* ------------------------------------------------------------------------- */
/* Init (PID 1)                                                               */
/* ------------------------------------------------------------------------- */

static void init_report(const char *line)
{
    write_all(g_report_fd, line, strlen(line));
}

/* Init, as root of the container's user namespace (and so with CAP_NET_ADMIN over its
 * network namespace), before the mounts: send each `netlink` request of the plan on a
 * NETLINK_ROUTE socket of the container's own network namespace and report the reply as
 * `netlink HEX` (the owner reads the ack and fails the start on an error). */
static void send_netlink(void)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < P.nnetlink; i++) {
        int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
        if (fd < 0)
            die(EXIT_SETUP, errno, "network", "netlink socket: %s", strerror(errno));
        int one = 1;
        (void)setsockopt(fd, SOL_NETLINK, NETLINK_CAP_ACK, &one, sizeof one);
        struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
        if (sendto(fd, P.netlink[i], P.netlink_len[i], 0, (struct sockaddr *)&kernel,
                   sizeof kernel) < 0)
            die(EXIT_SETUP, errno, "network", "netlink send: %s", strerror(errno));
        /* rtnetlink answers within sendto: the reply is queued already */
        unsigned char reply[2048];
        struct pollfd pfd = { .fd = fd, .events = POLLIN };
        ssize_t n = -1;
        if (poll(&pfd, 1, 5000) == 1)
            n = recv(fd, reply, sizeof reply, MSG_DONTWAIT);
        if (n <= 0)
            die(EXIT_SETUP, n < 0 ? errno : EPROTO, "network", "netlink reply: %s",
                n < 0 ? strerror(errno) : "none");
        close(fd);
        char line[16 + 2 * sizeof reply];
        size_t o = (size_t)snprintf(line, sizeof line, "netlink ");
        for (ssize_t k = 0; k < n; k++) {
            line[o++] = hex[reply[k] >> 4];
            line[o++] = hex[reply[k] & 15];
        }
        line[o++] = '\n';
        line[o] = '\0';
        init_report(line);
    }
}

/* Read a single byte from the supervisor; 0 on EOF/error. */
static char read_byte(int fd)
{
    char c;
    ssize_t n;
    do
        n = read(fd, &c, 1);
    while (n < 0 && errno == EINTR);
    if (n != 1)
        return 0;
    return c;
}

/* Die with the supervisor: arm PDEATHSIG, then check the supervisor still
 * holds its end of P2C (no POLLHUP). If it died before the prctl, the signal
 * would never come; if it dies after, the kernel sends it. */
static void arm_pdeathsig(int p2c_r)
{
    struct pollfd pf = { .fd = p2c_r, .events = POLLIN };
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
        _exit(EXIT_SETUP);
    if (poll(&pf, 1, 0) > 0 && (pf.revents & (POLLHUP | POLLERR)))
        _exit(EXIT_SETUP);
}

/* Drop everything but CAP_KILL (needed to kill(-1) processes of other uids). */
static void init_lockdown(void)
{
    uint64_t kcap = 1ULL << CAP_KILL;
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0 || drop_bounding(kcap) < 0 ||
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 ||
        caps_set(kcap, kcap, 0) < 0 || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
        /* cannot run the container with a privileged init: kill everything */
        int e = errno;
        kill(-1, SIGKILL);
        die(EXIT_SETUP, e, "init", "drop privileges: %s", strerror(e));
    }
}

/* Init, with the host's credentials: open every bind source and image layer (O_PATH). */
static void open_host_sources(void)
{
    for (size_t i = 0; i < P.nmounts; i++) {
        struct rec *r = &P.mounts[i];
        if (r->kw != K_BIND || r->tree_fd >= 0)
            continue;
        r->src_fd = open(r->f[0], O_PATH | O_CLOEXEC);
        if (r->src_fd < 0)
            die(EXIT_SETUP, errno, stagef("bind %s", r->f[1]), "source %s: %s", r->f[0],
                strerror(errno));
    }
    if (P.lowermap_len)
        return; /* the supervisor made idmapped trees of the layers */
    for (size_t i = 0; i < P.nlowers; i++) {
        P.lower_fds[i] = open(P.lowers[i], O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (P.lower_fds[i] < 0)
            die(EXIT_SETUP, errno, "rootfs", "layer %s: %s", P.lowers[i], strerror(errno));
    }
}

/* Init, root of its user namespace: nobody inside may create another one (as bubblewrap's
 * --disable-userns; the seccomp filter refuses the namespace flags too). The limit is per
 * user namespace, so the host's own is untouched. */
static void deny_nested_userns(void)
{
    int fd = open("/proc/sys/user/max_user_namespaces", O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write_all(fd, "0", 1) < 0)
        die(EXIT_SETUP, errno, "user namespace", "user.max_user_namespaces = 0: %s",
            strerror(errno));
    close(fd);
}

/* Init: close every fd but the two pipes and what the mount phase still uses. */
static void close_fds_except_sources(int p2c_r, int c2p_w)
{
    int *keep = calloc(P.nmounts + P.nlowers + 3, sizeof *keep);
    if (!keep)
        die(EXIT_SETUP, ENOMEM, "init", "out of memory");
    size_t n = 0;
    keep[n++] = p2c_r;
    keep[n++] = c2p_w;
    if (g_share_fd >= 0)
        keep[n++] = g_share_fd;
    for (size_t i = 0; i < P.nmounts; i++) {
        if (P.mounts[i].src_fd >= 0)
            keep[n++] = P.mounts[i].src_fd;
        if (P.mounts[i].tree_fd >= 0)
            keep[n++] = P.mounts[i].tree_fd;
    }
    for (size_t i = 0; i < P.nlowers; i++)
        if (P.lower_fds[i] >= 0)
            keep[n++] = P.lower_fds[i];
    close_fds_except(keep, (int)n);
    free(keep);
}

/* Init's /proc/1/cmdline, which everyone in the container reads: "sk-init" instead of the
 * executor's argv (its host path, the run dir's plan path). The argv strings are
 * overwritten in place; a non-NUL last byte makes the kernel stop at the first NUL. */
static void scrub_cmdline(void)
{
    static const char name[] = "sk-init";
    if (!g_args || g_args_len < sizeof name + 1)
        return;
    memset(g_args, 0, g_args_len);
    memcpy(g_args, name, sizeof name);
    g_args[g_args_len - 1] = ' ';
}

__attribute__((noreturn)) static void init_process(int p2c_r, int c2p_w)
{
    g_role = ROLE_INIT;
    g_report_fd = c2p_w;
    g_status_fd = -1;
    scrub_cmdline();

    /* The supervisor writes 'S' once the id maps exist. Then PDEATHSIG is
     * armed and the supervisor proven alive (see arm_pdeathsig). */
    if (read_byte(p2c_r) != 'S') /* EOF: the supervisor is already gone */
        _exit(EXIT_SETUP);
    arm_pdeathsig(p2c_r);

    /* Join the cgroups while our credentials are still the host's (in a user
     * namespace the mapped root could not write the host's cgroup.procs). */
    for (size_t i = 0; i < P.ncgroups; i++) {
        char path[PATH_MAX + 32];
        const char *stage = stagef("cgroup %s", P.cgroups[i]);
        (void)snprintf(path, sizeof path, "%s/cgroup.procs", P.cgroups[i]);
        int fd = open(path, O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write_all(fd, "0", 1) < 0)
            die(EXIT_SETUP, errno, stage, "join %s: %s", path, strerror(errno));
        close(fd);
    }

    /* Still with the host's credentials: open what the mount phase takes from the host
     * (bind sources, image layers). The namespace's root may not reach them: in root mode
     * it is an unprivileged host uid, rootless it may be a subordinate one. */
    open_host_sources();

    /* An unprivileged owner joins our namespaces to configure the network through
     * /proc/PID/ns, which it may do only while we still have its credentials: wait for its
     * `go` here, before becoming root of the user namespace (root callers configure the
     * network while the mounts go on, and `go` is awaited before the fork). */
    int early_go = P.sync_net && geteuid() != 0;
    if (early_go && read_byte(p2c_r) != 'G')
        _exit(EXIT_SETUP); /* supervisor gone; PDEATHSIG is on its way */

    /* In a new user namespace our credentials are still the host's (unmapped
     * there): become the namespace's root now that the maps exist (a single-id
     * map has no root: we keep our id, with the namespace's capabilities). A
     * credential change clears PDEATHSIG, so it is armed (and the supervisor
     * checked) once more. */
    if (P.ns_user) {
        if (P.gidmap_len && !P.setgroups_denied && setgroups(0, NULL) < 0)
            die(EXIT_SETUP, errno, "user namespace", "setgroups: %s", strerror(errno));
        if ((P.gid0_mapped && setresgid(0, 0, 0) < 0) || (P.uid0_mapped && setresuid(0, 0, 0) < 0))
            die(EXIT_SETUP, errno, "user namespace", "become root of the namespace: %s",
                strerror(errno));
        arm_pdeathsig(p2c_r);
        if (P.no_userns)
            deny_nested_userns();
    }

    send_netlink();

    /* nothing of the owner's fds is needed here, but what the mount phase uses */
    close_fds_except_sources(p2c_r, c2p_w);
    umask(0);        /* modes in the plan are exact */
    read_last_cap(); /* needs the host /proc: before pivot */

    /* Make every mount private before touching anything, so that nothing we
     * mount can ever propagate back to the host. */
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        die(EXIT_SETUP, errno, "scratch", "make mounts private: %s", strerror(errno));

    if (P.ns_cgroup && unshare(CLONE_NEWCGROUP) < 0)
        die(EXIT_SETUP, errno, "unshare cgroup", "unshare(CLONE_NEWCGROUP): %s", strerror(errno));

    mount_phase();
    if (g_share_fd >= 0) { /* every `share` was sent */
        close(g_share_fd);
        g_share_fd = -1;
    }

    if (P.sync_net && !early_go && read_byte(p2c_r) != 'G')
        _exit(EXIT_SETUP); /* supervisor gone; PDEATHSIG is on its way */

    int rep[2];
    if (pipe2(rep, O_CLOEXEC) < 0)
        die(EXIT_SETUP, errno, "fork", "pipe: %s", strerror(errno));
    pid_t main_pid = fork();
    if (main_pid < 0)
        die(EXIT_SETUP, errno, "fork", "fork: %s", strerror(errno));
    if (main_pid == 0) {
        close(rep[0]);
        close(p2c_r);
        close(c2p_w);
        main_process(rep[1]);
    }
    close(rep[1]);
    close(p2c_r);
    init_lockdown();

    /* Wait for the exec report: EOF after "T<us>" means the exec happened. */
    char rbuf[LINE_MAX_OUT];
    size_t rlen = 0;
    for (;;) {
        ssize_t n = read(rep[0], rbuf + rlen, sizeof rbuf - 1 - rlen);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        rlen += (size_t)n;
        if (rlen == sizeof rbuf - 1)
            break;
    }
    close(rep[0]);
    rbuf[rlen] = '\0';
    int setup_failed = 0;
    char *err = strstr(rbuf, "error ");
    if (err && (err == rbuf || err[-1] == '\n')) {
        char *e = strchr(err, '\n');
        if (e)
            e[1] = '\0';
        init_report(err);
        setup_failed = 1;
    } else if (rbuf[0] == 'T') {
        char line[64];
        (void)snprintf(line, sizeof line, "exec %lld\n", strtoll(rbuf + 1, NULL, 10));
        init_report(line);
    }
    /* init keeps no terminal or pipe of the owner open */
    close(0);
    close(1);
    close(2);

    /* Reap and forward until the main process ends. Everything is still
     * blocked (inherited from the supervisor), so signalfd sees it all. */
    sigset_t set;
    block_forwarded_signals(&set);
    int sfd = signalfd(-1, &set, SFD_CLOEXEC);
    int main_status = 0, main_done = 0;
    while (!main_done) {
        struct signalfd_siginfo si;
        ssize_t n = sfd >= 0 ? read(sfd, &si, sizeof si) : -1;
        if (n < 0 && errno == EINTR)
            continue;
        if (n != (ssize_t)sizeof si) {
            /* cannot happen; fall back to plain blocking reaping */
            int st;
            pid_t p = waitpid(-1, &st, 0);
            if (p == main_pid) {
                main_status = st;
                main_done = 1;
            }
            continue;
        }
        if (si.ssi_signo == SIGCHLD) {
            int st;
            pid_t p;
            while ((p = waitpid(-1, &st, WNOHANG)) > 0)
                if (p == main_pid) {
                    main_status = st;
                    main_done = 1;
                }
        } else {
            kill(main_pid, (int)si.ssi_signo);
        }
    }

    /* main is gone: nothing else may outlive it */
    kill(-1, SIGKILL);
    while (waitpid(-1, NULL, 0) > 0 || errno == EINTR)
        ;

    if (setup_failed)
        _exit(WIFEXITED(main_status) ? WEXITSTATUS(main_status) : EXIT_SETUP);
    char line[64];
    int code;
    if (WIFSIGNALED(main_status)) {
        (void)snprintf(line, sizeof line, "exit signal %d\n", WTERMSIG(main_status));
        code = 128 + WTERMSIG(main_status);
    } else {
        (void)snprintf(line, sizeof line, "exit code %d\n", WEXITSTATUS(main_status));
        code = WEXITSTATUS(main_status);
    }
    init_report(line);
    _exit(code);
}

/* ------------------------------------------------------------------------- */
/* Supervisor                                                                 */
/* ------------------------------------------------------------------------- */

static void write_map(pid_t pid, const char *file, const char *data, size_t len)
{
    char path[64];
    (void)snprintf(path, sizeof path, "/proc/%d/%s", (int)pid, file);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    /* the kernel wants the whole map in a single write */
    if (fd < 0 || write(fd, data, len) != (ssize_t)len)
        die(EXIT_SETUP, errno, file, "write %s: %s", path, strerror(errno));
    close(fd);
}

/* Run a setuid map helper (newuidmap/newgidmap): HELPER PID IN OUT COUNT... from MAP's
 * lines. The helper checks the lines against /etc/subuid or /etc/subgid. */
static void run_map_helper(const char *helper, pid_t pid, const char *map, const char *what)
{
    char buf[4096], pidtext[16], prog[PATH_MAX];
    char *argv[2 + 3 * 340 + 1];
    size_t n = 0;
    (void)snprintf(buf, sizeof buf, "%s", map);
    (void)snprintf(pidtext, sizeof pidtext, "%d", (int)pid);
    (void)snprintf(prog, sizeof prog, "%s", helper);
    argv[n++] = prog;
    argv[n++] = pidtext;
    for (char *save = NULL, *t = strtok_r(buf, " \n", &save);
         t && n < sizeof argv / sizeof *argv - 1; t = strtok_r(NULL, " \n", &save))
        argv[n++] = t;
    argv[n] = NULL;
    pid_t child = fork();
    if (child < 0)
        die(EXIT_SETUP, errno, what, "fork %s: %s", helper, strerror(errno));
    if (child == 0) {
        int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
        if (devnull >= 0)
            (void)dup2(devnull, 1); /* its complaints go to stderr, nothing to stdout */
        execv(helper, argv);
        _exit(127);
    }
    int st = 0;
    while (waitpid(child, &st, 0) < 0 && errno == EINTR)
        ;
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        die(EXIT_SETUP, EPERM, what,
            "%s refused the map (exit %d): check the subordinate range in /etc/sub%cid", helper,
            WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st), what[0] == 'u' ? 'u' : 'g');
}

/* Supervisor, after clone: give init's user namespace its maps. */
static void write_maps(pid_t pid)
{
    if (P.uid_helper) {
        run_map_helper(P.uid_helper, pid, P.uidmap, "uid_map");
        if (P.gidmap_len)
            run_map_helper(P.gid_helper, pid, P.gidmap, "gid_map");
        return;
    }
    if (P.setgroups_denied) /* the kernel's rule for an unprivileged gid_map */
        write_map(pid, "setgroups", "deny", 4);
    if (P.uidmap_len)
        write_map(pid, "uid_map", P.uidmap, P.uidmap_len);
    if (P.gidmap_len)
        write_map(pid, "gid_map", P.gidmap, P.gidmap_len);
}

/* Supervisor (root), before clone: a user namespace that has MAP as both its uid and gid
 * map, for idmapped mounts. A short-lived child creates it; its ns file is kept open. */
static int idmap_userns(const char *map, size_t len, const char *what)
{
    int ready[2], done[2];
    if (pipe2(ready, O_CLOEXEC) < 0 || pipe2(done, O_CLOEXEC) < 0)
        die(EXIT_SETUP, errno, what, "pipe: %s", strerror(errno));
    pid_t child = fork();
    if (child < 0)
        die(EXIT_SETUP, errno, what, "fork: %s", strerror(errno));
    if (child == 0) {
        close(ready[0]);
        close(done[1]);
        if (unshare(CLONE_NEWUSER) < 0)
            _exit(1);
        (void)write_all(ready[1], "u", 1);
        char c;
        while (read(done[0], &c, 1) < 0 && errno == EINTR) /* EOF: the parent is done */
            ;
        _exit(0);
    }
    close(ready[1]);
    close(done[0]);
    char c = 0;
    if (read(ready[0], &c, 1) != 1 || c != 'u')
        die(EXIT_SETUP, errno ? errno : EPERM, what, "a user namespace for idmapped mounts: %s",
            strerror(errno ? errno : EPERM));
    close(ready[0]);
    char path[64];
    (void)snprintf(path, sizeof path, "/proc/%d/ns/user", (int)child);
    write_map(child, "uid_map", map, len);
    write_map(child, "gid_map", map, len);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die(EXIT_SETUP, errno, what, "open %s: %s", path, strerror(errno));
    close(done[1]);
    while (waitpid(child, NULL, 0) < 0 && errno == EINTR)
        ;
    return fd;
}

/* Supervisor (root), before clone: an idmapped, detached clone of PATH (ATTR: the mount
 * flags to set too). Init attaches it in its mount namespace. */
static int idmapped_tree(const char *path, int userns, int recursive, uint64_t attr,
                         const char *stage)
{
    int fd = (int)syscall(SYS_open_tree, AT_FDCWD, path,
                          SK_OPEN_TREE_CLONE | O_CLOEXEC | (recursive ? AT_RECURSIVE : 0));
    if (fd < 0)
        die(EXIT_SETUP, errno, stage, "clone %s: %s", path, strerror(errno));
    struct sk_mount_attr ma = { .attr_set = SK_MOUNT_ATTR_IDMAP | attr,
                                .userns_fd = (uint64_t)userns };
    if (syscall(SYS_mount_setattr, fd, "", AT_EMPTY_PATH | (recursive ? AT_RECURSIVE : 0), &ma,
                sizeof ma) < 0)
        die(EXIT_SETUP, errno, stage,
            "idmap %s: %s (idmapped mounts need Linux >= 5.12 and a filesystem that has them)",
            path, strerror(errno));
    return fd;
}

/* --probe-idmap PATH (root): can PATH's filesystem be idmapped? Exit 0 when it can, 1 with
 * the reason on stderr when the filesystem refuses (the caller then keeps the owner's own id
 * in the map), 2 when PATH cannot be opened (nothing learnt about the filesystem). */
static int probe_idmap(const char *path)
{
    static const char map[] = "0 65534 1\n";
    int ns = idmap_userns(map, sizeof map - 1, "probe");
    int fd = (int)syscall(SYS_open_tree, AT_FDCWD, path, SK_OPEN_TREE_CLONE | O_CLOEXEC);
    if (fd < 0) {
        (void)fprintf(stderr, "sk-runtime: open_tree %s: %s\n", path, strerror(errno));
        close(ns);
        return 2;
    }
    struct sk_mount_attr ma = { .attr_set = SK_MOUNT_ATTR_IDMAP, .userns_fd = (uint64_t)ns };
    int rc = (int)syscall(SYS_mount_setattr, fd, "", AT_EMPTY_PATH, &ma, sizeof ma);
    int err = errno;
    close(fd);
    close(ns);
    if (rc < 0) {
        (void)fprintf(stderr, "sk-runtime: idmap %s: %s\n", path, strerror(err));
        return 1;
    }
    return 0;
}

/* Supervisor, before clone: the idmapped trees of the binds flagged idmap and of the image
 * layers (root mode: the container's ids are an unprivileged host range). */
static void prepare_idmapped_mounts(void)
{
    if (P.bindmap_len) {
        int ns = idmap_userns(P.bindmap, P.bindmap_len, "bindmap");
        for (size_t i = 0; i < P.nmounts; i++) {
            struct rec *r = &P.mounts[i];
            if (r->kw != K_BIND || !r->idmap)
                continue;
            uint64_t attr = 0;
            attr |= (r->mflags & MS_RDONLY) ? SK_MOUNT_ATTR_RDONLY : 0;
            attr |= (r->mflags & MS_NOSUID) ? SK_MOUNT_ATTR_NOSUID : 0;
            attr |= (r->mflags & MS_NODEV) ? SK_MOUNT_ATTR_NODEV : 0;
            attr |= (r->mflags & MS_NOEXEC) ? SK_MOUNT_ATTR_NOEXEC : 0;
            r->tree_fd = idmapped_tree(r->f[0], ns, r->recursive, attr, stagef("bind %s", r->f[1]));
        }
        close(ns);
    }
    if (P.lowermap_len) {
        int ns = idmap_userns(P.lowermap, P.lowermap_len, "lowermap");
        for (size_t i = 0; i < P.nlowers; i++)
            P.lower_fds[i] = idmapped_tree(P.lowers[i], ns, 0, SK_MOUNT_ATTR_RDONLY, "rootfs");
        close(ns);
    }
}

/* Relay one line from init. Returns the kind: 'x' exit, 'e' error, 'c' exec. */
static int relay_init_line(char *line, char *exit_line, size_t exit_cap)
{
    if (strncmp(line, "exit ", 5) == 0) {
        /* held back until init has been reaped */
        copy_line(exit_line, exit_cap, line);
        return 'x';
    }
    if (strncmp(line, "netlink ", 8) == 0) {
        char copy[LINE_MAX_OUT + 2];
        copy_line(copy, sizeof copy, line);
        status_line(copy);
        return 'n';
    }
    if (strncmp(line, "exec ", 5) == 0) {
        char out[96];
        copy_line(out, sizeof out, line);
        status_line(out);
        return 'c';
    }
    if (strncmp(line, "error ", 6) == 0) {
        char copy[LINE_MAX_OUT + 2];
        copy_line(copy, sizeof copy, line);
        status_line(copy);
        /* readable stderr line: decode STAGE and MESSAGE */
        char *stage = line + 6;
        char *sp1 = strchr(stage, ' ');
        char *sp2 = sp1 ? strchr(sp1 + 1, ' ') : NULL;
        if (sp1 && sp2) {
            *sp1 = '\0';
            *sp2 = '\0';
            char *msg = sp2 + 1;
            if (pct_decode(stage, strlen(stage)) >= 0 && pct_decode(msg, strlen(msg)) >= 0)
                print_stderr_error(stage, msg);
        }
        return 'e';
    }
    return 0;
}

static void usage(void)
{
    die(EXIT_SETUP, EINVAL, "usage",
        "usage: sk-runtime [--status-fd N] [--control-fd N] [--share-fd N] PLANFILE | "
        "--probe-idmap PATH");
}

static int parse_fd_arg(const char *s)
{
    uint64_t v;
    if (parse_u64(s, INT_MAX, &v) < 0)
        usage();
    if (fcntl((int)v, F_GETFD) < 0)
        die(EXIT_SETUP, errno, "usage", "fd %s is not open", s);
    return (int)v;
}

int main(int argc, char **argv)
{
    int control_fd = -1;
    const char *planfile = NULL;

    clock_gettime(CLOCK_MONOTONIC, &g_t0);
    if (argc > 0) { /* the kernel lays argv out contiguously */
        g_args = argv[0];
        g_args_len = (size_t)(argv[argc - 1] + strlen(argv[argc - 1]) + 1 - argv[0]);
    }
    /* a vanished status reader must not kill us: writes just fail */
    (void)signal(SIGPIPE, SIG_IGN);

    if (argc == 3 && strcmp(argv[1], "--probe-idmap") == 0)
        return probe_idmap(argv[2]);
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--status-fd") == 0 && i + 1 < argc) {
            g_status_fd = parse_fd_arg(argv[++i]);
        } else if (strcmp(argv[i], "--control-fd") == 0 && i + 1 < argc) {
            control_fd = parse_fd_arg(argv[++i]);
        } else if (strcmp(argv[i], "--share-fd") == 0 && i + 1 < argc) {
            g_share_fd = parse_fd_arg(argv[++i]);
        } else if (argv[i][0] == '-' || planfile) {
            usage();
        } else {
            planfile = argv[i];
        }
    }
    if (!planfile)
        usage();
    /* Neither fd may leak into the container (init closes every fd >= 3 as
     * well). 0-2 are left alone: they are the main process's stdio, and the
     * main process inherits the fd flags through fork. */
    if (g_status_fd > 2)
        fcntl(g_status_fd, F_SETFD, FD_CLOEXEC);
    if (control_fd > 2)
        fcntl(control_fd, F_SETFD, FD_CLOEXEC);
    if (g_share_fd > 2)
        fcntl(g_share_fd, F_SETFD, FD_CLOEXEC);

    parse_plan(planfile);
    g_lineno = 0;
    if (P.sync_net && control_fd < 0)
        die(EXIT_SETUP, EINVAL, "plan", "sync net needs --control-fd");

    /* Block the forwarded signals (and SIGCHLD) before cloning: init inherits
     * the mask, so nothing is lost between clone and its signalfd. */
    sigset_t set;
    block_forwarded_signals(&set);

    if (P.bindmap_len || P.lowermap_len)
        prepare_idmapped_mounts();

    int p2c[2], c2p[2];
    if (pipe2(p2c, O_CLOEXEC) < 0 || pipe2(c2p, O_CLOEXEC) < 0)
        die(EXIT_SETUP, errno, "clone", "pipe: %s", strerror(errno));

    /* A raw clone behaves like fork() here (no new stack): the child gets a
     * copy of our memory, including the parsed plan. */
    pid_t pid =
        (pid_t)syscall(SYS_clone, (unsigned long)P.clone_flags | SIGCHLD, NULL, NULL, NULL, 0);
    if (pid < 0)
        die(EXIT_SETUP, errno, "clone", "clone: %s", strerror(errno));
    if (pid == 0) {
        close(p2c[1]);
        close(c2p[0]);
        init_process(p2c[0], c2p[1]);
    }
    g_init_pid = pid;
    close(p2c[0]);
    close(c2p[1]);

    char line[LINE_MAX_OUT];
    (void)snprintf(line, sizeof line, "child %d\n", (int)pid);
    status_line(line);

    if (P.ns_user)
        write_maps(pid);
    if (write_all(p2c[1], "S", 1) < 0)
        die(EXIT_SETUP, errno, "clone", "start init: %s", strerror(errno));
    if (P.sync_net) {
        /* the namespaces exist now; init does the mounts while the owner
         * configures the network, and waits for `go` only before the fork */
        (void)snprintf(line, sizeof line, "netns %d\n", (int)pid);
        status_line(line);
    }

    int sfd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0)
        die(EXIT_SETUP, errno, "clone", "signalfd: %s", strerror(errno));

    char ibuf[LINE_MAX_OUT], cbuf[256], exit_line[96] = "";
    size_t ilen = 0, clen = 0;
    int init_reaped = 0, init_status = 0, c2p_open = 1, got_error = 0, go_sent = 0, cdiscard = 0;

    while (!init_reaped || c2p_open) {
        struct pollfd pfd[3];
        int np = 0, isig = -1, ic2p = -1, ictl = -1;
        if (!init_reaped) {
            pfd[np] = (struct pollfd){ .fd = sfd, .events = POLLIN };
            isig = np++;
        }
        if (c2p_open) {
            pfd[np] = (struct pollfd){ .fd = c2p[0], .events = POLLIN };
            ic2p = np++;
        }
        if (control_fd >= 0 && !init_reaped) {
            pfd[np] = (struct pollfd){ .fd = control_fd, .events = POLLIN };
            ictl = np++;
        }
        if (poll(pfd, (nfds_t)np, -1) < 0) {
            if (errno == EINTR)
                continue;
            die(EXIT_SETUP, errno, "supervise", "poll: %s", strerror(errno));
        }

        if (isig >= 0 && pfd[isig].revents) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) == (ssize_t)sizeof si) {
                if (si.ssi_signo == SIGCHLD) {
                    if (waitpid(pid, &init_status, WNOHANG) == pid)
                        init_reaped = 1;
                } else if (!init_reaped) {
                    kill(pid, (int)si.ssi_signo);
                }
            }
        }

        if (ic2p >= 0 && pfd[ic2p].revents) {
            ssize_t n = read(c2p[0], ibuf + ilen, sizeof ibuf - 1 - ilen);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                c2p_open = 0;
            } else {
                ilen += (size_t)n;
                char *nl;
                while ((nl = memchr(ibuf, '\n', ilen))) {
                    *nl = '\0';
                    if (relay_init_line(ibuf, exit_line, sizeof exit_line) == 'e')
                        got_error = 1;
                    size_t used = (size_t)(nl + 1 - ibuf);
                    memmove(ibuf, nl + 1, ilen - used);
                    ilen -= used;
                }
                if (ilen == sizeof ibuf - 1)
                    ilen = 0; /* oversized line from init: drop it */
            }
        }

        if (ictl >= 0 && pfd[ictl].revents) {
            ssize_t n = read(control_fd, cbuf + clen, sizeof cbuf - clen);
            if (n < 0 && (errno == EINTR || errno == EAGAIN))
                continue;
            if (n <= 0) {
                /* the owner is gone: take the whole container down */
                kill(pid, SIGKILL);
                while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
                    ;
                status_line("exit signal 9\n");
                exit(128 + SIGKILL);
            }
            clen += (size_t)n;
            char *nl;
            while ((nl = memchr(cbuf, '\n', clen))) {
                *nl = '\0';
                if (!cdiscard && strcmp(cbuf, "go") == 0 && P.sync_net && !go_sent) {
                    write_all(p2c[1], "G", 1);
                    go_sent = 1;
                }
                cdiscard = 0;
                size_t used = (size_t)(nl + 1 - cbuf);
                memmove(cbuf, nl + 1, clen - used);
                clen -= used;
            }
            if (clen == sizeof cbuf) {
                clen = 0; /* overlong line: ignore it up to its newline */
                cdiscard = 1;
            }
        }
    }

    if (exit_line[0]) {
        status_line(exit_line);
        int v = (int)strtol(exit_line + (exit_line[5] == 'c' ? 10 : 12), NULL, 10);
        exit(exit_line[5] == 'c' ? v : 128 + v);
    }
    if (got_error)
        exit(WIFEXITED(init_status) && WEXITSTATUS(init_status) ? WEXITSTATUS(init_status)
                                                                : EXIT_SETUP);
    /* init died without reporting */
    if (WIFSIGNALED(init_status)) {
        (void)snprintf(line, sizeof line, "exit signal %d\n", WTERMSIG(init_status));
        status_line(line);
        exit(128 + WTERMSIG(init_status));
    }
    (void)snprintf(line, sizeof line, "exit code %d\n", WEXITSTATUS(init_status));
    status_line(line);
    exit(WEXITSTATUS(init_status));
}
