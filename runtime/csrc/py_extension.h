/* What the CPython extensions among the C helpers share (shm_p2p.c, shm_small_call.c; built and
loaded by runtime/c_library.extension): their calls are METH_FASTCALL, take ints (addresses,
sizes, keys) and arrays through the buffer protocol, and answer "not taken" for an array they
cannot use, so that the caller's Python path does the work. Every helper is static inline: a call
costs what it cost written out in each file.

Include it after <Python.h> (with PY_SSIZE_T_CLEAN defined before that). */
#ifndef RINGPIPE_PY_EXTENSION_H
#define RINGPIPE_PY_EXTENSION_H

/* args[0 .. count - 1] as long longs into `out`: 0, or -1 with Python's error set (not an int, or
   out of range). */
static inline int rp_take_ints(PyObject *const *args, Py_ssize_t count, long long *out) {
    for (Py_ssize_t i = 0; i < count; i++) {
        out[i] = PyLong_AsLongLong(args[i]);
        if (out[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

/* A call whose arguments do not fit its `signature` ("send(ring, slot_bytes, ...)"): NULL, with a
   TypeError naming the signature unless a conversion already set its own error. */
static inline PyObject *rp_bad_arguments(const char *signature) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, signature);
    return NULL;
}

/* `object` as one C-contiguous buffer (writable when `writable`) in `view`: 0; or -1 with the
   error cleared when the object cannot give one (the caller answers "not taken"). After -1 the
   view holds nothing: PyBuffer_Release of it does nothing. */
static inline int rp_take_buffer(PyObject *object, int writable, Py_buffer *view) {
    if (PyObject_GetBuffer(object, view, writable ? PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE : PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        view->obj = NULL;
        return -1;
    }
    return 0;
}

/* As rp_take_buffer, where None means no array: an empty view (buf NULL, len 0), which
   PyBuffer_Release leaves alone. */
static inline int rp_take_optional_buffer(PyObject *object, int writable, Py_buffer *view) {
    if (object == Py_None) {
        view->buf = NULL;
        view->obj = NULL;
        view->len = 0;
        return 0;
    }
    return rp_take_buffer(object, writable, view);
}

/* One METH_FASTCALL entry of a module's method table. */
#define RP_FASTCALL(name, function, doc) {name, (PyCFunction)(void (*)(void))(function), METH_FASTCALL, doc}

/* The definition of extension module `name` (methods: its table, ending in {NULL}) and the
   PyInit_`name` that c_library.extension's loader calls. */
#define RP_MODULE(name, methods)                                                                   \
    static struct PyModuleDef rp_module_definition = {PyModuleDef_HEAD_INIT, #name, NULL, -1, (methods)};    \
    PyMODINIT_FUNC PyInit_##name(void) { return PyModule_Create(&rp_module_definition); }

#endif
