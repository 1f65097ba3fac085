/*
 * The C half of libdeimv2.so (compiled by deimv2_deploy/capi/build.py into cffi's embedding module).
 *
 * cffi does the Python-embedding work: it generates deimv2_py_* (declared with embedding_api), which
 * take the GIL, initialise the `_deimv2_capi` module on first use and call the Python functions in
 * deimv2_deploy/capi/embedded.py. This file adds what cffi cannot do for us:
 *   - argument checks that need no Python (NULL pointers, sizes), so they cost nothing and work
 *     even when Python cannot start;
 *   - the thread-local error message, kept in C so deimv2_last_error never needs the GIL;
 *   - starting Python *as the build environment's python executable* (PyConfig.program_name), so a
 *     venv's site-packages are found; cffi's own start-up (Py_InitializeEx) would take the host
 *     program's defaults and exit() the process if it cannot import what it needs.
 *
 * build.py prepends the DEIMV2_BUILD_* macros (strings baked in at build time).
 */
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deimv2.h"

#ifndef DEIMV2_BUILD_PYTHON
#error "build.py defines DEIMV2_BUILD_PYTHON (the python executable whose environment the library runs in)"
#endif

/* Implemented in Python (embedded.py); cffi generates their bodies after this file. */
CFFI_DLLEXPORT int deimv2_py_open(const char *artifact, const char *backend, const char *device, deimv2_t **out);
CFFI_DLLEXPORT int deimv2_py_detect(deimv2_t *h, const uint8_t *bgr, int width, int height, int stride,
                                    float score_threshold, deimv2_detection *out, int capacity, int *count);
CFFI_DLLEXPORT void deimv2_py_close(deimv2_t *h);
CFFI_DLLEXPORT const char *deimv2_py_class_name(deimv2_t *h, int label);
CFFI_DLLEXPORT int deimv2_py_num_classes(deimv2_t *h);
CFFI_DLLEXPORT int deimv2_py_max_detections(deimv2_t *h);

/* ---- errors --------------------------------------------------------------------------------------- */

#define DEIMV2_ERROR_SIZE 4096
static _Thread_local char deimv2_error_buffer[DEIMV2_ERROR_SIZE];

static void deimv2_clear_error(void) { deimv2_error_buffer[0] = '\0'; }

static int deimv2_fail(int status, const char *format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(deimv2_error_buffer, DEIMV2_ERROR_SIZE, format, args);
    va_end(args);
    return status;
}

/* Called from Python (embedded.py) to report a failure to the calling thread. */
static void deimv2_internal_set_error(const char *message) {
    snprintf(deimv2_error_buffer, DEIMV2_ERROR_SIZE, "%s", message ? message : "");
}

const char *deimv2_last_error(void) { return deimv2_error_buffer; }

const char *deimv2_version(void) { return DEIMV2_BUILD_VERSION; }

const char *deimv2_status_name(int status) {
    switch (status) {
    case DEIMV2_OK: return "DEIMV2_OK";
    case DEIMV2_ERR_INVALID_ARGUMENT: return "DEIMV2_ERR_INVALID_ARGUMENT";
    case DEIMV2_ERR_NOT_FOUND: return "DEIMV2_ERR_NOT_FOUND";
    case DEIMV2_ERR_CAPACITY: return "DEIMV2_ERR_CAPACITY";
    case DEIMV2_ERR_UNAVAILABLE: return "DEIMV2_ERR_UNAVAILABLE";
    case DEIMV2_ERR_RUNTIME: return "DEIMV2_ERR_RUNTIME";
    case DEIMV2_ERR_PYTHON: return "DEIMV2_ERR_PYTHON";
    default: return "DEIMV2_UNKNOWN_STATUS";
    }
}

/* ---- starting Python ------------------------------------------------------------------------------ */

static pthread_once_t deimv2_python_once = PTHREAD_ONCE_INIT;
static char deimv2_python_error[DEIMV2_ERROR_SIZE]; /* "" once Python is ready; written once, then read-only */

static const char *deimv2_python_executable(void) {
    const char *chosen = getenv("DEIMV2_PYTHON");
    return (chosen && *chosen) ? chosen : DEIMV2_BUILD_PYTHON;
}

/* The pending Python exception as "Type: message" (clears it). Needs the GIL. */
static void deimv2_describe_exception(char *dest, size_t size) {
    PyObject *type = NULL, *value = NULL, *traceback = NULL;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    const char *type_name = type ? ((PyTypeObject *)type)->tp_name : "unknown error";
    PyObject *text = value ? PyObject_Str(value) : NULL;
    const char *message = text ? PyUnicode_AsUTF8(text) : NULL;
    snprintf(dest, size, "%s: %s", type_name, message ? message : "(no message)");
    PyErr_Clear();
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
}

static void deimv2_start_python(void) {
    const char *python = deimv2_python_executable();
    if (!Py_IsInitialized()) { /* a C host; in a Python host (ctypes) we join the running interpreter */
        PyConfig config;
        PyConfig_InitPythonConfig(&config);
        config.install_signal_handlers = 0; /* the host program owns SIGINT & co */
        config.parse_argv = 0;
        PyStatus status = PyConfig_SetBytesString(&config, &config.program_name, python);
        if (!PyStatus_Exception(status))
            status = Py_InitializeFromConfig(&config);
        PyConfig_Clear(&config);
        if (PyStatus_Exception(status)) {
            snprintf(deimv2_python_error, DEIMV2_ERROR_SIZE,
                     "could not start the embedded Python as %s: %s%s%s. Set DEIMV2_PYTHON to the python "
                     "executable of the environment where deimv2-deploy is installed",
                     python, status.func ? status.func : "", status.func ? ": " : "",
                     status.err_msg ? status.err_msg : "unknown error");
            return;
        }
        PyEval_SaveThread(); /* release the GIL: every call takes it through PyGILState_Ensure */
    }

    PyGILState_STATE gil = PyGILState_Ensure();
    /* A source checkout (not pip-installed) is found through the folder it was built from; last on
       sys.path so an installed deimv2_deploy of the chosen environment wins. */
    PyObject *sys_path = PySys_GetObject("path"); /* borrowed */
    PyObject *root = PyUnicode_FromString(DEIMV2_BUILD_PACKAGE_ROOT);
    if (sys_path && root && PySequence_Contains(sys_path, root) == 0)
        PyList_Append(sys_path, root);
    Py_XDECREF(root);
    PyErr_Clear();
    /* Import what cffi's start-up needs now, while failures can still be reported (cffi would print
       them and return 0 = DEIMV2_OK from every call). */
    static const char *const modules[] = {"_cffi_backend", "deimv2_deploy.capi.embedded"};
    for (size_t i = 0; i < sizeof(modules) / sizeof(modules[0]); i++) {
        PyObject *module = PyImport_ImportModule(modules[i]);
        if (module == NULL) {
            char reason[DEIMV2_ERROR_SIZE / 2];
            deimv2_describe_exception(reason, sizeof(reason));
            snprintf(deimv2_python_error, DEIMV2_ERROR_SIZE,
                     "the embedded Python (%s) cannot import %s: %s. Set DEIMV2_PYTHON to the python executable "
                     "of the environment where deimv2-deploy and its dependencies are installed",
                     python, modules[i], reason);
            break;
        }
        Py_DECREF(module);
    }
    PyGILState_Release(gil);
}

static int deimv2_ensure_python(void) {
    pthread_once(&deimv2_python_once, deimv2_start_python);
    if (deimv2_python_error[0] != '\0')
        return deimv2_fail(DEIMV2_ERR_PYTHON, "%s", deimv2_python_error);
    return DEIMV2_OK;
}

/* ---- the API -------------------------------------------------------------------------------------- */

int deimv2_open(const char *artifact, const char *backend, const char *device, deimv2_t **out) {
    deimv2_clear_error();
    if (out == NULL)
        return deimv2_fail(DEIMV2_ERR_INVALID_ARGUMENT, "deimv2_open: out is NULL; pass the address of a deimv2_t *");
    *out = NULL;
    if (artifact == NULL || artifact[0] == '\0')
        return deimv2_fail(DEIMV2_ERR_INVALID_ARGUMENT, "deimv2_open: artifact path is %s",
                           artifact ? "empty" : "NULL");
    int status = deimv2_ensure_python();
    if (status != DEIMV2_OK)
        return status;
    return deimv2_py_open(artifact, backend, device ? device : "cpu", out);
}

int deimv2_detect(deimv2_t *h, const uint8_t *bgr, int width, int height, int stride, float score_threshold,
                  deimv2_detection *out, int capacity, int *count) {
    deimv2_clear_error();
    if (count != NULL)
        *count = 0;
    if (h == NULL)
        return deimv2_fail(DEIMV2_ERR_INVALID_ARGUMENT, "deimv2_detect: handle is NULL; open one with deimv2_open");
    if (bgr == NULL)
        return deimv2_fail(DEIMV2_ERR_INVALID_ARGUMENT, "deimv2_detect: image pointer (bgr) is NULL");
    if (count == NULL)
        return deimv2_fail(DEIMV2_ERR_INVALID_ARGUMENT, "deimv2_detect: count is NULL; pass the address of an int");
    if (width <= 0 || height <= 0)
        return deimv2_fail(DEIMV2_ERR_INVALID_ARGUMENT, "deimv2_detect: image size must be positive, got %d x %d",
                           width, height);
    if ((long long)stride < 3LL * width)
        return deimv2_fail(DEIMV2_ERR_INVALID_ARGUMENT,
                           "deimv2_detect: stride %d is less than width * 3 = %lld bytes (rows of B,G,R bytes)",
                           stride, 3LL * width);
    if (capacity < 0)
        return deimv2_fail(DEIMV2_ERR_INVALID_ARGUMENT, "deimv2_detect: capacity must be >= 0, got %d", capacity);
    if (out == NULL && capacity > 0)
        return deimv2_fail(DEIMV2_ERR_INVALID_ARGUMENT,
                           "deimv2_detect: out is NULL but capacity is %d; pass an array or capacity 0", capacity);
    if (isnan(score_threshold))
        return deimv2_fail(DEIMV2_ERR_INVALID_ARGUMENT, "deimv2_detect: score_threshold is NaN");
    int status = deimv2_ensure_python();
    if (status != DEIMV2_OK)
        return status;
    return deimv2_py_detect(h, bgr, width, height, stride, score_threshold, out, capacity, count);
}

void deimv2_close(deimv2_t *h) {
    deimv2_clear_error();
    if (h == NULL || deimv2_ensure_python() != DEIMV2_OK)
        return; /* no handle can exist without Python */
    deimv2_py_close(h);
}

const char *deimv2_class_name(deimv2_t *h, int label) {
    deimv2_clear_error();
    if (h == NULL) {
        deimv2_fail(DEIMV2_ERR_INVALID_ARGUMENT, "deimv2_class_name: handle is NULL");
        return NULL;
    }
    if (deimv2_ensure_python() != DEIMV2_OK)
        return NULL;
    return deimv2_py_class_name(h, label);
}

int deimv2_num_classes(deimv2_t *h) {
    deimv2_clear_error();
    if (h == NULL)
        return deimv2_fail(-1, "deimv2_num_classes: handle is NULL");
    if (deimv2_ensure_python() != DEIMV2_OK)
        return -1;
    return deimv2_py_num_classes(h);
}

int deimv2_max_detections(deimv2_t *h) {
    deimv2_clear_error();
    if (h == NULL)
        return deimv2_fail(-1, "deimv2_max_detections: handle is NULL");
    if (deimv2_ensure_python() != DEIMV2_OK)
        return -1;
    return deimv2_py_max_detections(h);
}
