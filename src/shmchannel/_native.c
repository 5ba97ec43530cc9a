/* The native core of shmchannel: atomics and futex on shared memory, nothing else.
 *
 * Every queue, counter and wake-up of the data path is logic in Python (queue/ring.py);
 * Python has no atomic operations on memory another process writes, nor a futex, so this
 * module provides exactly those, on a `Region` (a writable buffer, typically the mapping of
 * a /dev/shm file, that the Region keeps exported while it lives).
 *
 * Memory ordering: every operation is sequentially consistent (__ATOMIC_SEQ_CST). That
 * includes acquire (loads, the read side of read-modify-writes) and release (stores, the
 * write side), which is what publication needs: data written by plain stores before a
 * release store of a word is visible to a process whose acquire load reads that store. It
 * also gives the store-load order that waiter counts need (a publisher stores the data then
 * loads the waiter count; a waiter stores its count then loads the data: with only
 * acquire/release both could miss each other, on ARM as on x86). The cost over acquire/
 * release is a few cycles per operation, noise next to the Python call around it.
 *
 * Safety: offsets come from Python code that may have read them from shared memory written
 * by a dead or hostile process. Each is checked: in bounds for the whole word, and aligned
 * to the word's size (an unaligned atomic is not atomic, and traps on some CPUs). A bad
 * offset, of any magnitude (a corrupt u64 read back with load), is a ValueError naming the
 * operation and the offset; a value that does not fit its word is an OverflowError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <time.h>

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#error "shmchannel's native core needs Linux (futex)"
#endif

typedef struct {
    PyObject_HEAD
    Py_buffer view; /* held for the Region's life: the memory cannot be unmapped under us */
    char *base;
    Py_ssize_t size;
} Region;

static int region_init(Region *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"buffer", NULL};
    PyObject *obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Region", kwlist, &obj)) return -1;
    if (self->base != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Region is already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(obj, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    unsigned misaligned = (unsigned)(((uintptr_t)self->view.buf) % 8);
    if (misaligned != 0) {
        PyBuffer_Release(&self->view);
        PyErr_Format(PyExc_ValueError,
                     "Region: the buffer must start on an 8-byte boundary; this one starts %u bytes past one",
                     misaligned);
        return -1;
    }
    self->base = self->view.buf;
    self->size = self->view.len;
    return 0;
}

static void region_dealloc(Region *self) {
    if (self->base != NULL) {
        PyBuffer_Release(&self->view);
        self->base = NULL;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The address of the `width`-byte word at `offset` (any int: it may come from a corrupt
 * word of shared memory), or NULL with an exception set that names the operation `op` and
 * the offset: TypeError if it is not an int, ValueError if it is outside the region (of
 * whatever magnitude, even beyond 64 bits) or not a multiple of `width`. */
static void *word(Region *self, PyObject *offset, int width, const char *op) {
    if (self->base == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: the Region is not initialised", op);
        return NULL;
    }
    PyObject *index = PyNumber_Index(offset);
    if (index == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: offset %R is not an int", op, offset);
        }
        return NULL;
    }
    int overflow;
    long long at = PyLong_AsLongLongAndOverflow(index, &overflow);
    if (at == -1 && !overflow && PyErr_Occurred()) {
        Py_DECREF(index);
        return NULL;
    }
    if (overflow || at < 0 || at > (long long)self->size - width) {
        PyErr_Format(PyExc_ValueError, "%s: offset %R: the %d-byte word there is not inside the region of %zd bytes", op,
                     index, width, self->size);
        Py_DECREF(index);
        return NULL;
    }
    Py_DECREF(index);
    if (at % width != 0) {
        PyErr_Format(PyExc_ValueError, "%s: offset %lld: expected a multiple of %d (atomic words are aligned)", op, at,
                     width);
        return NULL;
    }
    return self->base + at;
}

/* `obj` as an unsigned `bits`-bit value, or -1 with an exception naming `op`, the offset
 * and `name`: TypeError if it is not an int, OverflowError if it is out of range. */
/* The word at an optional offset argument: NULL without an error for a missing argument,
 * None or a negative int (no word wanted); NULL with an error for a bad offset. */
static void *optional_word(Region *self, PyObject *offset, int width, const char *op) {
    if (offset == NULL || offset == Py_None) return NULL;
    if (PyLong_Check(offset)) {
        int overflow;
        long long at = PyLong_AsLongLongAndOverflow(offset, &overflow);
        if (at < 0 && !overflow && !PyErr_Occurred()) return NULL;
    }
    return word(self, offset, width, op);
}

static int unsigned_arg(PyObject *obj, int bits, const char *op, PyObject *offset, const char *name,
                        unsigned long long *out) {
    PyObject *index = PyNumber_Index(obj);
    if (index == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s(offset %R): %s %R is not an int", op, offset, name, obj);
        }
        return -1;
    }
    unsigned long long value = PyLong_AsUnsignedLongLong(index);
    int out_of_range = 0;
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            Py_DECREF(index);
            return -1;
        }
        PyErr_Clear();
        out_of_range = 1;
    } else if (bits < 64 && (value >> bits) != 0) {
        out_of_range = 1;
    }
    if (out_of_range) {
        PyErr_Format(PyExc_OverflowError, "%s(offset %R): %s %R does not fit an unsigned %d-bit word", op, offset,
                     name, index, bits);
        Py_DECREF(index);
        return -1;
    }
    Py_DECREF(index);
    *out = value;
    return 0;
}

/* `obj` as a signed 64-bit value, or -1 with TypeError/OverflowError naming op, offset, name. */
static int signed_arg(PyObject *obj, const char *op, PyObject *offset, const char *name, long long *out) {
    PyObject *index = PyNumber_Index(obj);
    if (index == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s(offset %R): %s %R is not an int", op, offset, name, obj);
        }
        return -1;
    }
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(index, &overflow);
    if (value == -1 && !overflow && PyErr_Occurred()) {
        Py_DECREF(index);
        return -1;
    }
    if (overflow) {
        PyErr_Format(PyExc_OverflowError, "%s(offset %R): %s %R does not fit a signed 64-bit int", op, offset, name,
                     index);
        Py_DECREF(index);
        return -1;
    }
    Py_DECREF(index);
    *out = value;
    return 0;
}

static int check_nargs(const char *signature, Py_ssize_t nargs, Py_ssize_t min, Py_ssize_t max) {
    if (nargs >= min && nargs <= max) return 0;
    if (min == max) PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", signature, min, nargs);
    else PyErr_Format(PyExc_TypeError, "%s takes %zd to %zd arguments (%zd given)", signature, min, max, nargs);
    return -1;
}

static PyObject *region_load(Region *self, PyObject *arg) {
    uint64_t *p = word(self, arg, 8, "load");
    if (p == NULL) return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_load_n(p, __ATOMIC_SEQ_CST));
}

static PyObject *region_load32(Region *self, PyObject *arg) {
    uint32_t *p = word(self, arg, 4, "load32");
    if (p == NULL) return NULL;
    return PyLong_FromUnsignedLong(__atomic_load_n(p, __ATOMIC_SEQ_CST));
}

static PyObject *region_store(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("store(offset, value)", nargs, 2, 2) < 0) return NULL;
    uint64_t *p = word(self, args[0], 8, "store");
    if (p == NULL) return NULL;
    unsigned long long value;
    if (unsigned_arg(args[1], 64, "store", args[0], "value", &value) < 0) return NULL;
    __atomic_store_n(p, (uint64_t)value, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *region_store32(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("store32(offset, value)", nargs, 2, 2) < 0) return NULL;
    uint32_t *p = word(self, args[0], 4, "store32");
    if (p == NULL) return NULL;
    unsigned long long value;
    if (unsigned_arg(args[1], 32, "store32", args[0], "value", &value) < 0) return NULL;
    __atomic_store_n(p, (uint32_t)value, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

/* cas(offset, expected, desired) -> the value found; it was replaced iff that == expected. */
static PyObject *region_cas(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("cas(offset, expected, desired)", nargs, 3, 3) < 0) return NULL;
    uint64_t *p = word(self, args[0], 8, "cas");
    if (p == NULL) return NULL;
    unsigned long long expected, desired;
    if (unsigned_arg(args[1], 64, "cas", args[0], "expected", &expected) < 0) return NULL;
    if (unsigned_arg(args[2], 64, "cas", args[0], "desired", &desired) < 0) return NULL;
    uint64_t found = expected;
    __atomic_compare_exchange_n(p, &found, (uint64_t)desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return PyLong_FromUnsignedLongLong(found);
}

/* cas32(offset, expected, desired) -> the 32-bit value found (a futex word's compare-and-swap). */
static PyObject *region_cas32(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("cas32(offset, expected, desired)", nargs, 3, 3) < 0) return NULL;
    uint32_t *p = word(self, args[0], 4, "cas32");
    if (p == NULL) return NULL;
    unsigned long long expected, desired;
    if (unsigned_arg(args[1], 32, "cas32", args[0], "expected", &expected) < 0) return NULL;
    if (unsigned_arg(args[2], 32, "cas32", args[0], "desired", &desired) < 0) return NULL;
    uint32_t found = (uint32_t)expected;
    __atomic_compare_exchange_n(p, &found, (uint32_t)desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return PyLong_FromUnsignedLong(found);
}

/* add(offset, delta) -> the value before; delta is signed, the word wraps modulo 2**64. */
static PyObject *region_add(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("add(offset, delta)", nargs, 2, 2) < 0) return NULL;
    uint64_t *p = word(self, args[0], 8, "add");
    if (p == NULL) return NULL;
    long long delta;
    if (signed_arg(args[1], "add", args[0], "delta", &delta) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_fetch_add(p, (uint64_t)delta, __ATOMIC_SEQ_CST));
}

/* add32(offset, delta) -> the value before; delta is signed, the word wraps modulo 2**32. */
static PyObject *region_add32(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("add32(offset, delta)", nargs, 2, 2) < 0) return NULL;
    uint32_t *p = word(self, args[0], 4, "add32");
    if (p == NULL) return NULL;
    long long delta;
    if (signed_arg(args[1], "add32", args[0], "delta", &delta) < 0) return NULL;
    return PyLong_FromUnsignedLong(__atomic_fetch_add(p, (uint32_t)delta, __ATOMIC_SEQ_CST));
}

static long futex(uint32_t *addr, int op, uint32_t val, const struct timespec *timeout) {
    /* Not FUTEX_PRIVATE_FLAG: the word is shared between processes. */
    return syscall(SYS_futex, addr, op, val, timeout, NULL, 0);
}

/* wait(offset, expected, timeout=None) -> False if the timeout ran out, else True.
 *
 * Sleeps while the 32-bit word at `offset` holds `expected` (the kernel compares and
 * sleeps atomically, so a wake after the caller's last check is never missed). True may be
 * spurious: callers re-check their condition. The word is always compared at least once:
 * with timeout 0 (or a deadline that passed while a signal handler ran) the result is True
 * if it differs, False if not. The GIL is released while asleep; a signal runs Python's
 * handlers, and an exception they raise ends the wait.
 *
 * With `waiters` (an offset, or None/-1 for none), the 32-bit waiter count there is raised
 * for the wait and lowered after it, inside this one call: no Python instruction -- hence
 * no KeyboardInterrupt or signal handler's exception -- comes between them, so the count
 * never stays raised in a live process. With `mark` too, the 64-bit word there holds
 * `waiters + 1` while the count is raised (set after raising it, cleared before lowering
 * it): whoever finds this process dead lowers the count it named, and no other. */
static PyObject *region_wait(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("wait(offset, expected, timeout=None, waiters=None, mark=None)", nargs, 2, 5) < 0) return NULL;
    uint32_t *p = word(self, args[0], 4, "wait");
    if (p == NULL) return NULL;
    unsigned long long expected;
    if (unsigned_arg(args[1], 32, "wait", args[0], "expected", &expected) < 0) return NULL;
    double timeout = -1.0; /* < 0: no limit */
    if (nargs >= 3 && args[2] != Py_None) {
        timeout = PyFloat_AsDouble(args[2]);
        if (timeout == -1.0 && PyErr_Occurred()) return NULL;
        if (isnan(timeout) || timeout < 0) {
            PyErr_Format(PyExc_ValueError, "wait(offset %R): timeout must be None or seconds >= 0, not %R", args[0],
                         args[2]);
            return NULL;
        }
        if (isinf(timeout)) timeout = -1.0;
    }
    uint32_t *count = optional_word(self, nargs > 3 ? args[3] : NULL, 4, "wait");
    if (count == NULL && PyErr_Occurred()) return NULL;
    uint64_t *marker = count == NULL ? NULL : optional_word(self, nargs > 4 ? args[4] : NULL, 8, "wait");
    if (marker == NULL && PyErr_Occurred()) return NULL;

    struct timespec deadline = {0, 0}, now, rel;
    if (timeout >= 0) {
        double whole = floor(timeout);
        /* Beyond ~34 years the sum could overflow a 32-bit time_t: wait "forever". */
        if (whole > (double)(INT_MAX / 2)) timeout = -1.0;
        else {
            clock_gettime(CLOCK_MONOTONIC, &deadline);
            deadline.tv_sec += (time_t)whole;
            deadline.tv_nsec += (long)((timeout - whole) * 1e9); /* < 1e9 + rounding: one carry is enough */
            if (deadline.tv_nsec >= 1000000000L) {
                deadline.tv_sec += 1;
                deadline.tv_nsec -= 1000000000L;
            }
        }
    }
    if (count != NULL) {
        __atomic_fetch_add(count, 1, __ATOMIC_SEQ_CST);
        if (marker != NULL) __atomic_store_n(marker, (uint64_t)((char *)count - self->base) + 1, __ATOMIC_SEQ_CST);
    }
    PyObject *result = NULL;
    for (;;) {
        const struct timespec *limit = NULL;
        if (timeout >= 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            rel.tv_sec = deadline.tv_sec - now.tv_sec;
            rel.tv_nsec = deadline.tv_nsec - now.tv_nsec;
            if (rel.tv_nsec < 0) {
                rel.tv_sec -= 1;
                rel.tv_nsec += 1000000000L;
            }
            /* Past the deadline: a zero timeout, so the kernel still compares the word
             * (EAGAIN: it differs, True) before it times out at once (False). */
            if (rel.tv_sec < 0) rel.tv_sec = rel.tv_nsec = 0;
            limit = &rel; /* FUTEX_WAIT's timeout is relative, on CLOCK_MONOTONIC */
        }
        long rc;
        int err;
        Py_BEGIN_ALLOW_THREADS
        rc = futex(p, FUTEX_WAIT, (uint32_t)expected, limit);
        err = errno;
        Py_END_ALLOW_THREADS
        if (rc == 0 || err == EAGAIN) { /* woken, or the word had changed */
            result = Py_True;
            break;
        }
        if (err == ETIMEDOUT) {
            result = Py_False;
            break;
        }
        if (err == EINTR) {
            if (PyErr_CheckSignals() < 0) break; /* a handler raised: the wait ends with it */
            continue;
        }
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        break;
    }
    if (count != NULL) {
        if (marker != NULL) __atomic_store_n(marker, 0, __ATOMIC_SEQ_CST);
        __atomic_fetch_sub(count, 1, __ATOMIC_SEQ_CST);
    }
    Py_XINCREF(result);
    return result;
}

/* wake(offset, n) -> how many waiters were woken (n < 0: all). */
static PyObject *region_wake(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs("wake(offset, n)", nargs, 2, 2) < 0) return NULL;
    uint32_t *p = word(self, args[0], 4, "wake");
    if (p == NULL) return NULL;
    long long n;
    if (signed_arg(args[1], "wake", args[0], "n", &n) < 0) return NULL;
    long rc = futex(p, FUTEX_WAKE, n < 0 || n > INT_MAX ? (uint32_t)INT_MAX : (uint32_t)n, NULL);
    if (rc < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(rc);
}

static PyObject *region_len(Region *self, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(self->size);
}

static PyMethodDef region_methods[] = {
    {"load", (PyCFunction)region_load, METH_O, "load(offset) -> the 64-bit word at offset (atomic)."},
    {"load32", (PyCFunction)region_load32, METH_O, "load32(offset) -> the 32-bit word at offset (atomic)."},
    {"store", (PyCFunction)(void (*)(void))region_store, METH_FASTCALL, "store(offset, value): atomic 64-bit store."},
    {"store32", (PyCFunction)(void (*)(void))region_store32, METH_FASTCALL, "store32(offset, value): atomic 32-bit store."},
    {"cas", (PyCFunction)(void (*)(void))region_cas, METH_FASTCALL,
     "cas(offset, expected, desired) -> the value found; replaced by desired iff it equals expected."},
    {"cas32", (PyCFunction)(void (*)(void))region_cas32, METH_FASTCALL,
     "cas32(offset, expected, desired) -> the 32-bit value found; replaced by desired iff it equals expected."},
    {"add", (PyCFunction)(void (*)(void))region_add, METH_FASTCALL,
     "add(offset, delta) -> the 64-bit value before adding delta (signed; wraps modulo 2**64)."},
    {"add32", (PyCFunction)(void (*)(void))region_add32, METH_FASTCALL,
     "add32(offset, delta) -> the 32-bit value before adding delta (signed; wraps modulo 2**32)."},
    {"wait", (PyCFunction)(void (*)(void))region_wait, METH_FASTCALL,
     "wait(offset, expected, timeout=None, waiters=None, mark=None) -> bool: futex-sleep while the 32-bit\n"
     "word equals expected; False if timeout seconds ran out. May return True spuriously. The 32-bit count\n"
     "at waiters is raised while asleep, and the 64-bit word at mark holds waiters + 1 meanwhile."},
    {"wake", (PyCFunction)(void (*)(void))region_wake, METH_FASTCALL,
     "wake(offset, n) -> number woken: futex-wake up to n (< 0: all) waiters on the 32-bit word."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef region_getset[] = {
    {"size", (getter)region_len, NULL, "bytes in the region", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RegionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmchannel._native.Region",
    .tp_basicsize = sizeof(Region),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Region(buffer): sequentially consistent atomics and futex wait/wake on a writable buffer\n"
              "(8-byte aligned), kept exported while the Region lives. Offsets are checked: in bounds\n"
              "and aligned to the word (8 bytes, or 4 for the *32 operations and futex words).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)region_init,
    .tp_dealloc = (destructor)region_dealloc,
    .tp_methods = region_methods,
    .tp_getset = region_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "Atomics and futex on shared memory (see _native.c).", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&RegionType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&RegionType);
    if (PyModule_AddObject(m, "Region", (PyObject *)&RegionType) < 0) {
        Py_DECREF(&RegionType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
