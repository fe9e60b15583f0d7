/*
 * One pass in C over a JSON text: the byte-level reads of the answer path.
 *
 * The Python functions of gateway/core (strict_json.has_duplicate_keys, view.spans_of) stay
 * the reference; gateway/core/native.py calls these when the module is built and
 * GATEWAY_NATIVE is not 0. Every function here answers only for a text it has read whole as
 * strict JSON (RFC 8259, as orjson reads it); for anything else (a malformed text, invalid
 * UTF-8, a lone surrogate escape, nesting deeper than MAX_DEPTH, a number that may not fit a
 * double) it returns None: "cannot tell", and the Python path decides.
 *
 * The reader is iterative (an explicit stack, no recursion) and checks every index against
 * the text's length before reading it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 512          /* orjson refuses past 1024 */
#define MAX_DIGITS 200         /* digits of a number's mantissa, beyond which it is refused */
#define MAX_EXPONENT_DIGITS 2  /* 200 digits and |e| <= 99 stay below DBL_MAX */
#define SMALL_OBJECT 8         /* keys compared pairwise up to this many, hashed beyond */

typedef unsigned char uchar;

/* Outcomes of the reader: the text is read (OK), cannot be vouched for (REFUSED), or memory ran
 * out (FAILED, with a Python exception set). */
enum { OK = 1, REFUSED = 0, FAILED = -1 };

enum { WANT_DUPLICATES = 1, WANT_ENTRIES = 2, WANT_DISPLAY = 4 };

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buffer;

typedef struct {
    Py_ssize_t off, len;
} Span;

typedef struct {
    Span *items;
    Py_ssize_t len, cap;
} Spans;

typedef struct {
    char kind;              /* '{' or '[' */
    char is_entries;        /* the top-level object's "entry" array */
    Py_ssize_t start;       /* offset of the bracket */
    Py_ssize_t keys_base;   /* first of this object's keys in Reader.keys */
    Py_ssize_t arena_base;  /* where its key bytes start in Reader.arena */
} Frame;

typedef struct {
    const uchar *s;
    Py_ssize_t n, pos;
    int want;
    int duplicate;           /* some object names a key twice */
    int entries_found;       /* the top-level object's "entry" is an array */
    int has_display;         /* the top-level object has a "display" key */
    int unsupported;         /* refused for a limit of this reader (depth, a number), not as malformed */
    Buffer arena;            /* unescaped key bytes of the open objects */
    Spans keys;              /* the open objects' keys, as spans of arena */
    Spans entries;           /* the entry items' spans in s */
    int depth;
    Frame stack[MAX_DEPTH];
} Reader;

static int buffer_reserve(Buffer *b, Py_ssize_t more) {
    if (more > PY_SSIZE_T_MAX - b->len) {
        PyErr_NoMemory();
        return FAILED;
    }
    Py_ssize_t need = b->len + more;
    if (need <= b->cap)
        return OK;
    Py_ssize_t cap = b->cap ? b->cap : 256;
    while (cap < need) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            cap = need;
            break;
        }
        cap *= 2;
    }
    char *data = PyMem_Realloc(b->data, (size_t)cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return FAILED;
    }
    b->data = data;
    b->cap = cap;
    return OK;
}

static int spans_push(Spans *a, Py_ssize_t off, Py_ssize_t len) {
    if (a->len == a->cap) {
        Py_ssize_t cap = a->cap ? a->cap * 2 : 64;
        if ((size_t)cap > PY_SSIZE_T_MAX / sizeof(Span)) {
            PyErr_NoMemory();
            return FAILED;
        }
        Span *items = PyMem_Realloc(a->items, (size_t)cap * sizeof(Span));
        if (items == NULL) {
            PyErr_NoMemory();
            return FAILED;
        }
        a->items = items;
        a->cap = cap;
    }
    a->items[a->len].off = off;
    a->items[a->len].len = len;
    a->len++;
    return OK;
}

static void reader_free(Reader *r) {
    PyMem_Free(r->arena.data);
    PyMem_Free(r->keys.items);
    PyMem_Free(r->entries.items);
}


static inline int hex_value(uchar c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Four hex digits at s[at..at+3], or -1. */
static long hex4(const Reader *r, Py_ssize_t at) {
    if (at < 0 || r->n - at < 4)
        return -1;
    long v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hex_value(r->s[at + i]);
        if (h < 0)
            return -1;
        v = v * 16 + h;
    }
    return v;
}

/* The length of the well-formed UTF-8 sequence starting at s[at] (a byte >= 0x80), or 0. */
static int utf8_length(const Reader *r, Py_ssize_t at) {
    const uchar *s = r->s;
    Py_ssize_t left = r->n - at;
    uchar c = s[at];
    uchar lo = 0x80, hi = 0xBF;
    int len;
    if (c >= 0xC2 && c <= 0xDF)
        len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F; /* no UTF-16 surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else
        return 0;
    if (left < len)
        return 0;
    if (s[at + 1] < lo || s[at + 1] > hi)
        return 0;
    for (int i = 2; i < len; i++)
        if (s[at + i] < 0x80 || s[at + i] > 0xBF)
            return 0;
    return len;
}

static int put_code_point(Buffer *out, long cp) {
    uchar b[4];
    Py_ssize_t len;
    if (cp < 0x80) {
        b[0] = (uchar)cp;
        len = 1;
    } else if (cp < 0x800) {
        b[0] = (uchar)(0xC0 | (cp >> 6));
        b[1] = (uchar)(0x80 | (cp & 0x3F));
        len = 2;
    } else if (cp < 0x10000) {
        b[0] = (uchar)(0xE0 | (cp >> 12));
        b[1] = (uchar)(0x80 | ((cp >> 6) & 0x3F));
        b[2] = (uchar)(0x80 | (cp & 0x3F));
        len = 3;
    } else {
        b[0] = (uchar)(0xF0 | (cp >> 18));
        b[1] = (uchar)(0x80 | ((cp >> 12) & 0x3F));
        b[2] = (uchar)(0x80 | ((cp >> 6) & 0x3F));
        b[3] = (uchar)(0x80 | (cp & 0x3F));
        len = 4;
    }
    if (buffer_reserve(out, len) != OK)
        return FAILED;
    memcpy(out->data + out->len, b, (size_t)len);
    out->len += len;
    return OK;
}

static int put_bytes(Buffer *out, const uchar *from, Py_ssize_t len) {
    if (len == 0)
        return OK;
    if (buffer_reserve(out, len) != OK)
        return FAILED;
    memcpy(out->data + out->len, from, (size_t)len);
    out->len += len;
    return OK;
}

/* Bytes a string's plain run stops at: the quote, the backslash, control and non-ASCII bytes. */
static uchar STOPS[256];

static void fill_stops(void) {
    for (int c = 0; c < 256; c++)
        STOPS[c] = c == '"' || c == '\\' || c < 0x20 || c >= 0x80;
}

static void fill_space(void);

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && defined(__GNUC__)
#define WORDS 1
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

/* The high bit of each byte of w that STOPS holds; the lowest one set is exact (a borrow only
 * marks bytes above a marked one). */
static inline uint64_t stops_in(uint64_t w) {
    uint64_t quote = w ^ (ONES * '"'), backslash = w ^ (ONES * '\\');
    return (((quote - ONES) & ~quote) | ((backslash - ONES) & ~backslash) | ((w - ONES * 0x20) & ~w) | w) & HIGHS;
}
#endif

/* A string at r->pos (its opening quote); its unescaped UTF-8 bytes appended to out (when not
 * NULL). On OK, r->pos is past the closing quote. */
static int read_string(Reader *r, Buffer *out, int *escaped) {
    const uchar *s = r->s;
    Py_ssize_t n = r->n, pos = r->pos + 1;
    for (;;) {
        Py_ssize_t run = pos;
#ifdef WORDS
        while (n - pos >= 8) {
            uint64_t w;
            memcpy(&w, s + pos, 8);
            uint64_t stops = stops_in(w);
            if (stops) {
                pos += __builtin_ctzll(stops) >> 3;
                break;
            }
            pos += 8;
        }
#endif
        while (pos < n && !STOPS[s[pos]])
            pos++;
        if (out != NULL && put_bytes(out, s + run, pos - run) != OK)
            return FAILED;
        if (pos >= n)
            return REFUSED;
        uchar c = s[pos];
        if (c == '"') {
            r->pos = pos + 1;
            return OK;
        }
        if (c < 0x20)
            return REFUSED;
        if (c >= 0x80) {
            int len = utf8_length(r, pos);
            if (len == 0)
                return REFUSED;
            if (out != NULL && put_bytes(out, s + pos, len) != OK)
                return FAILED;
            pos += len;
            continue;
        }
        /* a backslash */
        *escaped = 1;
        if (n - pos < 2)
            return REFUSED;
        uchar e = s[pos + 1];
        uchar plain;
        switch (e) {
        case '"': plain = '"'; break;
        case '\\': plain = '\\'; break;
        case '/': plain = '/'; break;
        case 'b': plain = '\b'; break;
        case 'f': plain = '\f'; break;
        case 'n': plain = '\n'; break;
        case 'r': plain = '\r'; break;
        case 't': plain = '\t'; break;
        case 'u': {
            long cp = hex4(r, pos + 2);
            if (cp < 0)
                return REFUSED;
            pos += 6;
            if (cp >= 0xDC00 && cp <= 0xDFFF)
                return REFUSED; /* a low surrogate alone */
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (n - pos < 6 || s[pos] != '\\' || s[pos + 1] != 'u')
                    return REFUSED; /* a high surrogate alone */
                long low = hex4(r, pos + 2);
                if (low < 0xDC00 || low > 0xDFFF)
                    return REFUSED;
                pos += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            }
            if (out != NULL && put_code_point(out, cp) != OK)
                return FAILED;
            continue;
        }
        default:
            return REFUSED;
        }
        if (out != NULL && put_bytes(out, &plain, 1) != OK)
            return FAILED;
        pos += 2;
    }
}

static int read_number(Reader *r) {
    const uchar *s = r->s;
    Py_ssize_t n = r->n, pos = r->pos, digits = 0;
    if (pos < n && s[pos] == '-')
        pos++;
    if (pos >= n)
        return REFUSED;
    if (s[pos] == '0') {
        pos++;
        digits = 1;
    } else if (s[pos] >= '1' && s[pos] <= '9') {
        while (pos < n && s[pos] >= '0' && s[pos] <= '9') {
            pos++;
            digits++;
        }
    } else
        return REFUSED;
    if (pos < n && s[pos] == '.') {
        pos++;
        Py_ssize_t before = digits;
        while (pos < n && s[pos] >= '0' && s[pos] <= '9') {
            pos++;
            digits++;
        }
        if (digits == before)
            return REFUSED;
    }
    if (pos < n && (s[pos] == 'e' || s[pos] == 'E')) {
        pos++;
        if (pos < n && (s[pos] == '+' || s[pos] == '-'))
            pos++;
        Py_ssize_t exponent = 0;
        while (pos < n && s[pos] >= '0' && s[pos] <= '9') {
            pos++;
            exponent++;
        }
        if (exponent == 0)
            return REFUSED;
        if (exponent > MAX_EXPONENT_DIGITS) {
            r->unsupported = 1;
            return REFUSED;
        }
    }
    if (digits > MAX_DIGITS) {
        r->unsupported = 1;
        return REFUSED;
    }
    r->pos = pos;
    return OK;
}

static int read_literal(Reader *r, const char *word, Py_ssize_t len) {
    if (r->n - r->pos < len || memcmp(r->s + r->pos, word, (size_t)len) != 0)
        return REFUSED;
    r->pos += len;
    return OK;
}

/* A key's bytes: in the text when it has no escape (off >= 0), unescaped in the arena when it
 * has one (off = -1 - its arena offset). */
static inline const char *key_bytes(const Reader *r, const Span *k) {
    return k->off >= 0 ? (const char *)r->s + k->off : r->arena.data + (-1 - k->off);
}

static inline int same_key(const Reader *r, const Span *a, const Span *b) {
    return a->len == b->len && memcmp(key_bytes(r, a), key_bytes(r, b), (size_t)a->len) == 0;
}

static uint64_t key_hash(const Reader *r, const Span *k) {
    const uchar *p = (const uchar *)key_bytes(r, k);
    uint64_t h = 1469598103934665603ULL;
    for (Py_ssize_t i = 0; i < k->len; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* Whether the keys of the object being closed (keys[base:]) name one key twice. */
static int object_repeats(Reader *r, Py_ssize_t base) {
    Span *keys = r->keys.items + base;
    Py_ssize_t count = r->keys.len - base;
    if (count < 2)
        return 0;
    if (count <= SMALL_OBJECT) {
        for (Py_ssize_t i = 1; i < count; i++)
            for (Py_ssize_t j = 0; j < i; j++)
                if (same_key(r, keys + i, keys + j))
                    return 1;
        return 0;
    }
    size_t size = 16;
    while (size < (size_t)count * 2)
        size *= 2;
    Py_ssize_t *table = PyMem_Malloc(size * sizeof(Py_ssize_t));
    if (table == NULL) {
        PyErr_NoMemory();
        return FAILED;
    }
    for (size_t i = 0; i < size; i++)
        table[i] = -1;
    int repeats = 0;
    for (Py_ssize_t i = 0; i < count && !repeats; i++) {
        size_t slot = (size_t)key_hash(r, keys + i) & (size - 1);
        while (table[slot] >= 0) {
            if (same_key(r, keys + i, keys + table[slot])) {
                repeats = 1;
                break;
            }
            slot = (slot + 1) & (size - 1);
        }
        table[slot] = i;
    }
    PyMem_Free(table);
    return repeats;
}


/* Whitespace JSON allows between tokens. */
static uchar SPACE[256];

/* The first byte at or after pos that ends a string's plain run (STOPS), or n. */
static inline Py_ssize_t plain_run(const uchar *s, Py_ssize_t n, Py_ssize_t pos) {
#ifdef WORDS
    while (n - pos >= 8) {
        uint64_t w;
        memcpy(&w, s + pos, 8);
        uint64_t stops = stops_in(w);
        if (stops)
            return pos + (__builtin_ctzll(stops) >> 3);
        pos += 8;
    }
#endif
    while (pos < n && !STOPS[s[pos]])
        pos++;
    return pos;
}

/* Reads the whole text; OK when it is one JSON value and nothing else. Positions are kept in
 * locals (r->pos only around the calls that read a string with escapes or a number). */
static int read_text(Reader *r) {
    const uchar *s = r->s;
    const Py_ssize_t n = r->n;
    const int duplicates = r->want & WANT_DUPLICATES, entries = r->want & WANT_ENTRIES, display = r->want & WANT_DISPLAY;
    Frame *stack = r->stack;
    Py_ssize_t pos = 0, start;
    int ok, depth = 0, is_entry = 0, escaped = 0;
#define SKIP_SPACE() while (pos < n && SPACE[s[pos]]) pos++
    SKIP_SPACE();
    for (;;) {
        /* a value at pos */
        if (pos >= n)
            return REFUSED;
        start = pos;
        if (is_entry && depth == 1) {
            r->entries_found = 0; /* until it is seen to be an array */
            r->entries.len = 0;
        }
        switch (s[pos]) {
        case '{':
        case '[': {
            if (depth >= MAX_DEPTH) {
                r->unsupported = 1;
                return REFUSED;
            }
            Frame *f = &stack[depth++];
            uchar kind = s[pos];
            f->kind = (char)kind;
            f->is_entries = 0;
            f->start = pos;
            f->keys_base = r->keys.len;
            f->arena_base = r->arena.len;
            if (kind == '[' && is_entry && depth == 2) {
                f->is_entries = 1;
                r->entries_found = 1;
            }
            pos++;
            SKIP_SPACE();
            if (pos < n && s[pos] == (kind == '{' ? '}' : ']')) {
                pos++;
                depth--;
                goto after_value;
            }
            if (kind == '{')
                goto key;
            continue;
        }
        case '"': {
            Py_ssize_t stop = plain_run(s, n, pos + 1);
            if (stop < n && s[stop] == '"') {
                pos = stop + 1;
                ok = OK;
            } else {
                r->pos = pos;
                ok = read_string(r, NULL, &escaped);
                pos = r->pos;
            }
            break;
        }
        case 't':
        case 'f':
        case 'n':
            r->pos = pos;
            ok = s[pos] == 't' ? read_literal(r, "true", 4) : s[pos] == 'f' ? read_literal(r, "false", 5)
                                                                           : read_literal(r, "null", 4);
            pos = r->pos;
            break;
        default:
            r->pos = pos;
            ok = read_number(r);
            pos = r->pos;
            break;
        }
        if (ok != OK)
            return ok;
    after_value:
        /* the value [start, pos) is read */
        if (depth == 0) {
            SKIP_SPACE();
            return pos == n ? OK : REFUSED;
        }
        if (stack[depth - 1].is_entries && (ok = spans_push(&r->entries, start, pos - start)) != OK)
            return ok;
        is_entry = 0;
        SKIP_SPACE();
        if (pos >= n)
            return REFUSED;
        {
            Frame *top = &stack[depth - 1];
            uchar c = s[pos++];
            if (c == ',') {
                SKIP_SPACE();
                if (top->kind == '[')
                    continue;
                goto key;
            }
            if (c != (top->kind == '[' ? ']' : '}'))
                return REFUSED;
            start = top->start;
            if (top->kind == '{' && duplicates) {
                int repeats = object_repeats(r, top->keys_base);
                if (repeats < 0)
                    return FAILED;
                r->duplicate |= repeats;
                r->keys.len = top->keys_base;
                r->arena.len = top->arena_base;
            }
            depth--;
            goto after_value;
        }
    key:
        /* a key at pos, in the object stack[depth - 1] */
        if (pos >= n || s[pos] != '"')
            return REFUSED;
        {
            Py_ssize_t off = pos + 1, len, stop = plain_run(s, n, pos + 1);
            if (stop < n && s[stop] == '"') {
                len = stop - off;
                pos = stop + 1;
            } else {
                /* escapes (or bytes to check): read again, unescaped into the arena */
                Py_ssize_t from = r->arena.len;
                r->pos = pos;
                if ((ok = read_string(r, &r->arena, &escaped)) != OK)
                    return ok;
                pos = r->pos;
                len = r->arena.len - from;
                off = -1 - from;
            }
            Span k = {off, len};
            is_entry = entries && depth == 1 && len == 5 && memcmp(key_bytes(r, &k), "entry", 5) == 0;
            if (display && depth == 1 && len == 7 && memcmp(key_bytes(r, &k), "display", 7) == 0)
                r->has_display = 1;
            if (duplicates) {
                if ((ok = spans_push(&r->keys, off, len)) != OK)
                    return ok;
            } else if (off < 0)
                r->arena.len = -1 - off;
        }
        SKIP_SPACE();
        if (pos >= n || s[pos] != ':')
            return REFUSED;
        pos++;
        SKIP_SPACE();
    }
#undef SKIP_SPACE
}

static void fill_space(void) {
    SPACE[' '] = SPACE['\n'] = SPACE['\r'] = SPACE['\t'] = 1;
}

/* A reader with no buffers yet (reader_free frees them). */
static Reader *reader_new(void) {
    Reader *r = PyMem_Malloc(sizeof(Reader));
    if (r == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memset(r, 0, offsetof(Reader, stack));
    return r;
}

/* Reads s[:n] with r, whose buffers (if any) are kept for reuse. */
static int read_range(const uchar *s, Py_ssize_t n, Reader *r, int want) {
    r->pos = 0;
    r->duplicate = r->entries_found = r->has_display = r->unsupported = 0;
    r->arena.len = r->keys.len = r->entries.len = 0;
    r->depth = 0;
    r->s = s;
    r->n = n;
    r->want = want;
    return read_text(r);
}

static int read_bytes(PyObject *raw, Reader *r, int want) {
    return read_range((const uchar *)PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), r, want);
}

PyDoc_STRVAR(duplicate_keys_doc,
"duplicate_keys(raw: bytes) -> bool | None\n\n"
"Whether the JSON text names a key twice in one object (keys compared unescaped); None when\n"
"the text cannot be read as strict JSON here (the Python check decides).");

static PyObject *duplicate_keys(PyObject *Py_UNUSED(module), PyObject *raw) {
    if (!PyBytes_CheckExact(raw)) {
        PyErr_SetString(PyExc_TypeError, "duplicate_keys() takes bytes");
        return NULL;
    }
    Reader *r = reader_new();
    if (r == NULL)
        return NULL;
    int ok = read_bytes(raw, r, WANT_DUPLICATES);
    int duplicate = r->duplicate;
    reader_free(r);
    PyMem_Free(r);
    if (ok == FAILED)
        return NULL;
    if (ok == REFUSED)
        Py_RETURN_NONE;
    return PyBool_FromLong(duplicate);
}

PyDoc_STRVAR(entry_spans_doc,
"entry_spans(raw: bytes, wrap: Callable[[bytes], T]) -> list[T] | None\n\n"
"The texts of the items of the top-level object's \"entry\" array, each passed to wrap; None\n"
"when the text cannot be read as strict JSON here or has no such array.");

static PyObject *entry_spans(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "entry_spans() takes bytes and a callable");
        return NULL;
    }
    PyObject *raw = args[0], *wrap = args[1];
    Reader *r = reader_new();
    if (r == NULL)
        return NULL;
    int ok = read_bytes(raw, r, WANT_ENTRIES);
    PyObject *out = NULL;
    if (ok == REFUSED || (ok == OK && !r->entries_found)) {
        out = Py_NewRef(Py_None);
    } else if (ok == OK) {
        out = PyList_New(r->entries.len);
        const char *base = PyBytes_AS_STRING(raw);
        for (Py_ssize_t i = 0; out != NULL && i < r->entries.len; i++) {
            Span e = r->entries.items[i];
            PyObject *text = PyBytes_FromStringAndSize(base + e.off, e.len);
            PyObject *item = text == NULL ? NULL : PyObject_CallOneArg(wrap, text);
            Py_XDECREF(text);
            if (item == NULL)
                Py_CLEAR(out);
            else
                PyList_SET_ITEM(out, i, item);
        }
    }
    reader_free(r);
    PyMem_Free(r);
    return out;
}

PyDoc_STRVAR(index_entries_doc,
"index_entries(raw, entries, wrap, whole_types, content_max, spans, rewritten, content, check) -> int | None\n\n"
"What view.spans_of indexes, in one pass over raw: for each item of entries (the parsed\n"
"top-level \"entry\" list, one dict per item of raw's), spans[id(entry)] = wrap(its text);\n"
"id(entry) added to rewritten when its resource's resourceType is in whole_types, else\n"
"content[id(resource)] = its text when at most content_max bytes. With check true, the same\n"
"pass checks every object of raw for a repeated key (strict_json.has_duplicate_keys).\n"
"Returns 1 when indexed; 0 when raw does not match entries (or an entry is no dict: spans,\n"
"rewritten and content may then be partly filled, the caller drops them); 2 when check is\n"
"true and raw repeats a key (nothing filled); None (nothing filled) when raw cannot be read\n"
"here.");

static int index_entry(PyObject *entry, PyObject *text, PyObject *wrap, PyObject *whole_types,
                       Py_ssize_t content_max, PyObject *spans, PyObject *rewritten, PyObject *content) {
    /* 1 indexed, 0 the entry is not a dict, -1 an exception is set */
    static PyObject *resource_key = NULL, *type_key = NULL;
    if (resource_key == NULL && (resource_key = PyUnicode_InternFromString("resource")) == NULL)
        return -1;
    if (type_key == NULL && (type_key = PyUnicode_InternFromString("resourceType")) == NULL)
        return -1;
    if (!PyDict_CheckExact(entry))
        return 0;
    PyObject *key = PyLong_FromVoidPtr(entry);
    if (key == NULL)
        return -1;
    int failed = 0;
    PyObject *item = PyObject_CallOneArg(wrap, text);
    if (item == NULL || PyDict_SetItem(spans, key, item) < 0)
        failed = 1;
    Py_XDECREF(item);
    PyObject *resource = failed ? NULL : PyDict_GetItemWithError(entry, resource_key);
    if (resource == NULL && PyErr_Occurred())
        failed = 1;
    if (!failed && resource != NULL && PyDict_CheckExact(resource)) {
        PyObject *rtype = PyDict_GetItemWithError(resource, type_key);
        int whole = 0;
        if (rtype == NULL && PyErr_Occurred())
            failed = 1;
        else if (rtype != NULL && PyUnicode_CheckExact(rtype)) {
            whole = PySet_Contains(whole_types, rtype);
            if (whole < 0)
                failed = 1;
        }
        if (!failed && whole) {
            if (PySet_Add(rewritten, key) < 0)
                failed = 1;
        } else if (!failed && PyBytes_GET_SIZE(text) <= content_max) {
            PyObject *rkey = PyLong_FromVoidPtr(resource);
            if (rkey == NULL || PyDict_SetItem(content, rkey, text) < 0)
                failed = 1;
            Py_XDECREF(rkey);
        }
    }
    Py_DECREF(key);
    return failed ? -1 : 1;
}

static PyObject *index_entries(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9 || !PyBytes_CheckExact(args[0]) || !PyList_CheckExact(args[1]) || !PyAnySet_Check(args[3])
        || !PyLong_Check(args[4]) || !PyDict_CheckExact(args[5]) || !PySet_Check(args[6]) || !PyDict_CheckExact(args[7])) {
        PyErr_SetString(PyExc_TypeError,
                        "index_entries() takes bytes, a list, a callable, a set, an int, a dict, a set, a dict and a bool");
        return NULL;
    }
    PyObject *raw = args[0], *entries = args[1], *wrap = args[2], *whole_types = args[3];
    Py_ssize_t content_max = PyLong_AsSsize_t(args[4]);
    if (content_max == -1 && PyErr_Occurred())
        return NULL;
    int check = PyObject_IsTrue(args[8]);
    if (check < 0)
        return NULL;
    Reader *r = reader_new();
    if (r == NULL)
        return NULL;
    int ok = read_bytes(raw, r, WANT_ENTRIES | (check ? WANT_DUPLICATES : 0));
    PyObject *out = NULL;
    if (ok == FAILED)
        goto done;
    if (ok == REFUSED || !r->entries_found) {
        out = Py_NewRef(Py_None); /* cannot tell: the Python path reads it */
        goto done;
    }
    if (r->duplicate) {
        out = PyLong_FromLong(2);
        goto done;
    }
    if (r->entries.len != PyList_GET_SIZE(entries)) {
        out = PyLong_FromLong(0);
        goto done;
    }
    const char *base = PyBytes_AS_STRING(raw);
    for (Py_ssize_t i = 0; i < r->entries.len; i++) {
        if (i >= PyList_GET_SIZE(entries)) { /* the list changed under a callback */
            out = PyLong_FromLong(0);
            goto done;
        }
        Span e = r->entries.items[i];
        PyObject *text = PyBytes_FromStringAndSize(base + e.off, e.len);
        if (text == NULL)
            goto done;
        PyObject *entry = Py_NewRef(PyList_GET_ITEM(entries, i));
        int indexed = index_entry(entry, text, wrap, whole_types, content_max, args[5], args[6], args[7]);
        Py_DECREF(entry);
        Py_DECREF(text);
        if (indexed < 0)
            goto done;
        if (indexed == 0) {
            out = PyLong_FromLong(0);
            goto done;
        }
    }
    out = PyLong_FromLong(1);
done:
    reader_free(r);
    PyMem_Free(r);
    return out;
}

/* ------------------------------------------------------------------ references and displays */

static const uchar REFERENCE_KEY[] = "\"reference\"";
#define REFERENCE_KEY_LEN 11

/* Where "reference" (quoted) next occurs in s[from:n], or -1. */
static Py_ssize_t find_reference_key(const uchar *s, Py_ssize_t n, Py_ssize_t from) {
    if (from > n - REFERENCE_KEY_LEN)
        return -1;
    const uchar *hit = memmem(s + from, (size_t)(n - from), REFERENCE_KEY, REFERENCE_KEY_LEN);
    return hit == NULL ? -1 : hit - s;
}

/* Python's bytes \s: space, \t, \n, \r, \v, \f. */
static inline int regex_space(uchar c) {
    return c == ' ' || (c >= '\t' && c <= '\r');
}

/* references._REFERENCE matched at s[at] (where "reference" occurs): the value's span (between
 * its quotes) and the match's end, or 0. Exactly rb'"reference"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"'
 * (its "." takes any byte but a newline). */
static int match_reference(const uchar *s, Py_ssize_t n, Py_ssize_t at, Py_ssize_t *value, Py_ssize_t *value_end,
                           Py_ssize_t *end) {
    Py_ssize_t pos = at + REFERENCE_KEY_LEN;
    while (pos < n && regex_space(s[pos]))
        pos++;
    if (pos >= n || s[pos] != ':')
        return 0;
    pos++;
    while (pos < n && regex_space(s[pos]))
        pos++;
    if (pos >= n || s[pos] != '"')
        return 0;
    pos++;
    *value = pos;
    while (pos < n) {
        uchar c = s[pos];
        if (c == '"') {
            *value_end = pos;
            *end = pos + 1;
            return 1;
        }
        if (c == '\\') {
            if (pos + 1 >= n || s[pos + 1] == '\n')
                return 0;
            pos += 2;
        } else
            pos++;
    }
    return 0;
}

/* references._may_have_display: 1 when the object around the match s[start:end] may have a
 * display, 0 when not, -1 when this reader cannot tell. */
static int may_have_display(const uchar *s, Py_ssize_t n, Py_ssize_t start, Py_ssize_t end, Reader *r) {
    if (start >= 1 && s[start - 1] == '{' && start + 13 <= n && s[start + 11] == ':' && s[start + 12] == '"'
        && end < n && s[end] == '}')
        return 0; /* the object is {"reference":"..."} and nothing else */
    Py_ssize_t first = start - 1;
    while (first >= 0 && s[first] != '{')
        first--;
    const uchar *close = end < n ? memchr(s + end, '}', (size_t)(n - end)) : NULL;
    if (first < 0 || close == NULL)
        return 1;
    Py_ssize_t last = close - s;
    int ok = read_range(s + first, last + 1 - first, r, WANT_DISPLAY);
    if (ok == FAILED)
        return -2;
    if (ok == REFUSED)
        return r->unsupported ? -1 : 1; /* orjson would not read it either: it may */
    return r->has_display;
}

PyDoc_STRVAR(reference_displays_doc,
"reference_displays(raw: bytes) -> dict[bytes, bool] | bool | None\n\n"
"What references.unreleased_named reads of raw's bytes: each distinct value of the\n"
"references._REFERENCE pattern (as written), with whether the object around any of its matches\n"
"may have a display (references._may_have_display); False when the pattern matches fewer\n"
"times than \"reference\" (quoted) occurs; None when an object text read around a match is\n"
"beyond this reader's limits (the Python path reads it). Any bytes: the pattern is matched as\n"
"Python matches it, the object texts are read as orjson reads them.");

static PyObject *reference_displays(PyObject *Py_UNUSED(module), PyObject *raw) {
    if (!PyBytes_CheckExact(raw)) {
        PyErr_SetString(PyExc_TypeError, "reference_displays() takes bytes");
        return NULL;
    }
    Reader *r = reader_new();
    if (r == NULL)
        return NULL;
    /* The pattern and the count are matched on the bytes as they are, exactly as Python does
     * (no reading of the whole text is needed for that); only the object texts around matches
     * are read as JSON. */
    PyObject *out = NULL;
    const uchar *s = (const uchar *)PyBytes_AS_STRING(raw);
    Py_ssize_t n = PyBytes_GET_SIZE(raw), occurrences = 0, matches = 0;
    for (Py_ssize_t at = find_reference_key(s, n, 0); at >= 0; at = find_reference_key(s, n, at + REFERENCE_KEY_LEN))
        occurrences++;
    out = PyDict_New();
    if (out == NULL)
        goto done;
    Py_ssize_t from = 0;
    for (;;) {
        Py_ssize_t at = find_reference_key(s, n, from), value, value_end, end;
        if (at < 0)
            break;
        if (!match_reference(s, n, at, &value, &value_end, &end)) {
            from = at + 1;
            continue;
        }
        matches++;
        from = end;
        int may = may_have_display(s, n, at, end, r);
        if (may == -2) {
            Py_CLEAR(out);
            goto done;
        }
        if (may < 0) {
            Py_SETREF(out, Py_NewRef(Py_None));
            goto done;
        }
        PyObject *key = PyBytes_FromStringAndSize((const char *)s + value, value_end - value);
        if (key == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyObject *seen = PyDict_GetItemWithError(out, key);
        int failed = 0;
        if (seen == NULL && PyErr_Occurred())
            failed = 1;
        else if (seen == NULL || (seen == Py_False && may))
            failed = PyDict_SetItem(out, key, may ? Py_True : Py_False) < 0;
        Py_DECREF(key);
        if (failed) {
            Py_CLEAR(out);
            goto done;
        }
    }
    if (matches != occurrences)
        Py_SETREF(out, Py_NewRef(Py_False));
done:
    reader_free(r);
    PyMem_Free(r);
    return out;
}

static PyMethodDef methods[] = {
    {"duplicate_keys", (PyCFunction)duplicate_keys, METH_O, duplicate_keys_doc},
    {"entry_spans", (PyCFunction)(void (*)(void))entry_spans, METH_FASTCALL, entry_spans_doc},
    {"reference_displays", (PyCFunction)reference_displays, METH_O, reference_displays_doc},
    {"index_entries", (PyCFunction)(void (*)(void))index_entries, METH_FASTCALL, index_entries_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "gateway.core._native",
    "The byte-level reads of the answer path in C (see gateway/core/native.py).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    fill_stops();
    fill_space();
    return PyModule_Create(&module);
}
