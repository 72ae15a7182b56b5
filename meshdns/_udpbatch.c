/* meshdns._udpbatch: the compiled UDP packet path (used by meshdns/packets.py).

   One Reader per UDP socket. read() takes up to `batch` datagrams with one recvmmsg(2). Each
   datagram whose cache entry is a plain hit is answered here exactly as
   server.UdpProtocol.datagram_received answers it: the entry (a cache.Cached) must have
   `pending is None` and `turn - start < rebuild_after`; its `turn` advances by one and the reply
   is `replies[turn % len(replies)]` with the query's 2-byte ID in front. Every other datagram
   (a miss, an entry Python must handle, every `sample_every`-th datagram) is handed to Python
   as (data, address, kind), one at a time and in arrival order: the next datagram is looked at
   only once Python has passed back its reply with next(reply), so the cache and the answer
   orders change exactly as they would on the pure-Python path.

   Replies (the hits' and Python's) are queued and leave together with one sendmmsg(2) when the
   batch is done, or sooner once the first of them has waited FLUSH_WAIT_NS while Python made
   others. A reply the kernel refuses for itself (EMSGSIZE, a route, a firewall) is
   dropped and counted, as the pure path's error_received ignores it; when the socket's send
   buffer is full (EAGAIN) the queue is kept, `blocked` turns true and the caller waits for the
   socket to be writable and calls flush(): nothing already answered is lost, and no datagram
   is read while replies wait. The file descriptor stays the caller's (a Python socket).

   With plain(responder), a miss is first tried here as responder.respond_uncached would answer
   it through fastpath.PlainPath.respond, for its commonest case only: `<name>.service.<domain>`
   A or AAAA, the whole packet a bare question (and at most an OPT without options), the
   service's healthy local instances one, with an address of that family, and one TTL for every
   service (PlainPath.fixed_heads). The reply is the same bytes, the same cache entry and the
   same query count PlainPath makes (the entry is made here as cache.ResponseCache.store makes
   it when it is a new key with room for it; else store is called); anything else (or any
   doubt: an attribute of an unexpected type, an error) goes to Python as before, which then
   decides the same way it always did. The responder's serving, snapshot and udp_plain are read on every miss, and
   what PlainPath holds (and the udp_cache, never replaced) again whenever udp_plain is a new
   one, so a snapshot swap or a reconfigure is seen at the next packet. store() itself keeps
   nothing while the cache is disabled, as on Python's path. */

#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

/* The largest UDP payload (65,507 bytes over IPv4, 65,527 over IPv6) fits whole: a datagram is
   never cut here where the pure path would read it complete. Pages the kernel does not write
   are never touched, so a slot costs a page of memory, not 64 KiB. */
#define SLOT_BYTES 65536
#define MAX_BATCH 1024 /* UIO_MAXIOV: the most messages one recvmmsg/sendmmsg takes */
/* The longest a queued reply waits for the rest of its batch, checked after each reply Python
   makes (a miss costs ~10 us: 64 of them would hold the first reply ~0.6 ms, a general-path
   SRV miss more). Sending a batch's replies together saves ~0.6 us per miss (measured in
   process: 10.5 vs 11.1 us per cold miss); a flush every ~20 misses keeps most of that. */
#define FLUSH_WAIT_NS 200000LL

enum { KIND_MISS = 0, KIND_OTHER = 1, KIND_SAMPLED = 2 };

typedef struct {
    PyObject *reply; /* held until sent or dropped */
    int with_id;     /* a cached reply: `id` goes in front of it */
    unsigned char id[2];
    socklen_t addrlen;
    struct sockaddr_storage addr;
} Outgoing;

typedef struct {
    PyObject_HEAD
    int fd;
    int family;
    int batch;
    PyObject *entries;         /* the UDP cache's dict: query bytes after the ID -> Cached */
    PyTypeObject *cached_type; /* cache.Cached; its slots are read at these offsets */
    Py_ssize_t off_replies, off_turn, off_start, off_pending;
    /* the rest of its slots, for store_here (0: not all found, so every store is Python's) */
    Py_ssize_t off_counted, off_counter_key, off_truncated, off_tag, off_size;
    long long rebuild_after;
    unsigned long long sample_every;
    unsigned long long received; /* datagrams read, as UdpProtocol._n counts them */
    unsigned long long hits;     /* answered here */
    unsigned long long send_errors;
    /* the batch read last */
    unsigned char *buffers;
    struct mmsghdr *in_msgs;
    struct iovec *in_iov;
    struct sockaddr_storage *in_addr;
    int in_count, in_next;
    int last; /* the datagram handed to Python whose reply is owed (-1: none) */
    /* replies queued: [out_head, out_count) */
    Outgoing *out;
    struct mmsghdr *out_msgs;
    struct iovec *out_iov;
    int out_cap, out_head, out_count;
    long long queued_at; /* CLOCK_MONOTONIC ns when the queue last went from empty to not */
    int blocked;
    /* plain(): the responder whose misses are tried here, and what was read off its
       PlainPath (`plain_of`, held so its identity cannot be reused) */
    PyObject *responder;
    PyObject *plain_of;
    int plain_ok; /* plain_of is a shape answered here */
    PyObject *suffix, *dc, *partition, *heads[2], *counter_key, *counts, *cache;
    /* a missing service's NXDOMAIN (nx_ok: PlainPath has what it takes) */
    PyObject *soa_ttl, *soa_times, *nx_counter_key, *suffix_text, *seen;
    int nx_ok;
    int only_passing, ra;
    unsigned long long plain_answered;
    /* store_here: cache.py's constants, and whether the cache is a plain ResponseCache */
    int store_ok;
    long long entry_overhead, reply_overhead, order_slack;
    unsigned long long stored_here;
    PyObject *miss_key; /* the key of the miss being looked at (data[2:]) */
    /* callbacks(): what readable() calls (NULL: not given, readable() does nothing) */
    PyObject *on_answer, *on_observe, *on_failed, *on_blocked;
} Reader;

/* interned at import */
static PyObject *str_serving, *str_snapshot, *str_services, *str_udp_plain, *str_udp_cache,
    *str_packed, *str_store, *str_suffix, *str_dc, *str_partition, *str_only_passing,
    *str_fixed_heads, *str_ra, *str_tcp, *str_counter_key, *str_metrics, *str_queries,
    *str_empty, *str_default, *str_enabled, *str_max_entry_bytes, *str_max_entries,
    *str_max_bytes, *str_bytes, *str_tagged, *str_order, *str_append, *str_nxdomains,
    *str_soa_ttl, *str_soa_times, *str_nx_counter_key, *str_suffix_text, *str_seen,
    *str_failover, *str_default_sameness, *str_serial, *int_a, *int_aaaa,
    *int_zero, *int_one;

/* the exception being raised, normalized, as a new reference (cleared from the indicator) */
static PyObject *
PyErr_GetRaisedException_compat(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL && value != NULL)
        PyException_SetTraceback(value, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
#endif
}

#define SLOT(obj, offset) (*(PyObject **)((char *)(obj) + (offset)))

static Py_ssize_t
slot_offset(PyTypeObject *type, const char *name)
{
    PyObject *descr = PyObject_GetAttrString((PyObject *)type, name);
    if (descr == NULL)
        return -1;
    if (!Py_IS_TYPE(descr, &PyMemberDescr_Type)
        || ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a __slots__ attribute", type->tp_name,
                     name);
        Py_DECREF(descr);
        return -1;
    }
    Py_ssize_t offset = ((PyMemberDescrObject *)descr)->d_member->offset;
    Py_DECREF(descr);
    return offset;
}

static void
release_queue(Reader *self, int upto)
{
    for (int i = self->out_head; i < upto; i++)
        Py_CLEAR(self->out[i].reply);
    self->out_head = upto;
    if (self->out_head == self->out_count)
        self->out_head = self->out_count = 0;
}

/* Send what is queued. 1: all sent (or dropped on errors of their own); 0: the socket's
   buffer is full, the rest waits (`blocked`). */
static int
flush_queue(Reader *self)
{
    int head = self->out_head, count = self->out_count;
    for (int i = head; i < count; i++) {
        Outgoing *o = &self->out[i];
        struct iovec *iov = &self->out_iov[2 * i];
        struct msghdr *h = &self->out_msgs[i].msg_hdr;
        int n = 0;
        if (o->with_id) {
            iov[n].iov_base = o->id;
            iov[n++].iov_len = 2;
        }
        iov[n].iov_base = PyBytes_AS_STRING(o->reply);
        iov[n++].iov_len = (size_t)PyBytes_GET_SIZE(o->reply);
        memset(h, 0, sizeof(*h));
        h->msg_name = &o->addr;
        h->msg_namelen = o->addrlen;
        h->msg_iov = iov;
        h->msg_iovlen = (size_t)n;
    }
    while (self->out_head < self->out_count) {
        int sent = sendmmsg(self->fd, &self->out_msgs[self->out_head],
                            (unsigned int)(self->out_count - self->out_head), MSG_DONTWAIT);
        if (sent > 0) {
            release_queue(self, self->out_head + sent);
            continue;
        }
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            self->blocked = 1;
            return 0;
        }
        /* this one reply cannot go (EMSGSIZE, EPERM, ENOBUFS, an unreachable address...):
           drop it, like the pure path's error_received, and send the others */
        self->send_errors++;
        release_queue(self, self->out_head + 1);
    }
    self->blocked = 0;
    return 1;
}

static long long
monotonic_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
}

/* Queue a reply to `addr`; with `id`, those two bytes go in front. -1 when the queue is full
   (only while blocked: it holds two batches). */
static int
queue_reply(Reader *self, PyObject *reply, const unsigned char *id,
            const struct sockaddr_storage *addr, socklen_t addrlen)
{
    if (self->out_count == self->out_cap && self->out_head > 0) {
        int left = self->out_count - self->out_head;
        memmove(self->out, self->out + self->out_head, (size_t)left * sizeof(Outgoing));
        self->out_head = 0;
        self->out_count = left;
    }
    if (self->out_count == self->out_cap)
        return -1;
    if (self->out_count == self->out_head)
        self->queued_at = monotonic_ns();
    Outgoing *o = &self->out[self->out_count++];
    Py_INCREF(reply);
    o->reply = reply;
    o->with_id = id != NULL;
    if (id != NULL) {
        o->id[0] = id[0];
        o->id[1] = id[1];
    }
    o->addrlen = addrlen;
    memcpy(&o->addr, addr, addrlen);
    return 0;
}

static int
queue_full(Reader *self)
{
    return self->out_count - self->out_head >= self->out_cap;
}

/* Send what is queued once its first reply has waited FLUSH_WAIT_NS (checked after each reply
   that was slow to make), unless the socket is blocked. */
static void
flush_if_held(Reader *self)
{
    if (self->out_count > self->out_head && !self->blocked
        && monotonic_ns() - self->queued_at >= FLUSH_WAIT_NS)
        flush_queue(self);
}

static PyObject *
address_tuple(const struct sockaddr_storage *addr)
{
    char host[INET6_ADDRSTRLEN];
    if (addr->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)addr;
        if (inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host)) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", host, ntohs(a->sin_port));
    }
    if (addr->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)addr;
        if (inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host)) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(siII)", host, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo),
                             a->sin6_scope_id);
    }
    Py_RETURN_NONE;
}

/* (host, port) or (host, port, flowinfo, scope_id), as address_tuple makes them. */
static int
parse_address(Reader *self, PyObject *tuple, struct sockaddr_storage *addr, socklen_t *len)
{
    const char *host;
    int port;
    unsigned int flowinfo = 0, scope_id = 0;
    memset(addr, 0, sizeof(*addr));
    if (self->family == AF_UNIX) {
        PyErr_SetString(PyExc_ValueError, "send() takes an IP address: not a UDP socket");
        return -1;
    }
    if (self->family == AF_INET6) {
        if (!PyArg_ParseTuple(tuple, "si|II", &host, &port, &flowinfo, &scope_id))
            return -1;
    } else if (!PyArg_ParseTuple(tuple, "si", &host, &port)) {
        return -1;
    }
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_OverflowError, "port must be 0-65535");
        return -1;
    }
    if (self->family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)addr;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        a->sin6_flowinfo = htonl(flowinfo);
        a->sin6_scope_id = scope_id;
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1)
            goto bad;
        *len = sizeof(*a);
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)addr;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
            goto bad;
        *len = sizeof(*a);
    }
    return 0;
bad:
    PyErr_Format(PyExc_ValueError, "not a numeric address: %s", host);
    return -1;
}

static PyObject *
hand_over(Reader *self, int i, int kind)
{
    PyObject *data = PyBytes_FromStringAndSize(
        (const char *)self->buffers + (size_t)i * SLOT_BYTES, self->in_msgs[i].msg_len);
    if (data == NULL)
        return NULL;
    PyObject *addr = address_tuple(&self->in_addr[i]);
    if (addr == NULL) {
        Py_DECREF(data);
        return NULL;
    }
    self->last = i;
    return Py_BuildValue("(NNi)", data, addr, kind);
}

/* Answer datagram `i` from the cache if it is a plain hit: 1 answered, 0 not (*kind says
   why), -1 error. */
static int
answer_hit(Reader *self, int i, int *kind)
{
    const unsigned char *data = self->buffers + (size_t)i * SLOT_BYTES;
    Py_ssize_t size = self->in_msgs[i].msg_len;
    PyObject *key = PyBytes_FromStringAndSize((const char *)data + 2, size > 2 ? size - 2 : 0);
    if (key == NULL)
        return -1;
    PyObject *entry = PyDict_GetItemWithError(self->entries, key); /* borrowed */
    *kind = KIND_OTHER;
    if (entry == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(key);
            return -1;
        }
        *kind = KIND_MISS;
        Py_XSETREF(self->miss_key, key); /* for answer_plain */
        return 0;
    }
    Py_DECREF(key);
    if (Py_TYPE(entry) != self->cached_type || size < 2)
        return 0;
    PyObject *pending = SLOT(entry, self->off_pending);
    PyObject *turn_obj = SLOT(entry, self->off_turn);
    PyObject *start_obj = SLOT(entry, self->off_start);
    PyObject *replies = SLOT(entry, self->off_replies);
    if (pending != Py_None || turn_obj == NULL || start_obj == NULL || replies == NULL
        || !PyLong_CheckExact(turn_obj) || !PyLong_CheckExact(start_obj)
        || !PyTuple_CheckExact(replies) || PyTuple_GET_SIZE(replies) == 0)
        return 0;
    int overflow_turn, overflow_start;
    long long turn = PyLong_AsLongLongAndOverflow(turn_obj, &overflow_turn);
    long long start = PyLong_AsLongLongAndOverflow(start_obj, &overflow_start);
    long long age;
    if (overflow_turn || overflow_start || turn < 0 || turn == LLONG_MAX
        || __builtin_sub_overflow(turn, start, &age) || age >= self->rebuild_after)
        return 0; /* (Python decides, and rebuilds the entry past rebuild_after) */
    PyObject *reply = PyTuple_GET_ITEM(replies, turn % PyTuple_GET_SIZE(replies));
    if (!PyBytes_CheckExact(reply))
        return 0;
    if (queue_full(self) && (flush_queue(self), queue_full(self)))
        return 0; /* no room to queue it (blocked): Python's reply will be dropped, counted */
    PyObject *next = PyLong_FromLongLong(turn + 1);
    if (next == NULL)
        return -1;
    Py_SETREF(SLOT(entry, self->off_turn), next);
    queue_reply(self, reply, data, &self->in_addr[i], self->in_msgs[i].msg_hdr.msg_namelen);
    self->hits++;
    return 1;
}


static void
plain_clear(Reader *self)
{
    Py_CLEAR(self->plain_of);
    Py_CLEAR(self->suffix);
    Py_CLEAR(self->dc);
    Py_CLEAR(self->partition);
    Py_CLEAR(self->heads[0]);
    Py_CLEAR(self->heads[1]);
    Py_CLEAR(self->counter_key);
    Py_CLEAR(self->counts);
    Py_CLEAR(self->cache);
    Py_CLEAR(self->soa_ttl);
    Py_CLEAR(self->soa_times);
    Py_CLEAR(self->nx_counter_key);
    Py_CLEAR(self->suffix_text);
    Py_CLEAR(self->seen);
    self->nx_ok = 0;
    self->plain_ok = 0;
    self->store_ok = 0;
}

static int
module_long(PyObject *module, const char *name, long long *out)
{
    PyObject *value = PyObject_GetAttrString(module, name);
    if (value == NULL)
        return -1;
    *out = PyLong_AsLongLong(value);
    Py_DECREF(value);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* Whether store_here may stand in for self->cache.store: the cache is a ResponseCache itself
   (not a subclass, whose store may differ) and Cached has every slot. 0 done, -1 error. */
static int
store_refresh(Reader *self)
{
    self->store_ok = 0;
    if (self->off_counted == 0)
        return 0;
    PyObject *module = PyImport_ImportModule("meshdns.cache");
    if (module == NULL)
        return -1;
    int status = -1;
    PyObject *type = PyObject_GetAttrString(module, "ResponseCache");
    if (type != NULL && module_long(module, "ENTRY_OVERHEAD", &self->entry_overhead) == 0
        && module_long(module, "REPLY_OVERHEAD", &self->reply_overhead) == 0
        && module_long(module, "ORDER_SLACK", &self->order_slack) == 0) {
        status = 0;
        self->store_ok = (PyObject *)Py_TYPE(self->cache) == type;
    }
    Py_XDECREF(type);
    Py_DECREF(module);
    return status;
}

static int
attr_ssize(PyObject *obj, PyObject *name, Py_ssize_t *out)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL)
        return -1;
    if (!PyLong_CheckExact(value)) {
        Py_DECREF(value);
        *out = -1;
        return 0;
    }
    *out = PyLong_AsSsize_t(value);
    Py_DECREF(value);
    if (*out == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear(); /* (too big for here: Python's) */
    }
    return 0;
}

/* ResponseCache.store(key, (body,), 0, counter_key, tag) done here for its commonest case (a
   new key, room in both bounds, the tag's first entry or one of a set, the eviction order not
   due for compaction): the same entry, the same bookkeeping, in the same order. 1 stored,
   0 not this case (the caller calls store), -1 error. */
static int
store_here(Reader *self, PyObject *key, PyObject *replies, PyObject *body, PyObject *tag,
           PyObject *counter_key)
{
    PyObject *cache = self->cache, *entries = self->entries;
    if (!self->store_ok)
        return 0;
    PyObject *enabled = PyObject_GetAttr(cache, str_enabled);
    if (enabled == NULL)
        return -1;
    int is_enabled = enabled == Py_True;
    Py_DECREF(enabled);
    if (!is_enabled)
        return 0;
    Py_ssize_t size = (Py_ssize_t)(self->entry_overhead + self->reply_overhead)
                      + PyBytes_GET_SIZE(key) + PyBytes_GET_SIZE(body);
    Py_ssize_t max_entry, max_entries, max_bytes, used;
    if (attr_ssize(cache, str_max_entry_bytes, &max_entry) < 0
        || attr_ssize(cache, str_max_entries, &max_entries) < 0
        || attr_ssize(cache, str_max_bytes, &max_bytes) < 0
        || attr_ssize(cache, str_bytes, &used) < 0)
        return -1;
    Py_ssize_t count = PyDict_GET_SIZE(entries);
    if (max_entry < 0 || max_entries < 0 || max_bytes < 0 || used < 0 || size > max_entry
        || count >= max_entries || used + size > max_bytes)
        return 0; /* (too big, or an eviction first: Python's) */
    int present = PyDict_Contains(entries, key);
    if (present != 0)
        return present < 0 ? -1 : 0;
    PyObject *tagged = PyObject_GetAttr(cache, str_tagged);
    PyObject *order = tagged ? PyObject_GetAttr(cache, str_order) : NULL;
    PyObject *entry = NULL, *size_obj = NULL, *bytes_obj = NULL, *appended = NULL, *keys = NULL;
    int status = -1;
    if (order == NULL)
        goto done;
    Py_ssize_t queued = PyObject_Length(order);
    if (queued < 0)
        goto done;
    status = 0;
    if (!PyDict_CheckExact(tagged)
        || queued + 1 > (count + 1) + (count + 1) / 4 + self->order_slack)
        goto done; /* (compaction due: Python's) */
    keys = PyDict_GetItemWithError(tagged, tag);
    if (keys == NULL && PyErr_Occurred()) {
        status = -1;
        goto done;
    }
    Py_XINCREF(keys);
    if (keys != NULL && !Py_IS_TYPE(keys, &PySet_Type) && !PyBytes_CheckExact(keys))
        goto done;
    status = -1;
    PyTypeObject *ctype = self->cached_type;
    if ((size_obj = PyLong_FromSsize_t(size)) == NULL
        || (bytes_obj = PyLong_FromSsize_t(used + size)) == NULL
        || (entry = ctype->tp_alloc(ctype, 0)) == NULL)
        goto done;
    /* Cached(replies, 0, counter_key, None, tag, size), as its __init__ fills it */
    struct {
        Py_ssize_t offset;
        PyObject *value;
    } slots[] = {
        {self->off_replies, replies},
        {self->off_turn, int_zero},
        {self->off_start, int_zero},
        {self->off_counted, int_zero},
        {self->off_counter_key, counter_key},
        {self->off_pending, Py_None},
        {self->off_truncated, (PyBytes_AS_STRING(body)[0] & 0x02) ? Py_True : Py_False},
        {self->off_tag, tag},
        {self->off_size, size_obj},
    };
    for (size_t k = 0; k < sizeof(slots) / sizeof(slots[0]); k++) {
        Py_INCREF(slots[k].value);
        SLOT(entry, slots[k].offset) = slots[k].value;
    }
    /* Out of the cyclic collector's sight, the entry and its tuple (of bytes): they can be
       part of no cycle, and a collection walks every object it tracks, so a cold burst of
       misses made each one slower the more entries it had made (gen1: ~100,000 of them a
       second at 40,000 misses/s, a pause of milliseconds). Reference counting frees them. */
    if (PyObject_GC_IsTracked(entry))
        PyObject_GC_UnTrack(entry);
    if (PyObject_GC_IsTracked(replies))
        PyObject_GC_UnTrack(replies);
    if (PyDict_SetItem(entries, key, entry) < 0
        || PyObject_SetAttr(cache, str_bytes, bytes_obj) < 0
        || (appended = PyObject_CallMethodOneArg(order, str_append, key)) == NULL)
        goto done;
    if (keys == NULL) { /* the tag's only entry (a name asked once, the cold path) */
        if (PyDict_SetItem(tagged, tag, key) < 0)
            goto done;
    } else if (PyBytes_CheckExact(keys)) { /* its second (the AAAA after the A): a set now */
        PyObject *both = PySet_New(NULL);
        int failed = both == NULL || PySet_Add(both, keys) < 0 || PySet_Add(both, key) < 0
                     || PyDict_SetItem(tagged, tag, both) < 0;
        Py_XDECREF(both);
        if (failed)
            goto done;
    } else if (PySet_Add(keys, key) < 0) {
        goto done;
    }
    self->stored_here++;
    status = 1;
done:
    Py_XDECREF(tagged);
    Py_XDECREF(order);
    Py_XDECREF(entry);
    Py_XDECREF(size_obj);
    Py_XDECREF(bytes_obj);
    Py_XDECREF(appended);
    Py_XDECREF(keys);
    return status;
}

/* Read what answer_plain needs off the responder's PlainPath `plain` (a new one after each
   reconfigure). 0 done (plain_ok says whether its shape is answered here), -1 error. */
static int
plain_refresh(Reader *self, PyObject *plain)
{
    plain_clear(self);
    Py_INCREF(plain);
    self->plain_of = plain;
    PyObject *tcp = PyObject_GetAttr(plain, str_tcp);
    PyObject *heads = PyObject_GetAttr(plain, str_fixed_heads);
    PyObject *only = PyObject_GetAttr(plain, str_only_passing);
    PyObject *ra = PyObject_GetAttr(plain, str_ra);
    PyObject *metrics = PyObject_GetAttr(plain, str_metrics);
    int status = -1;
    self->suffix = PyObject_GetAttr(plain, str_suffix);
    self->dc = PyObject_GetAttr(plain, str_dc);
    self->partition = PyObject_GetAttr(plain, str_partition);
    self->counter_key = PyObject_GetAttr(plain, str_counter_key);
    self->cache = PyObject_GetAttr(self->responder, str_udp_cache);
    if (!tcp || !heads || !only || !ra || !metrics || !self->suffix || !self->dc
        || !self->partition || !self->counter_key || !self->cache)
        goto done;
    self->counts = PyObject_GetAttr(metrics, str_queries);
    if (!self->counts)
        goto done;
    status = 0;
    if (tcp != Py_False || heads == Py_None || !PyDict_Check(heads)
        || !PyBytes_CheckExact(self->suffix) || PyBytes_GET_SIZE(self->suffix) > 300
        || !PyUnicode_CheckExact(self->dc) || !PyUnicode_CheckExact(self->partition)
        || !PyTuple_CheckExact(self->counter_key) || !PyDict_Check(self->counts)
        || !PyLong_CheckExact(ra) || (only != Py_True && only != Py_False))
        goto done; /* not a shape answered here: Python answers every miss */
    for (int k = 0; k < 2; k++) {
        PyObject *head = PyDict_GetItemWithError(heads, k ? int_aaaa : int_a);
        if (head == NULL) {
            if (PyErr_Occurred())
                status = -1;
            goto done;
        }
        if (!PyBytes_CheckExact(head) || PyBytes_GET_SIZE(head) != 12)
            goto done;
        Py_INCREF(head);
        self->heads[k] = head;
    }
    self->ra = (int)PyLong_AsLong(ra);
    if (self->ra == -1 && PyErr_Occurred()) {
        status = -1;
        goto done;
    }
    self->only_passing = only == Py_True;
    self->plain_ok = 1;
    /* the NXDOMAIN of a missing service too, when PlainPath says how (else Python's) */
    PyObject *nxdomains = PyObject_GetAttr(plain, str_nxdomains);
    self->soa_ttl = PyObject_GetAttr(plain, str_soa_ttl);
    self->soa_times = PyObject_GetAttr(plain, str_soa_times);
    self->nx_counter_key = PyObject_GetAttr(plain, str_nx_counter_key);
    self->suffix_text = PyObject_GetAttr(plain, str_suffix_text);
    self->seen = nxdomains ? PyObject_GetAttr(nxdomains, str_seen) : NULL;
    Py_XDECREF(nxdomains);
    if (!self->soa_ttl || !self->soa_times || !self->nx_counter_key || !self->suffix_text
        || !self->seen) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            status = -1;
            goto done;
        }
        PyErr_Clear();
    } else {
        self->nx_ok = PyBytes_CheckExact(self->soa_ttl) && PyBytes_GET_SIZE(self->soa_ttl) == 4
                      && PyBytes_CheckExact(self->soa_times)
                      && PyBytes_GET_SIZE(self->soa_times) == 16
                      && PyTuple_CheckExact(self->nx_counter_key)
                      && PyUnicode_CheckExact(self->suffix_text) && PyCallable_Check(self->seen);
    }
    if (store_refresh(self) < 0)
        status = -1;
done:
    Py_XDECREF(tcp);
    Py_XDECREF(heads);
    Py_XDECREF(only);
    Py_XDECREF(ra);
    Py_XDECREF(metrics);
    return status;
}

static inline unsigned char
ascii_lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

/* A count in metrics.queries (a Counter: a missing key counts 0) up by one. */
static int
count_query(Reader *self, PyObject *counter_key)
{
    PyObject *count = PyDict_GetItemWithError(self->counts, counter_key);
    if (count == NULL && PyErr_Occurred())
        return -1;
    PyObject *next = PyNumber_Add(count ? count : int_zero, int_one);
    if (next == NULL || PyDict_SetItem(self->counts, counter_key, next) < 0) {
        Py_XDECREF(next);
        return -1;
    }
    Py_DECREF(next);
    return 0;
}

static void
put_u32(unsigned char *p, unsigned long value)
{
    p[0] = (unsigned char)(value >> 24);
    p[1] = (unsigned char)(value >> 16);
    p[2] = (unsigned char)(value >> 8);
    p[3] = (unsigned char)value;
}

/* The NXDOMAIN of datagram `i`, whose service (`key` in services, `sname` lowercased) the
   snapshot does not have, as PlainPath._missing writes it: only where the general path looks
   nowhere else (no failover entry for it, no default sameness group in the partition) and the
   serial fits the SOA. 1 answered, 0 not (Python answers it), -1 error. */
static int
answer_missing(Reader *self, int i, PyObject *snapshot, PyObject *key, PyObject *sname,
               Py_ssize_t end, Py_ssize_t qend, int edns_size)
{
    const unsigned char *data = self->buffers + (size_t)i * SLOT_BYTES;
    int status = -1;
    PyObject *failover = NULL, *sameness = NULL, *serial_obj = NULL, *body = NULL,
             *replies = NULL, *stored = NULL, *asked = NULL, *seen = NULL;
    failover = PyObject_GetAttr(snapshot, str_failover);
    sameness = failover ? PyObject_GetAttr(snapshot, str_default_sameness) : NULL;
    serial_obj = sameness ? PyObject_GetAttr(snapshot, str_serial) : NULL;
    if (serial_obj == NULL)
        goto done;
    status = 0;
    if (!PyDict_CheckExact(failover) || !PyDict_CheckExact(sameness)
        || !PyLong_CheckExact(serial_obj))
        goto done;
    PyObject *targets = PyDict_GetItemWithError(failover, key);
    if (targets == NULL && PyErr_Occurred()) {
        status = -1;
        goto done;
    }
    if (targets != NULL) {
        int some = PyObject_IsTrue(targets);
        if (some != 0) {
            status = some < 0 ? -1 : 0;
            goto done; /* failover: the general path tries its targets */
        }
    }
    PyObject *group = PyDict_GetItemWithError(sameness, self->partition);
    if (group != NULL || PyErr_Occurred()) {
        status = group != NULL ? 0 : -1;
        goto done; /* a default sameness group: its members are tried */
    }
    int overflow;
    long long serial = PyLong_AsLongLongAndOverflow(serial_obj, &overflow);
    if (overflow || serial < 0 || serial > 0xFFFFFFFFLL) {
        if (PyErr_Occurred())
            status = -1;
        goto done;
    }
    /* header, the question as asked, the SOA (its names pointing at the domain in the
       question, right after "service"), the OPT */
    Py_ssize_t question = qend - 12, opt_len = edns_size < 0 ? 0 : 11;
    body = PyBytes_FromStringAndSize(NULL, 10 + question + 50 + opt_len);
    if (body == NULL) {
        status = -1;
        goto done;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(body);
    int flags = 0x8403 | (data[2] & 0x01) << 8 | (data[3] & 0x10) | self->ra;
    unsigned char ptr0 = (unsigned char)(0xC0 | (end + 8) >> 8), ptr1 = (unsigned char)(end + 8);
    out[0] = (unsigned char)(flags >> 8);
    out[1] = (unsigned char)flags;
    memcpy(out + 2, "\0\1\0\0\0\1\0", 7);
    out[9] = opt_len ? 1 : 0;
    memcpy(out + 10, data + 12, (size_t)question);
    unsigned char *p = out + 10 + question;
    p[0] = ptr0;
    p[1] = ptr1;
    memcpy(p + 2, "\0\6\0\1", 4);
    memcpy(p + 6, PyBytes_AS_STRING(self->soa_ttl), 4);
    memcpy(p + 10, "\0\x26\2ns", 5);
    p[15] = ptr0;
    p[16] = ptr1;
    memcpy(p + 17, "\x0ahostmaster", 11);
    p[28] = ptr0;
    p[29] = ptr1;
    put_u32(p + 30, (unsigned long)serial);
    memcpy(p + 34, PyBytes_AS_STRING(self->soa_times), 16);
    p += 50;
    if (opt_len) {
        int udp = edns_size < 512 ? 512 : edns_size;
        p[0] = p[1] = 0;
        p[2] = 0x29;
        p[3] = (unsigned char)(udp >> 8);
        p[4] = (unsigned char)udp;
        p[5] = p[6] = 0;
        p[7] = (data[qend + 7] & 0x80) ? 0x80 : 0; /* DO, echoed */
        p[8] = p[9] = p[10] = 0;
    }
    if (queue_full(self) && (flush_queue(self), queue_full(self)))
        goto done; /* no room to queue it (blocked): Python's reply will be dropped, counted */
    status = -1;
    if (count_query(self, self->nx_counter_key) < 0)
        goto done;
    replies = PyTuple_Pack(1, body);
    if (replies == NULL)
        goto done;
    int here = store_here(self, self->miss_key, replies, body, sname, self->nx_counter_key);
    if (here < 0)
        goto done;
    if (!here) {
        PyObject *args[] = {self->cache,           self->miss_key, replies, int_zero,
                            self->nx_counter_key, sname,          Py_None};
        stored = PyObject_VectorcallMethod(str_store, args, 7, NULL);
        if (stored == NULL)
            goto done;
    }
    /* nxdomains.seen(the name as asked, the cache's entries, key): the status page's names */
    PyObject *label = PyUnicode_DecodeASCII((const char *)data + 13, end - 13, NULL);
    if (label == NULL)
        goto done;
    asked = PyUnicode_Concat(label, self->suffix_text);
    Py_DECREF(label);
    if (asked == NULL)
        goto done;
    PyObject *args[] = {asked, self->entries, self->miss_key};
    seen = PyObject_Vectorcall(self->seen, args, 3, NULL);
    if (seen == NULL)
        goto done;
    if (queue_reply(self, body, data, &self->in_addr[i],
                    self->in_msgs[i].msg_hdr.msg_namelen) < 0)
        self->send_errors++; /* (as Reader_next counts a reply the full queue refuses) */
    self->plain_answered++;
    status = 1;
done:
    Py_XDECREF(failover);
    Py_XDECREF(sameness);
    Py_XDECREF(serial_obj);
    Py_XDECREF(body);
    Py_XDECREF(replies);
    Py_XDECREF(stored);
    Py_XDECREF(asked);
    Py_XDECREF(seen);
    return status;
}

/* The miss of datagram `i` (its key in miss_key) answered as PlainPath.respond would, when
   it is the shape done here: 1 answered, 0 not (Python answers it), -1 error. */
static int
answer_plain(Reader *self, int i)
{
    const unsigned char *data = self->buffers + (size_t)i * SLOT_BYTES;
    Py_ssize_t size = self->in_msgs[i].msg_len;
    /* the packet's shape first: nothing is looked up for most of what is not the case */
    if (size < 17 || data[2] & 0xF8 || memcmp(data + 4, "\0\1\0\0\0\0", 6) != 0 || data[10]
        || data[11] > 1)
        return 0;
    Py_ssize_t length = data[12];
    if (length == 0 || length >= 64)
        return 0;
    PyObject *plain = PyObject_GetAttr(self->responder, str_udp_plain);
    if (plain == NULL)
        return -1;
    if (plain != self->plain_of && plain_refresh(self, plain) < 0) {
        Py_DECREF(plain);
        return -1;
    }
    Py_DECREF(plain);
    if (!self->plain_ok)
        return 0;
    Py_ssize_t end = 13 + length;
    const unsigned char *suffix = (const unsigned char *)PyBytes_AS_STRING(self->suffix);
    Py_ssize_t suffix_len = PyBytes_GET_SIZE(self->suffix);
    Py_ssize_t tail = end + suffix_len, qend = tail + 4;
    if (size < qend)
        return 0;
    int exact = 1; /* the suffix written in lowercase (answer_missing needs it) */
    for (Py_ssize_t k = 0; k < suffix_len; k++) {
        if (data[end + k] != suffix[k]) {
            exact = 0;
            if (ascii_lower(data[end + k]) != suffix[k])
                return 0;
        }
    }
    char name[64];
    for (Py_ssize_t k = 0; k < length; k++) {
        unsigned char c = data[13 + k];
        if (c >= 0x80 || c == '.')
            return 0; /* not ASCII (PlainPath's decode fails), a dot inside the label */
        name[k] = (char)ascii_lower(c);
    }
    if (name[0] == '_')
        return 0;
    if (data[tail] || data[tail + 2] != 0 || data[tail + 3] != 1)
        return 0; /* class IN only */
    int qtype = data[tail + 1], psize;
    if (qtype == 1)
        psize = 4;
    else if (qtype == 28)
        psize = 16;
    else
        return 0;
    int edns_size = -1;
    if (data[11]) { /* one OPT owned by the root, version 0, no options: 11 bytes */
        if (size != qend + 11 || data[qend] || data[qend + 1] || data[qend + 2] != 0x29
            || data[qend + 6] || data[qend + 9] || data[qend + 10])
            return 0;
        edns_size = data[qend + 3] << 8 | data[qend + 4];
    } else if (size != qend) {
        return 0;
    }
    PyObject *serving = PyObject_GetAttr(self->responder, str_serving);
    if (serving == NULL)
        return -1;
    int is_serving = PyObject_IsTrue(serving);
    Py_DECREF(serving);
    if (is_serving <= 0)
        return is_serving; /* (respond_uncached: the general path answers while not serving) */
    int status = -1;
    PyObject *snapshot = NULL, *services = NULL, *key = NULL, *group = NULL, *packed = NULL,
             *body = NULL, *replies = NULL, *stored = NULL;
    PyObject *sname = PyUnicode_DecodeASCII(name, length, NULL);
    if (sname == NULL)
        goto done;
    snapshot = PyObject_GetAttr(self->responder, str_snapshot);
    if (snapshot == NULL)
        goto done;
    services = PyObject_GetAttr(snapshot, str_services);
    if (services == NULL)
        goto done;
    key = PyTuple_Pack(5, str_empty, self->dc, self->partition, str_default, sname);
    if (key == NULL)
        goto done;
    if (!PyDict_CheckExact(services)) {
        status = 0; /* (a mapping of another kind: Python's .get decides) */
        goto done;
    }
    group = PyDict_GetItemWithError(services, key);
    if (group == NULL) {
        status = PyErr_Occurred() ? -1
                 : (exact && self->nx_ok) ? answer_missing(self, i, snapshot, key, sname, end,
                                                           qend, edns_size)
                                          : 0;
        goto done;
    }
    Py_INCREF(group);
    status = 0;
    if (!PyTuple_Check(group) || PyTuple_GET_SIZE(group) < 2)
        goto done;
    PyObject *found = PyTuple_GET_ITEM(group, self->only_passing ? 1 : 0);
    if (!PyTuple_Check(found) || PyTuple_GET_SIZE(found) != 1)
        goto done; /* none (failover, NXDOMAIN) or several (an order to draw): Python's */
    packed = PyObject_GetAttr(PyTuple_GET_ITEM(found, 0), str_packed);
    if (packed == NULL) {
        status = -1;
        goto done;
    }
    if (!PyBytes_CheckExact(packed) || PyBytes_GET_SIZE(packed) != psize)
        goto done; /* a hostname or another family: tagged addresses, CNAMEs */
    /* the reply after its ID: header, the question as asked, the record, the OPT */
    Py_ssize_t question = qend - 12, opt_len = edns_size < 0 ? 0 : 11;
    body = PyBytes_FromStringAndSize(NULL, 10 + question + 12 + psize + opt_len);
    if (body == NULL) {
        status = -1;
        goto done;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(body);
    int flags = 0x8400 | (data[2] & 0x01) << 8 | (data[3] & 0x10) | self->ra;
    out[0] = (unsigned char)(flags >> 8);
    out[1] = (unsigned char)flags;
    memcpy(out + 2, "\0\1\0\1\0\0\0", 7);
    out[9] = opt_len ? 1 : 0;
    memcpy(out + 10, data + 12, (size_t)question);
    unsigned char *p = out + 10 + question;
    memcpy(p, PyBytes_AS_STRING(self->heads[qtype == 28]), 12);
    memcpy(p + 12, PyBytes_AS_STRING(packed), (size_t)psize);
    p += 12 + psize;
    if (opt_len) {
        int udp = edns_size < 512 ? 512 : edns_size;
        p[0] = p[1] = 0;
        p[2] = 0x29;
        p[3] = (unsigned char)(udp >> 8);
        p[4] = (unsigned char)udp;
        p[5] = p[6] = 0;
        p[7] = (data[qend + 7] & 0x80) ? 0x80 : 0; /* DO, echoed */
        p[8] = p[9] = p[10] = 0;
    }
    if (queue_full(self) && (flush_queue(self), queue_full(self)))
        goto done; /* no room to queue it (blocked): Python's reply will be dropped, counted */
    {   /* (store keeps nothing while the cache is disabled, as on Python's path) */
        replies = PyTuple_Pack(1, body);
        if (replies == NULL) {
            status = -1;
            goto done;
        }
        int here = store_here(self, self->miss_key, replies, body, sname, self->counter_key);
        if (here < 0) {
            status = -1;
            goto done;
        }
        if (!here) {
            PyObject *args[] = {self->cache,        self->miss_key, replies, int_zero,
                                self->counter_key, sname,          Py_None};
            stored = PyObject_VectorcallMethod(str_store, args, 7, NULL);
            if (stored == NULL) {
                status = -1;
                goto done;
            }
        }
    }
    if (count_query(self, self->counter_key) < 0) {
        status = -1;
        goto done;
    }
    if (queue_reply(self, body, data, &self->in_addr[i],
                    self->in_msgs[i].msg_hdr.msg_namelen) < 0)
        self->send_errors++; /* (as Reader_next counts a reply the full queue refuses) */
    self->plain_answered++;
    status = 1;
done:
    Py_XDECREF(sname);
    Py_XDECREF(snapshot);
    Py_XDECREF(services);
    Py_XDECREF(key);
    Py_XDECREF(group);
    Py_XDECREF(packed);
    Py_XDECREF(body);
    Py_XDECREF(replies);
    Py_XDECREF(stored);
    return status;
}

/* Serve the rest of the batch: the next datagram for Python, or None once the batch is done
   and its replies are sent. */
static PyObject *
serve(Reader *self)
{
    while (self->in_next < self->in_count) {
        int i = self->in_next++;
        self->received++;
        if (self->received % self->sample_every == 0)
            return hand_over(self, i, KIND_SAMPLED);
        int kind;
        int answered = answer_hit(self, i, &kind);
        if (answered < 0)
            return NULL; /* (MemoryError: that datagram goes unanswered) */
        if (!answered && kind == KIND_MISS && self->responder != NULL) {
            answered = answer_plain(self, i);
            if (answered < 0) {
                /* an error on the way (a failing store, say): Python answers this one and
                   meets it again there, where it is logged as every packet's error is */
                if (!PyErr_ExceptionMatches(PyExc_Exception))
                    return NULL;
                PyErr_Clear();
                answered = 0;
            }
        }
        Py_CLEAR(self->miss_key);
        if (!answered)
            return hand_over(self, i, kind);
        if (kind == KIND_MISS)
            flush_if_held(self); /* (misses answered here cost ~3 us each: a batch of them
                                    must not hold the first reply for all 64 either) */
    }
    flush_queue(self);
    Py_RETURN_NONE;
}

static PyObject *
Reader_read(Reader *self, PyObject *Py_UNUSED(ignored))
{
    if (self->buffers == NULL) {
        PyErr_SetString(PyExc_ValueError, "the reader is closed");
        return NULL;
    }
    self->last = -1; /* a datagram whose reply never came back (an exception): unanswered */
    if (self->in_next < self->in_count)
        return serve(self);
    if (self->out_head < self->out_count && !flush_queue(self))
        Py_RETURN_NONE; /* still blocked: read nothing more until the replies are out */
    for (int i = 0; i < self->batch; i++) {
        self->in_msgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_storage);
        self->in_msgs[i].msg_hdr.msg_flags = 0;
    }
    int got;
    do {
        got = recvmmsg(self->fd, self->in_msgs, (unsigned int)self->batch, MSG_DONTWAIT, NULL);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        switch (errno) {
        case EAGAIN:
#if EWOULDBLOCK != EAGAIN
        case EWOULDBLOCK:
#endif
        /* errors queued on the socket (ICMP, with IP_RECVERR): reading clears them, and the
           pure path's error_received ignores them too */
        case ECONNREFUSED:
        case EHOSTUNREACH:
        case ENETUNREACH:
        case EHOSTDOWN:
        case ENETDOWN:
        case EMSGSIZE:
        case ENOBUFS:
        case ENOMEM:
            self->in_count = self->in_next = 0;
            Py_RETURN_NONE;
        default:
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    self->in_count = got;
    self->in_next = 0;
    return serve(self);
}

static PyObject *
Reader_next(Reader *self, PyObject *reply)
{
    if (self->buffers == NULL) {
        PyErr_SetString(PyExc_ValueError, "the reader is closed");
        return NULL;
    }
    if (reply != Py_None && !PyBytes_Check(reply)) {
        PyErr_SetString(PyExc_TypeError, "a reply is bytes or None");
        return NULL;
    }
    int last = self->last;
    self->last = -1;
    if (last >= 0 && reply != Py_None) {
        if (queue_full(self))
            flush_queue(self);
        if (queue_reply(self, reply, NULL, &self->in_addr[last],
                        self->in_msgs[last].msg_hdr.msg_namelen) < 0)
            self->send_errors++; /* blocked, and two batches of replies wait already */
        else
            flush_if_held(self); /* (Python's replies are slow to make: do not hold the others) */
    }
    return serve(self);
}

/* The exception being raised handed to on_failed(exc, reading), then cleared; 0, or -1 when
   on_failed itself raised (that exception stays set). */
static int
report_failure(Reader *self, int reading)
{
    PyObject *exc = PyErr_GetRaisedException_compat();
    PyObject *args[2] = {exc, reading ? Py_True : Py_False};
    PyObject *done = PyObject_Vectorcall(self->on_failed, args, 2, NULL);
    Py_DECREF(exc);
    if (done == NULL)
        return -1;
    Py_DECREF(done);
    return 0;
}

/* Python's reply to one datagram handed over (`item`: data, address, kind), a new reference:
   bytes, or None for none (an exception of the Exception kind reported, as the pure path's
   datagram_received logs it); NULL only for what must stop the loop (KeyboardInterrupt...). */
static PyObject *
python_reply(Reader *self, PyObject *item)
{
    PyObject *data = PyTuple_GET_ITEM(item, 0), *addr = PyTuple_GET_ITEM(item, 1);
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(item, 2));
    PyObject *miss = Py_None, *reply;
    Py_INCREF(miss);
    if (kind == KIND_MISS) {
        Py_ssize_t size = PyBytes_GET_SIZE(data);
        Py_SETREF(miss, PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + (size > 2 ? 2 : size),
                                                  size > 2 ? size - 2 : 0));
        if (miss == NULL)
            goto failed;
    }
    long long started = kind == KIND_SAMPLED ? monotonic_ns() : 0;
    PyObject *args[3] = {data, addr, miss};
    reply = PyObject_Vectorcall(self->on_answer, args, 3, NULL);
    Py_DECREF(miss);
    if (reply == NULL)
        goto failed;
    if (reply != Py_None && !PyBytes_Check(reply)) {
        Py_DECREF(reply);
        PyErr_Format(PyExc_TypeError, "a reply is bytes or None, not %.100s",
                     Py_TYPE(reply)->tp_name);
        goto failed;
    }
    if (kind == KIND_SAMPLED && reply != Py_None) {
        PyObject *seconds = PyFloat_FromDouble((double)(monotonic_ns() - started) / 1e9);
        PyObject *done = seconds ? PyObject_Vectorcall(self->on_observe, &seconds, 1, NULL) : NULL;
        Py_XDECREF(seconds);
        if (done == NULL) {
            Py_DECREF(reply);
            goto failed;
        }
        Py_DECREF(done);
    }
    return reply;
failed:
    if (!PyErr_ExceptionMatches(PyExc_Exception) || report_failure(self, 0) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* What the event loop calls when the socket is readable: read() and next() until the batch is
   done, Python's answers got from on_answer, every failure reported to on_failed (a read's
   OSError with reading=True), on_blocked() called when replies wait for room. */
static PyObject *
Reader_readable(Reader *self, PyObject *Py_UNUSED(ignored))
{
    if (self->buffers == NULL || self->on_answer == NULL)
        Py_RETURN_NONE; /* closed (a wakeup already on its way) or not given callbacks */
    Py_INCREF(self); /* (a callback may close and drop the last reference to this reader) */
    PyObject *item = Reader_read(self, NULL);
    while (item != NULL && item != Py_None) {
        PyObject *reply = python_reply(self, item);
        Py_DECREF(item);
        if (reply == NULL || self->buffers == NULL) {
            Py_XDECREF(reply);
            item = reply == NULL ? NULL : Py_None;
            if (item != NULL)
                Py_INCREF(item);
            break;
        }
        item = Reader_next(self, reply);
        Py_DECREF(reply);
    }
    PyObject *result = NULL;
    if (item == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_OSError) || report_failure(self, 1) < 0)
            goto done; /* (a MemoryError, say: the loop's exception handler logs it) */
    } else {
        Py_DECREF(item);
    }
    if (self->blocked && self->on_blocked != NULL) {
        PyObject *done = PyObject_CallNoArgs(self->on_blocked);
        if (done == NULL)
            goto done;
        Py_DECREF(done);
    }
    result = Py_None;
    Py_INCREF(result);
done:
    Py_DECREF(self);
    return result;
}

static PyObject *
Reader_callbacks(Reader *self, PyObject *args)
{
    PyObject *answer, *observe, *failed, *blocked;
    if (!PyArg_ParseTuple(args, "OOOO", &answer, &observe, &failed, &blocked))
        return NULL;
    if (!PyCallable_Check(answer) || !PyCallable_Check(observe) || !PyCallable_Check(failed)
        || !PyCallable_Check(blocked)) {
        PyErr_SetString(PyExc_TypeError, "callbacks() takes four callables");
        return NULL;
    }
    PyObject *given[4] = {answer, observe, failed, blocked};
    PyObject **slots[4] = {&self->on_answer, &self->on_observe, &self->on_failed,
                           &self->on_blocked};
    for (int k = 0; k < 4; k++) {
        Py_INCREF(given[k]);
        Py_XSETREF(*slots[k], given[k]);
    }
    Py_RETURN_NONE;
}

static void
callbacks_clear(Reader *self)
{
    Py_CLEAR(self->on_answer);
    Py_CLEAR(self->on_observe);
    Py_CLEAR(self->on_failed);
    Py_CLEAR(self->on_blocked);
}

static PyObject *
Reader_send(Reader *self, PyObject *args)
{
    PyObject *reply, *address;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    if (self->buffers == NULL) {
        PyErr_SetString(PyExc_ValueError, "the reader is closed");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "SO!", &reply, &PyTuple_Type, &address))
        return NULL;
    if (parse_address(self, address, &addr, &addrlen) < 0)
        return NULL;
    if (queue_full(self))
        flush_queue(self);
    if (queue_reply(self, reply, NULL, &addr, addrlen) < 0) {
        self->send_errors++;
        Py_RETURN_FALSE;
    }
    if (!self->blocked)
        flush_queue(self);
    Py_RETURN_TRUE;
}

static PyObject *
Reader_flush(Reader *self, PyObject *Py_UNUSED(ignored))
{
    if (self->buffers == NULL || flush_queue(self))
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static void
reader_free(Reader *self)
{
    if (self->out != NULL)
        release_queue(self, self->out_count);
    PyMem_Free(self->buffers);
    PyMem_Free(self->in_msgs);
    PyMem_Free(self->in_iov);
    PyMem_Free(self->in_addr);
    PyMem_Free(self->out);
    PyMem_Free(self->out_msgs);
    PyMem_Free(self->out_iov);
    self->buffers = NULL;
    self->in_msgs = NULL;
    self->in_iov = NULL;
    self->in_addr = NULL;
    self->out = NULL;
    self->out_msgs = NULL;
    self->out_iov = NULL;
    self->in_count = self->in_next = 0;
    self->last = -1;
}

static PyObject *
Reader_plain(Reader *self, PyObject *responder)
{
    plain_clear(self);
    Py_CLEAR(self->responder);
    if (responder != Py_None) {
        Py_INCREF(responder);
        self->responder = responder;
    }
    Py_RETURN_NONE;
}

static PyObject *
Reader_close(Reader *self, PyObject *Py_UNUSED(ignored))
{
    reader_free(self);
    /* the responder holds, through its source, what holds this reader: let go of it */
    plain_clear(self);
    Py_CLEAR(self->responder);
    Py_CLEAR(self->miss_key);
    callbacks_clear(self);
    Py_RETURN_NONE;
}

static int
Reader_init(Reader *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd",           "entries", "cached_type", "rebuild_after",
                             "sample_every", "batch",   NULL};
    int fd, batch = 64;
    PyObject *entries, *cached_type;
    long long rebuild_after, sample_every;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iO!O!LL|i", kwlist, &fd, &PyDict_Type, &entries,
                                     &PyType_Type, &cached_type, &rebuild_after, &sample_every,
                                     &batch))
        return -1;
    if (batch < 1 || batch > MAX_BATCH || sample_every < 1) {
        PyErr_SetString(PyExc_ValueError, "batch must be 1-1024 and sample_every at least 1");
        return -1;
    }
    struct sockaddr_storage local;
    socklen_t local_len = sizeof(local);
    int type;
    socklen_t type_len = sizeof(type);
    if (getsockname(fd, (struct sockaddr *)&local, &local_len) < 0
        || getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &type_len) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    /* (a Unix datagram socket pair, too: the tests fill its peer's small queue to see EAGAIN,
       which loopback UDP never returns) */
    if (type != SOCK_DGRAM || (local.ss_family != AF_INET && local.ss_family != AF_INET6
                               && local.ss_family != AF_UNIX)) {
        PyErr_SetString(PyExc_ValueError, "not a datagram socket over IPv4, IPv6 or Unix");
        return -1;
    }
    PyTypeObject *ctype = (PyTypeObject *)cached_type;
    Py_ssize_t off_replies, off_turn, off_start, off_pending;
    if ((off_replies = slot_offset(ctype, "replies")) < 0
        || (off_turn = slot_offset(ctype, "turn")) < 0
        || (off_start = slot_offset(ctype, "start")) < 0
        || (off_pending = slot_offset(ctype, "pending")) < 0)
        return -1;
    /* (slots store_here fills in: without any of them, or with more slots than the nine it
       knows, or a __dict__, Python stores every entry) */
    Py_ssize_t more[5];
    const char *more_names[5] = {"counted", "counter_key", "truncated", "tag", "size"};
    for (int k = 0; k < 5; k++) {
        if ((more[k] = slot_offset(ctype, more_names[k])) < 0) {
            PyErr_Clear();
            more[0] = 0;
            break;
        }
    }
    if (ctype->tp_basicsize != (Py_ssize_t)(sizeof(PyObject) + 9 * sizeof(PyObject *))
        || ctype->tp_dictoffset != 0)
        more[0] = 0;
    reader_free(self);
    self->off_counted = more[0];
    self->off_counter_key = more[1];
    self->off_truncated = more[2];
    self->off_tag = more[3];
    self->off_size = more[4];
    self->fd = fd;
    self->family = local.ss_family;
    self->batch = batch;
    Py_INCREF(entries);
    Py_XSETREF(self->entries, entries);
    Py_INCREF(cached_type);
    Py_XSETREF(self->cached_type, ctype);
    self->off_replies = off_replies;
    self->off_turn = off_turn;
    self->off_start = off_start;
    self->off_pending = off_pending;
    self->rebuild_after = rebuild_after;
    self->sample_every = (unsigned long long)sample_every;
    self->received = self->hits = self->send_errors = 0;
    self->out_cap = 2 * batch; /* a batch's replies, and as many made later (forwards) */
    self->buffers = PyMem_Malloc((size_t)batch * SLOT_BYTES);
    self->in_msgs = PyMem_Calloc((size_t)batch, sizeof(struct mmsghdr));
    self->in_iov = PyMem_Calloc((size_t)batch, sizeof(struct iovec));
    self->in_addr = PyMem_Calloc((size_t)batch, sizeof(struct sockaddr_storage));
    self->out = PyMem_Calloc((size_t)self->out_cap, sizeof(Outgoing));
    self->out_msgs = PyMem_Calloc((size_t)self->out_cap, sizeof(struct mmsghdr));
    self->out_iov = PyMem_Calloc((size_t)self->out_cap * 2, sizeof(struct iovec));
    if (!self->buffers || !self->in_msgs || !self->in_iov || !self->in_addr || !self->out
        || !self->out_msgs || !self->out_iov) {
        reader_free(self);
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < batch; i++) {
        self->in_iov[i].iov_base = self->buffers + (size_t)i * SLOT_BYTES;
        self->in_iov[i].iov_len = SLOT_BYTES;
        self->in_msgs[i].msg_hdr.msg_iov = &self->in_iov[i];
        self->in_msgs[i].msg_hdr.msg_iovlen = 1;
        self->in_msgs[i].msg_hdr.msg_name = &self->in_addr[i];
    }
    self->in_count = self->in_next = self->out_head = self->out_count = self->blocked = 0;
    self->last = -1;
    return 0;
}

static void
Reader_dealloc(Reader *self)
{
    reader_free(self);
    Py_CLEAR(self->entries);
    Py_CLEAR(self->cached_type);
    plain_clear(self);
    Py_CLEAR(self->responder);
    Py_CLEAR(self->miss_key);
    callbacks_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Reader_get_blocked(Reader *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->blocked);
}

static PyMethodDef Reader_methods[] = {
    {"read", (PyCFunction)Reader_read, METH_NOARGS,
     "read() -> (data, address, kind) | None\n\nRead a batch (or go on with the one read "
     "last): the first datagram Python must answer, or None once every datagram of the "
     "batch is answered and the replies are sent."},
    {"next", (PyCFunction)Reader_next, METH_O,
     "next(reply) -> (data, address, kind) | None\n\nThe reply (bytes, or None for no reply "
     "now) to the datagram handed over last; then as read() for the rest of the batch."},
    {"readable", (PyCFunction)Reader_readable, METH_NOARGS,
     "readable()\n\nFor the event loop when the socket is readable: the batch answered (hits "
     "here, the rest by the callbacks' answer), its replies sent; nothing while closed."},
    {"callbacks", (PyCFunction)Reader_callbacks, METH_VARARGS,
     "callbacks(answer, observe, failed, blocked)\n\nWhat readable() calls: answer(data, "
     "address, miss key or None) -> reply or None; observe(seconds) for a sampled reply; "
     "failed(exception, reading) for an exception answering (or an OSError reading); "
     "blocked() once replies wait for room."},
    {"send", (PyCFunction)Reader_send, METH_VARARGS,
     "send(reply, address) -> bool\n\nA reply made later (a forward's), sent now or queued "
     "while blocked; False when dropped (the queue is full)."},
    {"flush", (PyCFunction)Reader_flush, METH_NOARGS,
     "flush() -> bool\n\nSend what is queued; True when nothing is left."},
    {"plain", (PyCFunction)Reader_plain, METH_O,
     "plain(responder)\n\nTry misses here as responder.respond_uncached answers them through "
     "its udp_plain (fastpath.PlainPath), for the one-instance case; None: never."},
    {"close", (PyCFunction)Reader_close, METH_NOARGS,
     "close()\n\nDrop the buffers and whatever is still queued (the socket is the caller's)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Reader_members[] = {
    {"received", T_ULONGLONG, offsetof(Reader, received), READONLY, "datagrams read"},
    {"hits", T_ULONGLONG, offsetof(Reader, hits), READONLY, "datagrams answered from the cache "
                                                            "here"},
    {"send_errors", T_ULONGLONG, offsetof(Reader, send_errors), READONLY,
     "replies dropped: refused by the kernel (not EAGAIN), or no room while blocked"},
    {"batch", T_INT, offsetof(Reader, batch), READONLY, "datagrams per recvmmsg"},
    {"plain_answered", T_ULONGLONG, offsetof(Reader, plain_answered), READONLY,
     "misses answered here (see plain())"},
    {"stored_here", T_ULONGLONG, offsetof(Reader, stored_here), READONLY,
     "of those, the ones whose cache entry was made here (not by cache.store)"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Reader_getset[] = {
    {"blocked", (getter)Reader_get_blocked, NULL,
     "True while replies wait for room in the socket's send buffer", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "meshdns._udpbatch.Reader",
    .tp_doc = "Reader(fd, entries, cached_type, rebuild_after, sample_every, batch=64)\n\n"
              "Batched reads and sends on one non-blocking UDP socket, cache hits answered "
              "in C (see the module's source for the contract).",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Reader_init,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_methods = Reader_methods,
    .tp_members = Reader_members,
    .tp_getset = Reader_getset,
};

static struct PyModuleDef udpbatch_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "meshdns._udpbatch",
    .m_doc = "The compiled UDP packet path: recvmmsg/sendmmsg batches, cache hits answered in "
             "C (meshdns/packets.py uses it; MESHDNS_PURE_PYTHON=1 turns it off).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__udpbatch(void)
{
    if (PyType_Ready(&ReaderType) < 0)
        return NULL;
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {{&str_serving, "serving"},         {&str_snapshot, "snapshot"},
                 {&str_services, "services"},       {&str_udp_plain, "udp_plain"},
                 {&str_udp_cache, "udp_cache"},     {&str_packed, "packed"},
                 {&str_store, "store"},             {&str_suffix, "suffix"},
                 {&str_dc, "dc"},                   {&str_partition, "partition"},
                 {&str_only_passing, "only_passing"}, {&str_fixed_heads, "fixed_heads"},
                 {&str_ra, "ra"},                   {&str_tcp, "tcp"},
                 {&str_counter_key, "counter_key"}, {&str_metrics, "metrics"},
                 {&str_queries, "queries"},
                 {&str_empty, ""},                  {&str_default, "default"},
                 {&str_enabled, "enabled"},         {&str_max_entry_bytes, "max_entry_bytes"},
                 {&str_max_entries, "max_entries"}, {&str_max_bytes, "max_bytes"},
                 {&str_bytes, "bytes"},             {&str_tagged, "_tagged"},
                 {&str_order, "_order"},            {&str_append, "append"},
                 {&str_nxdomains, "nxdomains"},     {&str_soa_ttl, "soa_ttl"},
                 {&str_soa_times, "soa_times"},     {&str_nx_counter_key, "nx_counter_key"},
                 {&str_suffix_text, "suffix_text"}, {&str_seen, "seen"},
                 {&str_failover, "failover"},       {&str_default_sameness, "default_sameness"},
                 {&str_serial, "serial"}};
    for (size_t k = 0; k < sizeof(names) / sizeof(names[0]); k++)
        if ((*names[k].slot = PyUnicode_InternFromString(names[k].text)) == NULL)
            return NULL;
    if ((int_a = PyLong_FromLong(1)) == NULL || (int_aaaa = PyLong_FromLong(28)) == NULL
        || (int_zero = PyLong_FromLong(0)) == NULL || (int_one = PyLong_FromLong(1)) == NULL)
        return NULL;
    PyObject *module = PyModule_Create(&udpbatch_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(module, "Reader", (PyObject *)&ReaderType) < 0
        || PyModule_AddIntConstant(module, "MISS", KIND_MISS) < 0
        || PyModule_AddIntConstant(module, "OTHER", KIND_OTHER) < 0
        || PyModule_AddIntConstant(module, "SAMPLED", KIND_SAMPLED) < 0) {
        Py_DECREF(&ReaderType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
