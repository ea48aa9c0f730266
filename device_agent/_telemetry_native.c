/* The telemetry recorder's request path in C (optional: device_agent.telemetry falls back to Python).

   Why C: on the digits CNN (~15-25 us an inference) the Python listener and its batched numpy summaries
   cost 4-6 %; the goal is 3 %. Here one call per request summarises the usual request in place: request
   count, latency bucket, the output's NaN count, class count and confidence bucket, and (for a sampled
   request) a copy of the input bytes, which Python summarises per feature in batches. Anything unusual
   (another model: ``fallback``; a non-dict mapping, a non-contiguous or odd-shaped array of the armed model:
   ``unusual``) goes to Python untouched, so both paths give the same windows (tests/agent/test_telemetry_exact.py
   runs both).

   Exactness: the arithmetic is the one device_agent.telemetry_summaries uses (float64; class sums in class
   order; confidence = the max of a probability row, else 1 / sum(exp(x - max)); buckets as
   bisect_right). Everything runs under the GIL and no Python code runs between the checks and the update,
   so a request is counted once, whole. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>
/* numpy's C API, not the buffer protocol: exporting a buffer of a fresh array builds its format string
   (~0.1-0.2 us, as much as everything else here together) */
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

static int numpy_ready = 0;

#define MAX_CLASSES 32 /* wider outputs stay on the Python path (its row-wise sums are pairwise) */
#define MAX_EDGES 64

typedef struct {
    PyObject_HEAD
    PyObject *fallback; /* fallback(model, inputs, outputs, latency_ns, take): a model this is not armed for */
    PyObject *unusual;  /* unusual(model, inputs, outputs, latency_ns, take): the armed model, an odd request */
    PyObject *on_full;  /* on_full(): the sampled rows reached the limit */
    PyObject *draw;     /* draw() -> float in [0, 1); NULL when every request is sampled */
    double rate;
    double lat_edges[MAX_EDGES], conf_edges[MAX_EDGES];
    Py_ssize_t n_lat, n_conf;
    /* armed: the model whose usual requests are summarised here */
    PyObject *model, *tag, *in_name, *out_name;
    int in_type, out_type; /* numpy type numbers */
    Py_ssize_t in_row_bytes, out_row_items, classes;
    int out_double;
    /* accumulated since the last take() */
    long long requests, errors, nan_count, sampled, class_rows;
    long long lat_counts[MAX_EDGES + 1], conf_counts[MAX_EDGES + 1], class_counts[MAX_CLASSES];
    PyObject *pending; /* list of bytes: sampled inputs, in recording order */
    Py_ssize_t pending_bytes;
    Py_ssize_t limit_rows, limit_bytes;
} Accumulator;

static int read_edges(PyObject *seq, double *out, Py_ssize_t *n) {
    PyObject *fast = PySequence_Fast(seq, "edges must be a sequence");
    if (!fast) return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(fast);
    if (len > MAX_EDGES) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "too many edges");
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        out[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
        if (out[i] == -1.0 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
    }
    *n = len;
    Py_DECREF(fast);
    return 0;
}

static Py_ssize_t bucket(const double *edges, Py_ssize_t n, double x) {
    Py_ssize_t i = 0; /* bisect_right: edges are sorted and few */
    while (i < n && edges[i] <= x) i++;
    return i;
}

static void reset_counts(Accumulator *self) {
    self->requests = self->errors = self->nan_count = self->sampled = self->class_rows = 0;
    memset(self->lat_counts, 0, sizeof self->lat_counts);
    memset(self->conf_counts, 0, sizeof self->conf_counts);
    memset(self->class_counts, 0, sizeof self->class_counts);
}

static void disarm(Accumulator *self) {
    Py_CLEAR(self->model);
    Py_CLEAR(self->tag);
    Py_CLEAR(self->in_name);
    Py_CLEAR(self->out_name);
}

static int Accumulator_init(Accumulator *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fallback", "unusual", "on_full", "draw", "rate", "latency_edges", "confidence_edges",
                             NULL};
    PyObject *fallback, *unusual, *on_full, *draw, *lat, *conf;
    double rate;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOdOO", kwlist, &fallback, &unusual, &on_full, &draw, &rate, &lat,
                                     &conf))
        return -1;
    if (!(rate > 0.0 && rate <= 1.0)) {
        PyErr_SetString(PyExc_ValueError, "rate must be in (0, 1]");
        return -1;
    }
    if (read_edges(lat, self->lat_edges, &self->n_lat) < 0 || read_edges(conf, self->conf_edges, &self->n_conf) < 0)
        return -1;
    Py_INCREF(fallback);
    Py_XSETREF(self->fallback, fallback);
    Py_INCREF(unusual);
    Py_XSETREF(self->unusual, unusual);
    Py_INCREF(on_full);
    Py_XSETREF(self->on_full, on_full);
    Py_CLEAR(self->draw);
    if (rate < 1.0) {
        Py_INCREF(draw);
        self->draw = draw;
    }
    self->rate = rate;
    PyObject *pending = PyList_New(0);
    if (!pending) return -1;
    Py_XSETREF(self->pending, pending);
    self->pending_bytes = 0;
    self->limit_rows = 64;
    self->limit_bytes = 4 << 20;
    disarm(self);
    reset_counts(self);
    return 0;
}

static int Accumulator_traverse(Accumulator *self, visitproc visit, void *arg) {
    Py_VISIT(self->fallback);
    Py_VISIT(self->unusual);
    Py_VISIT(self->on_full);
    Py_VISIT(self->draw);
    Py_VISIT(self->model);
    Py_VISIT(self->tag);
    Py_VISIT(self->pending);
    return 0;
}

static int Accumulator_clear(Accumulator *self) {
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->unusual);
    Py_CLEAR(self->on_full);
    Py_CLEAR(self->draw);
    Py_CLEAR(self->pending);
    disarm(self);
    return 0;
}

static void Accumulator_dealloc(Accumulator *self) {
    PyObject_GC_UnTrack(self);
    Accumulator_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* mapping[name] when it is an aligned, native-order, C-contiguous ndarray of the given type with at least
   one axis; NULL (and no error set) when it is anything else. Borrowed. */
static PyArrayObject *get_array(PyObject *mapping, PyObject *name, int type) {
    if (!PyDict_CheckExact(mapping)) return NULL;
    PyObject *value = PyDict_GetItemWithError(mapping, name);
    if (!value) {
        PyErr_Clear();
        return NULL;
    }
    if (!PyArray_CheckExact(value)) return NULL;
    PyArrayObject *a = (PyArrayObject *)value;
    if (PyArray_TYPE(a) != type || !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a) || !PyArray_ISNOTSWAPPED(a) ||
        PyArray_NDIM(a) < 1)
        return NULL;
    return a;
}

static void add_output_rows(Accumulator *self, PyArrayObject *out) {
    Py_ssize_t items = PyArray_SIZE(out);
    const float *f32 = (const float *)PyArray_DATA(out);
    const double *f64 = (const double *)PyArray_DATA(out);
    Py_ssize_t width = self->classes ? self->classes : items;
    double row[MAX_CLASSES];
    for (Py_ssize_t start = 0; start < items; start += width) {
        int finite = 1;
        for (Py_ssize_t c = 0; c < width; c++) {
            double v = self->out_double ? f64[start + c] : (double)f32[start + c];
            if (!isfinite(v)) {
                self->nan_count++;
                finite = 0;
            } else if (self->classes) {
                row[c] = v;
            }
        }
        if (!finite || !self->classes) continue;
        /* argmax: the first of equal maxima, as numpy's; float64 keeps float32's order */
        double top = row[0], low = row[0], total = row[0];
        Py_ssize_t best = 0;
        for (Py_ssize_t c = 1; c < width; c++) {
            if (row[c] > top) {
                top = row[c];
                best = c;
            }
            if (row[c] < low) low = row[c];
            total += row[c];
        }
        double confidence = top;
        if (!(low >= 0.0 && top <= 1.0 && fabs(total - 1.0) <= 1e-3)) {
            double den = exp(row[0] - top);
            for (Py_ssize_t c = 1; c < width; c++) den += exp(row[c] - top);
            confidence = 1.0 / den;
        }
        self->class_counts[best]++;
        self->conf_counts[bucket(self->conf_edges, self->n_conf, confidence)]++;
        self->class_rows++;
    }
}

static PyObject *call_with_take(PyObject *callable, PyObject *const *args, int take) {
    PyObject *argv[5] = {args[0], args[1], args[2], args[3], take ? Py_True : Py_False};
    return PyObject_Vectorcall(callable, argv, 5, NULL);
}

/* record(model, inputs, outputs, latency_ns): the ModelRuntime listener. */
static PyObject *Accumulator_record(Accumulator *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "record takes (model, inputs, outputs, latency_ns)");
        return NULL;
    }
    if (!self->pending) {
        PyErr_SetString(PyExc_RuntimeError, "Accumulator not initialised");
        return NULL;
    }
    int take = 1; /* one draw per request, first: the sample never depends on the data */
    if (self->draw) {
        PyObject *u = PyObject_CallNoArgs(self->draw);
        if (!u) return NULL;
        double value = PyFloat_AsDouble(u);
        Py_DECREF(u);
        if (value == -1.0 && PyErr_Occurred()) return NULL;
        take = value < self->rate;
    }
    if (!self->model || args[0] != self->model) return call_with_take(self->fallback, args, take);
    long long latency = PyLong_AsLongLong(args[3]);
    if (latency == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return call_with_take(self->unusual, args, take);
    }
    Py_ssize_t lat_bucket = bucket(self->lat_edges, self->n_lat, (double)latency / 1e6);
    if (args[2] == Py_None) { /* a failed request: counted, nothing copied */
        self->requests++;
        self->errors++;
        self->lat_counts[lat_bucket]++;
        Py_RETURN_NONE;
    }
    PyArrayObject *out = get_array(args[2], self->out_name, self->out_type);
    if (!out) return call_with_take(self->unusual, args, take);
    Py_ssize_t items = PyArray_SIZE(out);
    if (items == 0 || items % self->out_row_items != 0 ||
        (self->classes && PyArray_DIM(out, PyArray_NDIM(out) - 1) != self->classes))
        return call_with_take(self->unusual, args, take);
    if (take) {
        PyArrayObject *in = get_array(args[1], self->in_name, self->in_type);
        Py_ssize_t nbytes = in ? PyArray_NBYTES(in) : 0;
        if (nbytes == 0 || nbytes % self->in_row_bytes != 0) return call_with_take(self->unusual, args, take);
        PyObject *copy = PyBytes_FromStringAndSize((const char *)PyArray_DATA(in), nbytes);
        if (!copy) return NULL;
        int failed = PyList_Append(self->pending, copy);
        Py_DECREF(copy);
        if (failed < 0) return NULL;
        self->pending_bytes += nbytes;
        self->sampled++;
    }
    self->requests++;
    self->lat_counts[lat_bucket]++;
    add_output_rows(self, out);
    if (take && (PyList_GET_SIZE(self->pending) >= self->limit_rows || self->pending_bytes >= self->limit_bytes)) {
        PyObject *r = PyObject_CallNoArgs(self->on_full);
        if (!r) return NULL;
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
}

/* arm(model, tag, input, output, in_type, in_row_bytes, out_type, out_row_items, classes); types are numpy's
   type numbers (dtype.num) */
static PyObject *Accumulator_arm(Accumulator *self, PyObject *args) {
    PyObject *model, *tag, *in_name, *out_name;
    int in_type, out_type;
    Py_ssize_t in_row_bytes, out_row_items, classes;
    if (!PyArg_ParseTuple(args, "OOUUininn", &model, &tag, &in_name, &out_name, &in_type, &in_row_bytes, &out_type,
                          &out_row_items, &classes))
        return NULL;
    /* numpy's C API is loaded on the first arm (a model is loaded, so numpy is): importing this module must
       not import numpy (an idle agent defers it, tests/agent/test_import_light.py) */
    if (!numpy_ready) {
        if (_import_array() < 0) return NULL;
        numpy_ready = 1;
    }
    int is_double = out_type == NPY_FLOAT64;
    if (!is_double && out_type != NPY_FLOAT32) {
        PyErr_SetString(PyExc_ValueError, "outputs must be float32 or float64");
        return NULL;
    }
    if (in_type < 0 || in_row_bytes < 1 || out_row_items < 1 || classes < 0 ||
        classes > MAX_CLASSES || (classes && out_row_items % classes != 0)) {
        PyErr_SetString(PyExc_ValueError, "unsupported shapes");
        return NULL;
    }
    if (self->requests || PyList_GET_SIZE(self->pending)) {
        PyErr_SetString(PyExc_RuntimeError, "take() what is accumulated before arming again");
        return NULL;
    }
    disarm(self);
    Py_INCREF(model);
    self->model = model;
    Py_INCREF(tag);
    self->tag = tag;
    Py_INCREF(in_name);
    self->in_name = in_name;
    Py_INCREF(out_name);
    self->out_name = out_name;
    self->in_type = in_type;
    self->out_type = out_type;
    self->in_row_bytes = in_row_bytes;
    self->out_row_items = out_row_items;
    self->classes = classes;
    self->out_double = is_double;
    Py_RETURN_NONE;
}

static PyObject *int_list(const long long *values, Py_ssize_t n) {
    PyObject *list = PyList_New(n);
    if (!list) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromLongLong(values[i]);
        if (!v) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

/* take(disarm) -> None when nothing was accumulated, else (tag, requests, errors, latency_counts,
   class_counts or None, confidence_counts or None, nan_count, sampled, pending rows); resets. */
static PyObject *Accumulator_take(Accumulator *self, PyObject *arg) {
    int off = PyObject_IsTrue(arg);
    if (off < 0) return NULL;
    PyObject *result = Py_None;
    Py_INCREF(result);
    if (self->tag && (self->requests || PyList_GET_SIZE(self->pending))) {
        PyObject *lat = int_list(self->lat_counts, self->n_lat + 1);
        PyObject *cls = self->class_rows ? int_list(self->class_counts, self->classes) : Py_NewRef(Py_None);
        PyObject *conf = self->class_rows ? int_list(self->conf_counts, self->n_conf + 1) : Py_NewRef(Py_None);
        PyObject *rows = PyList_New(0);
        if (!lat || !cls || !conf || !rows) {
            Py_XDECREF(lat);
            Py_XDECREF(cls);
            Py_XDECREF(conf);
            Py_XDECREF(rows);
            Py_DECREF(result);
            return NULL;
        }
        Py_DECREF(result);
        result = Py_BuildValue("(OLLNNNLLO)", self->tag, self->requests, self->errors, lat, cls, conf,
                               self->nan_count, self->sampled, self->pending);
        if (!result) {
            Py_DECREF(rows);
            return NULL;
        }
        Py_SETREF(self->pending, rows); /* the result holds the old list */
        self->pending_bytes = 0;
        reset_counts(self);
    }
    if (off) disarm(self);
    return result;
}

static PyObject *Accumulator_get_model(Accumulator *self, void *closure) {
    return Py_NewRef(self->model ? self->model : Py_None);
}

static PyObject *Accumulator_get_tag(Accumulator *self, void *closure) {
    return Py_NewRef(self->tag ? self->tag : Py_None);
}

static PyObject *Accumulator_get_pending(Accumulator *self, void *closure) {
    return PyLong_FromLongLong(self->requests);
}

static PyObject *Accumulator_get_limit(Accumulator *self, void *closure) {
    return PyLong_FromSsize_t(self->limit_rows);
}

/* *target = value when it is an int of at least 1 (a limit); else ValueError naming ``name`` */
static int set_positive(PyObject *value, Py_ssize_t *target, const char *name) {
    Py_ssize_t v = value ? PyLong_AsSsize_t(value) : -1;
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 1) {
        PyErr_Format(PyExc_ValueError, "%s must be at least 1", name);
        return -1;
    }
    *target = v;
    return 0;
}

static int Accumulator_set_limit(Accumulator *self, PyObject *value, void *closure) {
    return set_positive(value, &self->limit_rows, "limit");
}

static int Accumulator_set_limit_bytes(Accumulator *self, PyObject *value, void *closure) {
    return set_positive(value, &self->limit_bytes, "limit_bytes");
}

static PyObject *Accumulator_get_limit_bytes(Accumulator *self, void *closure) {
    return PyLong_FromSsize_t(self->limit_bytes);
}

static PyMethodDef Accumulator_methods[] = {
    {"record", (PyCFunction)(void (*)(void))Accumulator_record, METH_FASTCALL,
     "record(model, inputs, outputs, latency_ns): summarise one request (the ModelRuntime listener)."},
    {"arm", (PyCFunction)Accumulator_arm, METH_VARARGS,
     "arm(model, tag, input, output, in_type, in_row_bytes, out_type, out_row_items, classes)."},
    {"take", (PyCFunction)Accumulator_take, METH_O,
     "take(disarm): what was accumulated since the last take (None if nothing), and reset."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Accumulator_getset[] = {
    {"model", (getter)Accumulator_get_model, NULL, "the armed model, or None", NULL},
    {"tag", (getter)Accumulator_get_tag, NULL, "the armed model's tag, or None", NULL},
    {"pending", (getter)Accumulator_get_pending, NULL, "requests accumulated since the last take", NULL},
    {"limit", (getter)Accumulator_get_limit, (setter)Accumulator_set_limit, "sampled rows that call on_full", NULL},
    {"limit_bytes", (getter)Accumulator_get_limit_bytes, (setter)Accumulator_set_limit_bytes,
     "sampled bytes that call on_full", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject AccumulatorType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "device_agent._telemetry_native.Accumulator",
    .tp_doc = "Per-request telemetry of one armed model, summarised in C.",
    .tp_basicsize = sizeof(Accumulator),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Accumulator_init,
    .tp_dealloc = (destructor)Accumulator_dealloc,
    .tp_traverse = (traverseproc)Accumulator_traverse,
    .tp_clear = (inquiry)Accumulator_clear,
    .tp_methods = Accumulator_methods,
    .tp_getset = Accumulator_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_telemetry_native", "The telemetry request path in C (optional).", -1, NULL, NULL, NULL,
    NULL, NULL,
};

PyMODINIT_FUNC PyInit__telemetry_native(void) {
    if (PyType_Ready(&AccumulatorType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Accumulator", (PyObject *)&AccumulatorType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "MAX_CLASSES", MAX_CLASSES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
