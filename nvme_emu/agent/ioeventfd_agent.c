/*
 * ioeventfd_agent.c - an LD_PRELOAD agent that registers KVM ioeventfds inside QEMU.
 *
 * Why: KVM only accepts VM ioctls from the process that created the VM (kvm->mm), and
 * QEMU's vfio-user client never asks the server for GET_REGION_IO_FDS, so nvme-emu cannot
 * make doorbell writes complete in the kernel on its own. Loaded into an unmodified QEMU
 * with LD_PRELOAD, this agent
 *
 *   1. interposes ioctl() and remembers the fd returned by the first successful
 *      KVM_CREATE_VM (the VM fd); every call is passed through unchanged;
 *   2. if NVME_EMU_AGENT_SOCKET is set, then at that first KVM_CREATE_VM it starts
 *      listening on that path (a Unix SOCK_SEQPACKET socket, mode 0600) in one detached
 *      thread with all signals blocked,
 *      serves one peer at a time (same effective uid only), and registers / deregisters
 *      KVM ioeventfds (optionally with the proposed POST_WRITE flag) that the peer sends
 *      over SCM_RIGHTS.
 *
 * Without NVME_EMU_AGENT_SOCKET the agent only passes ioctls through. Any failure inside
 * the agent is logged to stderr ("nvme-emu agent: ...") and leaves the doorbells trapped;
 * it never terminates or otherwise disturbs QEMU. Listening only once a VM exists means
 * that the processes LD_PRELOAD also reaches (a wrapper chain of unshare/chroot/env before
 * QEMU, QEMU's helpers) never open the socket: only the VMM does, and the socket's
 * existence tells nvme-emu the VM is there.
 *
 * Protocol (little-endian, one message per datagram; the Python side is
 * vfio_user/ioeventfd_agent.py, which is the reference for the constants):
 *
 *   header  { u32 magic "NVDA" (0x4144564e); u16 version 1; u16 op; u32 count; u32 rsvd }
 *   HELLO 1 (count 0)                -> 0x81 { s32 status; u32 caps }
 *            caps: bit0 VM fd known, bit1 POST_WRITE (KVM_CAP 248 > 0), bit2 KVM_CAP_IOEVENTFD
 *   SET   2 { u64 bar_gpa; u64 bar_size } + count x record (40 bytes):
 *            { u64 offset; u32 size; u32 flags (bit0 DATAMATCH, bit1 POST_WRITE);
 *              u64 datamatch; s32 eventfd_index; s32 shadow_index (-1 none); u64 shadow_offset }
 *                                    -> 0x82 count=N { s32 status; N x s32 errno }
 *            replaces every earlier registration (a CLEAR first), then registers each
 *            valid record; an invalid record is refused with its errno, never the request.
 *   CLEAR 3 (count 0)                -> 0x83 { s32 status }
 *   a message whose header cannot be trusted (short, bad magic/version)
 *                                    -> 0x80 { s32 status }
 *   peer disconnect = CLEAR.
 *
 * Build: nvme_emu/agent/build.sh (gcc -O2 -fPIC -shared -pthread, libc + libdl only).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#define AGENT_API __attribute__((visibility("default")))
#define LOG_PREFIX "nvme-emu agent: "

/* ---- KVM ABI (declared here: the host's linux/kvm.h lacks post_addr) -------------- */
#define KVMIO_ 0xAEu
#define KVM_CREATE_VM_ 0xAE01u                  /* _IO(0xAE, 0x01) */
#define KVM_CHECK_EXTENSION_ 0xAE03u            /* _IO(0xAE, 0x03) */
#define KVM_IOEVENTFD_ 0x4040AE79u              /* _IOW(0xAE, 0x79, struct kvm_ioeventfd) */
#define KVM_CAP_IOEVENTFD_ 36
#define KVM_CAP_IOEVENTFD_POST_WRITE_ 248
#define KVM_IOEVENTFD_FLAG_DATAMATCH_ (1u << 0)
#define KVM_IOEVENTFD_FLAG_PIO_ (1u << 1)
#define KVM_IOEVENTFD_FLAG_DEASSIGN_ (1u << 2)
#define KVM_IOEVENTFD_FLAG_POST_WRITE_ (1u << 5)

struct agent_kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    uint32_t hole;        /* alignment before post_addr */
    uint64_t post_addr;   /* proposed POST_WRITE extension; padding upstream */
    uint8_t pad[24];
};
_Static_assert(sizeof(struct agent_kvm_ioeventfd) == 64, "kvm_ioeventfd is 64 bytes");
_Static_assert(__builtin_offsetof(struct agent_kvm_ioeventfd, post_addr) == 32, "post_addr at 32");

/* ---- wire protocol -------------------------------------------------------------- */
#define AGENT_MAGIC 0x4144564eu /* "NVDA" little-endian */
#define AGENT_VERSION 1
#define OP_HELLO 1
#define OP_SET 2
#define OP_CLEAR 3
#define OP_REPLY 0x80
#define MAX_RECORDS 256 /* one NVMe doorbell per SQ and CQ: 2 x (64 I/O queues + admin) = 130 */
#define MAX_FDS 253
#define REC_DATAMATCH (1u << 0)
#define REC_POST_WRITE (1u << 1)
#define REC_KNOWN_FLAGS (REC_DATAMATCH | REC_POST_WRITE)
#define CAP_VM_KNOWN (1u << 0)
#define CAP_POST_WRITE (1u << 1)
#define CAP_IOEVENTFD (1u << 2)

struct __attribute__((packed)) agent_header {
    uint32_t magic;
    uint16_t version;
    uint16_t op;
    uint32_t count;
    uint32_t reserved;
};
struct __attribute__((packed)) agent_set_body {
    uint64_t bar_gpa;
    uint64_t bar_size;
};
struct __attribute__((packed)) agent_record {
    uint64_t offset;
    uint32_t size;
    uint32_t flags;
    uint64_t datamatch;
    int32_t eventfd_index;
    int32_t shadow_index;
    uint64_t shadow_offset;
};
_Static_assert(sizeof(struct agent_header) == 16, "header is 16 bytes");
_Static_assert(sizeof(struct agent_set_body) == 16, "SET body is 16 bytes");
_Static_assert(sizeof(struct agent_record) == 40, "record is 40 bytes");

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the agent protocol is little-endian and so is this implementation"
#endif

/* ---- state ---------------------------------------------------------------------- */
typedef int (*ioctl_fn)(int, unsigned long, ...);
static ioctl_fn real_ioctl_ptr;
static int vm_fd = -1;                 /* written once with a CAS, read atomically */
static int vm_fd_logged;

struct shadow_map {
    dev_t dev;
    ino_t ino;
    int fd;          /* our dup */
    void *addr;
    size_t len;
    int users;
};

struct registration {
    struct agent_kvm_ioeventfd arg;    /* exactly what was assigned (fd = our dup) */
    int shadow;                        /* index into shadows[], -1 none */
};

static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;
static struct registration regs[MAX_RECORDS];
static int nregs;
static struct shadow_map shadows[MAX_RECORDS];
static int nshadows;
static int caps_cached = -1;           /* caps bits 1..2, once the VM fd is known */
static int listen_fd = -1;

/* ---- helpers -------------------------------------------------------------------- */
static void agent_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void agent_log(const char *fmt, ...)
{
    char line[512];
    int saved = errno;
    int n = snprintf(line, sizeof line, "%s", LOG_PREFIX);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        m = 0;
    size_t len = (size_t)n + (size_t)m;
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    line[len++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, len); /* one write per line: no interleaving */
    (void)w;
    errno = saved;
}

static ioctl_fn resolve_real_ioctl(void)
{
    ioctl_fn f = __atomic_load_n(&real_ioctl_ptr, __ATOMIC_ACQUIRE);
    if (f == NULL) {
        f = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
        if (f != NULL)
            __atomic_store_n(&real_ioctl_ptr, f, __ATOMIC_RELEASE);
    }
    return f;
}

/* The real ioctl, for the agent's own calls (not through the interposer). */
static int kvm_ioctl(int fd, unsigned long req, unsigned long arg)
{
    ioctl_fn f = resolve_real_ioctl();
    if (f != NULL)
        return f(fd, req, arg);
    return (int)syscall(SYS_ioctl, fd, req, arg);
}

static int current_vm_fd(void)
{
    return __atomic_load_n(&vm_fd, __ATOMIC_ACQUIRE);
}

static void start_listener(void);

/* ---- the interposer --------------------------------------------------------------- */
AGENT_API int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    va_start(ap, request);
    unsigned long arg = va_arg(ap, unsigned long);
    va_end(ap);

    ioctl_fn f = resolve_real_ioctl();
    int ret = f != NULL ? f(fd, request, arg) : (int)syscall(SYS_ioctl, fd, request, arg);

    if ((uint32_t)request == KVM_CREATE_VM_ && ret >= 0) {
        int expected = -1;
        int saved = errno;
        if (__atomic_compare_exchange_n(&vm_fd, &expected, ret, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE)) {
            if (!__atomic_exchange_n(&vm_fd_logged, 1, __ATOMIC_ACQ_REL))
                agent_log("VM fd %d", ret);
            start_listener();
        }
        errno = saved;
    }
    return ret;
}

/* ---- fd checks ---------------------------------------------------------------------- */
static int fd_is_eventfd(int fd)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
    int pfd = open(path, O_RDONLY | O_CLOEXEC);
    if (pfd < 0)
        return 0;
    char buf[1024];
    ssize_t n = read(pfd, buf, sizeof buf - 1);
    close(pfd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    return strstr(buf, "eventfd-count:") != NULL;
}

/* ---- capabilities --------------------------------------------------------------------- */
static uint32_t query_caps_locked(void)
{
    int vfd = current_vm_fd();
    if (vfd < 0)
        return 0;
    if (caps_cached < 0) {
        int c = 0;
        int r = kvm_ioctl(vfd, KVM_CHECK_EXTENSION_, KVM_CAP_IOEVENTFD_POST_WRITE_);
        if (r > 0)
            c |= CAP_POST_WRITE;
        r = kvm_ioctl(vfd, KVM_CHECK_EXTENSION_, KVM_CAP_IOEVENTFD_);
        if (r > 0)
            c |= CAP_IOEVENTFD;
        caps_cached = c;
    }
    return CAP_VM_KNOWN | (uint32_t)caps_cached;
}

/* ---- registrations -------------------------------------------------------------------- */
static void shadow_put_locked(int idx)
{
    if (idx < 0 || idx >= nshadows)
        return;
    struct shadow_map *s = &shadows[idx];
    if (--s->users > 0)
        return;
    if (s->addr != NULL && s->addr != MAP_FAILED)
        munmap(s->addr, s->len);
    if (s->fd >= 0)
        close(s->fd);
    s->addr = NULL;
    s->fd = -1;
    s->users = 0;
}

/* Deassign everything; returns the number of deassign failures. */
static int clear_locked(int *cleared_out)
{
    int vfd = current_vm_fd();
    int failures = 0;
    for (int i = 0; i < nregs; i++) {
        struct agent_kvm_ioeventfd a = regs[i].arg;
        a.flags |= KVM_IOEVENTFD_FLAG_DEASSIGN_;
        if (vfd < 0 || kvm_ioctl(vfd, KVM_IOEVENTFD_, (unsigned long)&a) < 0) {
            failures++;
            agent_log("deassign %#llx/%u failed: %s", (unsigned long long)a.addr, a.len,
                      strerror(errno));
        }
        close(regs[i].arg.fd);
        shadow_put_locked(regs[i].shadow);
    }
    if (cleared_out)
        *cleared_out = nregs;
    nregs = 0;
    for (int i = 0; i < nshadows; i++) /* all released by now; be defensive */
        if (shadows[i].users > 0) {
            shadows[i].users = 1;
            shadow_put_locked(i);
        }
    nshadows = 0;
    return failures;
}

/* Find or create the mapping of the file behind received fd `fd` (already validated). */
static int shadow_get_locked(int fd, const struct stat *st, int *err)
{
    for (int i = 0; i < nshadows; i++)
        if (shadows[i].users > 0 && shadows[i].dev == st->st_dev && shadows[i].ino == st->st_ino
            && shadows[i].len == (size_t)st->st_size) {
            shadows[i].users++;
            return i;
        }
    if (nshadows >= MAX_RECORDS) {
        *err = ENOSPC;
        return -1;
    }
    int dup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (dup_fd < 0) {
        *err = errno;
        return -1;
    }
    /* MAP_POPULATE: KVM's POST_WRITE store runs in the vCPU's MMIO exit path; with the
     * page mapped up front it never takes a page fault there (latency, and stack depth on
     * an already deep kernel path). */
    void *addr = mmap(NULL, (size_t)st->st_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, dup_fd, 0);
    if (addr == MAP_FAILED) {
        *err = errno;
        close(dup_fd);
        return -1;
    }
    struct shadow_map *s = &shadows[nshadows];
    s->dev = st->st_dev;
    s->ino = st->st_ino;
    s->fd = dup_fd;
    s->addr = addr;
    s->len = (size_t)st->st_size;
    s->users = 1;
    return nshadows++;
}

/* Register one record; returns 0 or a positive errno. */
static int register_one_locked(int vfd, uint64_t bar_gpa, uint64_t bar_size,
                               const struct agent_record *r, const int *fds, int nfds,
                               int post_write_ok, int *used_post_write)
{
    if (r->size != 1 && r->size != 2 && r->size != 4 && r->size != 8)
        return EINVAL;
    if (r->flags & ~REC_KNOWN_FLAGS)
        return EINVAL;
    if (r->offset > bar_size || r->size > bar_size - r->offset)
        return EINVAL;
    if (bar_gpa + r->offset < bar_gpa) /* wraps */
        return EINVAL;
    if (r->eventfd_index < 0 || r->eventfd_index >= nfds)
        return EBADF;
    int efd = fds[r->eventfd_index];
    if (!fd_is_eventfd(efd))
        return EBADF;

    int post_write = (r->flags & REC_POST_WRITE) != 0;
    struct stat st;
    if (post_write) {
        if (r->shadow_index < 0 || r->shadow_index >= nfds)
            return r->shadow_index == -1 ? EINVAL : EBADF;
        int sfd = fds[r->shadow_index];
        if (fstat(sfd, &st) < 0)
            return EBADF;
        if (!S_ISREG(st.st_mode) || st.st_size <= 0)
            return EINVAL;
        if (r->shadow_offset % r->size != 0)
            return EINVAL;
        if (r->shadow_offset > (uint64_t)st.st_size || r->size > (uint64_t)st.st_size - r->shadow_offset)
            return EINVAL;
        if (!post_write_ok)
            return ENOTSUP;
    } else if (r->shadow_index != -1) {
        return EINVAL; /* a shadow only makes sense with POST_WRITE */
    }
    if (nregs >= MAX_RECORDS)
        return ENOSPC;

    struct registration *reg = &regs[nregs];
    memset(reg, 0, sizeof *reg);
    reg->shadow = -1;
    int dup_efd = fcntl(efd, F_DUPFD_CLOEXEC, 3);
    if (dup_efd < 0)
        return errno;
    struct agent_kvm_ioeventfd *a = &reg->arg;
    a->addr = bar_gpa + r->offset;
    a->len = r->size;
    a->fd = dup_efd;
    if (r->flags & REC_DATAMATCH) {
        a->flags |= KVM_IOEVENTFD_FLAG_DATAMATCH_;
        a->datamatch = r->datamatch;
    }
    if (post_write) {
        int err = 0;
        int si = shadow_get_locked(fds[r->shadow_index], &st, &err);
        if (si < 0) {
            close(dup_efd);
            return err;
        }
        reg->shadow = si;
        a->flags |= KVM_IOEVENTFD_FLAG_POST_WRITE_;
        a->post_addr = (uint64_t)(uintptr_t)shadows[si].addr + r->shadow_offset;
    }
    if (kvm_ioctl(vfd, KVM_IOEVENTFD_, (unsigned long)a) < 0) {
        int err = errno;
        close(dup_efd);
        shadow_put_locked(reg->shadow);
        return err;
    }
    if (post_write)
        *used_post_write = 1;
    nregs++;
    return 0;
}

/* ---- message handling -------------------------------------------------------------- */
static void send_reply(int conn, uint16_t op, uint32_t count, const void *body, size_t len)
{
    unsigned char buf[sizeof(struct agent_header) + sizeof(int32_t) * (1 + MAX_RECORDS) + 8];
    struct agent_header h = {AGENT_MAGIC, AGENT_VERSION, op, count, 0};
    if (len > sizeof buf - sizeof h)
        len = sizeof buf - sizeof h;
    memcpy(buf, &h, sizeof h);
    if (len)
        memcpy(buf + sizeof h, body, len);
    if (send(conn, buf, sizeof h + len, MSG_NOSIGNAL) < 0)
        agent_log("reply op %#x failed: %s", op, strerror(errno));
}

static void reply_status(int conn, uint16_t op, int32_t status)
{
    send_reply(conn, op, 0, &status, sizeof status);
}

static void handle_hello(int conn, const struct agent_header *h)
{
    struct {
        int32_t status;
        uint32_t caps;
    } __attribute__((packed)) body = {0, 0};
    pthread_mutex_lock(&state_lock);
    body.caps = query_caps_locked();
    pthread_mutex_unlock(&state_lock);
    if (h->count != 0)
        body.status = EINVAL;
    send_reply(conn, OP_REPLY | OP_HELLO, 0, &body, sizeof body);
}

static void handle_clear(int conn, const struct agent_header *h, size_t len)
{
    if (h->count != 0 || len != sizeof *h) {
        reply_status(conn, OP_REPLY | OP_CLEAR, EINVAL);
        return;
    }
    int cleared = 0;
    pthread_mutex_lock(&state_lock);
    int failures = clear_locked(&cleared);
    pthread_mutex_unlock(&state_lock);
    agent_log("CLEAR: %d deregistered, %d failed", cleared - failures, failures);
    reply_status(conn, OP_REPLY | OP_CLEAR, failures ? EIO : 0);
}

/* Close the fds a message brought; registrations hold their own dups. Done before the
 * reply, so a peer that got its answer sees this process's fd table settled. */
static void release_fds(int *fds, int *nfds)
{
    for (int i = 0; i < *nfds; i++)
        close(fds[i]);
    *nfds = 0;
}

static void handle_set(int conn, const struct agent_header *h, const unsigned char *msg,
                       size_t len, int *fds, int *nfds)
{
    int32_t out[1 + MAX_RECORDS];
    if (h->count > MAX_RECORDS
        || len != sizeof *h + sizeof(struct agent_set_body) + (size_t)h->count * sizeof(struct agent_record)) {
        agent_log("SET refused: bad size (count %u, %zu bytes)", h->count, len);
        release_fds(fds, nfds);
        reply_status(conn, OP_REPLY | OP_SET, EINVAL);
        return;
    }
    struct agent_set_body b;
    memcpy(&b, msg + sizeof *h, sizeof b);
    pthread_mutex_lock(&state_lock);
    int vfd = current_vm_fd();
    if (vfd < 0) {
        pthread_mutex_unlock(&state_lock);
        agent_log("SET refused: VM fd not known yet");
        release_fds(fds, nfds);
        reply_status(conn, OP_REPLY | OP_SET, ENODEV);
        return;
    }
    if (b.bar_size == 0 || b.bar_gpa + b.bar_size < b.bar_gpa) {
        pthread_mutex_unlock(&state_lock);
        agent_log("SET refused: bad BAR %#llx+%#llx", (unsigned long long)b.bar_gpa,
                  (unsigned long long)b.bar_size);
        release_fds(fds, nfds);
        reply_status(conn, OP_REPLY | OP_SET, EINVAL);
        return;
    }
    uint32_t caps = query_caps_locked();
    int cleared = 0;
    int clear_failures = clear_locked(&cleared);
    int ok = 0, refused = 0, used_pw = 0;
    out[0] = 0;
    for (uint32_t i = 0; i < h->count; i++) {
        struct agent_record r;
        memcpy(&r, msg + sizeof *h + sizeof b + i * sizeof r, sizeof r);
        int err = register_one_locked(vfd, b.bar_gpa, b.bar_size, &r, fds, *nfds,
                                      (caps & CAP_POST_WRITE) != 0, &used_pw);
        out[1 + i] = err;
        if (err) {
            refused++;
            agent_log("SET record %u (%#llx+%#llx/%u flags %#x) refused: %s", i,
                      (unsigned long long)b.bar_gpa, (unsigned long long)r.offset, r.size, r.flags,
                      strerror(err));
        } else {
            ok++;
        }
    }
    pthread_mutex_unlock(&state_lock);
    agent_log("SET bar %#llx+%#llx: %d registered, %d refused, POST_WRITE %s (replaced %d%s)",
              (unsigned long long)b.bar_gpa, (unsigned long long)b.bar_size, ok, refused,
              used_pw ? "used" : "not used", cleared, clear_failures ? ", some deassigns failed" : "");
    release_fds(fds, nfds);
    send_reply(conn, OP_REPLY | OP_SET, h->count, out, sizeof(int32_t) * (1 + h->count));
}

static void handle_message(int conn, const unsigned char *msg, size_t len, int *fds, int *nfds,
                           int truncated)
{
    struct agent_header h;
    memset(&h, 0, sizeof h);
    if (len >= sizeof h)
        memcpy(&h, msg, sizeof h);
    if (len < sizeof h || truncated || h.op != OP_SET)
        release_fds(fds, nfds); /* only a SET uses fds */
    if (len < sizeof h) {
        agent_log("short message (%zu bytes)", len);
        reply_status(conn, OP_REPLY, EINVAL);
        return;
    }
    memcpy(&h, msg, sizeof h);
    if (h.magic != AGENT_MAGIC || h.version != AGENT_VERSION) {
        agent_log("bad header (magic %#x version %u)", h.magic, h.version);
        reply_status(conn, OP_REPLY, EINVAL);
        return;
    }
    if (truncated) {
        agent_log("message op %u truncated", h.op);
        reply_status(conn, (uint16_t)(OP_REPLY | (h.op & 0x7f)), EINVAL);
        return;
    }
    switch (h.op) {
    case OP_HELLO:
        handle_hello(conn, &h);
        break;
    case OP_SET:
        handle_set(conn, &h, msg, len, fds, nfds);
        break;
    case OP_CLEAR:
        handle_clear(conn, &h, len);
        break;
    default:
        agent_log("unknown op %u", h.op);
        reply_status(conn, (uint16_t)(OP_REPLY | (h.op & 0x7f)), EOPNOTSUPP);
        break;
    }
}

/* recvmsg() returns 0 both for an empty datagram and at EOF: tell them apart. */
static int peer_hung_up(int conn)
{
    struct pollfd p = {conn, POLLIN | POLLRDHUP, 0};
    if (poll(&p, 1, 0) < 0)
        return 1;
    return (p.revents & (POLLHUP | POLLRDHUP | POLLERR)) != 0;
}

/* Serve one connected peer until it disconnects. */
static void serve_peer(int conn)
{
    /* Max message: header + SET body + 64 records; anything longer is refused (MSG_TRUNC). */
    static unsigned char msg[sizeof(struct agent_header) + sizeof(struct agent_set_body)
                             + MAX_RECORDS * sizeof(struct agent_record) + 64];
    static union {
        struct cmsghdr align;
        unsigned char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    } ctl;
    for (;;) {
        struct iovec iov = {msg, sizeof msg};
        struct msghdr mh;
        memset(&mh, 0, sizeof mh);
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        mh.msg_control = ctl.buf;
        mh.msg_controllen = sizeof ctl.buf;
        ssize_t n = recvmsg(conn, &mh, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            agent_log("recvmsg: %s", strerror(errno));
            break;
        }
        if (n == 0 && peer_hung_up(conn))
            break; /* orderly disconnect (else: an empty datagram, answered as malformed) */
        int fds[MAX_FDS];
        int nfds = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c != NULL; c = CMSG_NXTHDR(&mh, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            const unsigned char *p = CMSG_DATA(c);
            for (size_t j = 0; j < k; j++) {
                int fd;
                memcpy(&fd, p + j * sizeof(int), sizeof fd);
                if (nfds < MAX_FDS)
                    fds[nfds++] = fd;
                else
                    close(fd);
            }
        }
        int truncated = (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0;
        handle_message(conn, msg, (size_t)n, fds, &nfds, truncated);
        release_fds(fds, &nfds); /* whatever a handler did not release already */
    }
}

static void *agent_thread(void *unused)
{
    (void)unused;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    for (;;) {
        int conn = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE
                || errno == ENOBUFS || errno == ENOMEM) {
                if (errno != EINTR && errno != ECONNABORTED)
                    usleep(100000);
                continue;
            }
            agent_log("accept: %s; agent stopped (doorbells stay trapped)", strerror(errno));
            return NULL;
        }
        struct ucred cred;
        socklen_t cl = sizeof cred;
        if (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &cl) < 0) {
            agent_log("SO_PEERCRED: %s; connection refused", strerror(errno));
            close(conn);
            continue;
        }
        if (cred.uid != geteuid()) {
            agent_log("refused peer pid %d uid %u", (int)cred.pid, (unsigned)cred.uid);
            close(conn);
            continue;
        }
        agent_log("peer pid %d connected", (int)cred.pid);
        serve_peer(conn);
        close(conn);
        int cleared = 0;
        pthread_mutex_lock(&state_lock);
        int failures = clear_locked(&cleared);
        pthread_mutex_unlock(&state_lock);
        agent_log("peer pid %d disconnected: CLEAR, %d deregistered, %d failed", (int)cred.pid,
                  cleared - failures, failures);
    }
    return NULL;
}

/* The listener is bound under socket_path + SIDE_SUFFIX, then renamed to socket_path. */
#define SIDE_SUFFIX ".new"
static char socket_path[sizeof(((struct sockaddr_un *)0)->sun_path)];

__attribute__((constructor)) static void agent_init(void)
{
    resolve_real_ioctl();
    /* Read once here, while the process is single-threaded; used at KVM_CREATE_VM. */
    const char *env = getenv("NVME_EMU_AGENT_SOCKET");
    if (env == NULL || env[0] == '\0')
        return;
    if (strlen(env) >= sizeof socket_path) {
        agent_log("socket path too long: %s; agent disabled", env);
        return;
    }
    strcpy(socket_path, env);
}

/* Called once, by the thread whose KVM_CREATE_VM succeeded first. */
static void start_listener(void)
{
    if (socket_path[0] == '\0')
        return;
    /* Bind, chmod and listen under a side name, then rename it into place: the final path
     * appears only once it accepts connections and is already 0600, because nvme-emu takes
     * the path's existence to mean "connect now" (a bind-then-listen window there gave a
     * CI run ECONNREFUSED). rename() keeps the inode, which is what a Unix socket is bound to. */
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (snprintf(sa.sun_path, sizeof sa.sun_path, "%s%s", socket_path, SIDE_SUFFIX)
        >= (int)sizeof sa.sun_path) {
        agent_log("socket path too long: %s; agent disabled", socket_path);
        return;
    }

    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        agent_log("socket: %s; agent disabled", strerror(errno));
        return;
    }
    struct stat st;
    if (lstat(socket_path, &st) == 0 && S_ISSOCK(st.st_mode))
        unlink(socket_path); /* stale socket from an earlier run */
    if (lstat(sa.sun_path, &st) == 0 && S_ISSOCK(st.st_mode))
        unlink(sa.sun_path);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        agent_log("bind %s: %s; agent disabled", sa.sun_path, strerror(errno));
        close(fd);
        return;
    }
    if (chmod(sa.sun_path, 0600) < 0 || listen(fd, 4) < 0 || rename(sa.sun_path, socket_path) < 0) {
        agent_log("chmod/listen/rename %s: %s; agent disabled", sa.sun_path, strerror(errno));
        close(fd);
        unlink(sa.sun_path);
        return;
    }
    strcpy(sa.sun_path, socket_path);
    listen_fd = fd;

    pthread_attr_t attr;
    pthread_t tid;
    sigset_t all, old;
    sigfillset(&all);
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    /* Start the thread with every signal blocked (no window before it masks itself). */
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int err = pthread_create(&tid, &attr, agent_thread, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (err != 0) {
        agent_log("pthread_create: %s; agent disabled", strerror(err));
        close(fd);
        unlink(sa.sun_path);
        listen_fd = -1;
        return;
    }
    agent_log("listening on %s (pid %d)", sa.sun_path, (int)getpid());
}
