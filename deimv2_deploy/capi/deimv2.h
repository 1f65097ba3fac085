/*
 * deimv2.h: C ABI of libdeimv2.so, the DEIMv2 object detector for C and C++ programs.
 *
 *     deimv2_t *det = NULL;
 *     if (deimv2_open("models/deimv2_atto_fp32.onnx", NULL, "cpu", &det) != DEIMV2_OK) {
 *         fprintf(stderr, "%s\n", deimv2_last_error());
 *         return 1;
 *     }
 *     deimv2_detection boxes[300];
 *     int n = 0;
 *     if (deimv2_detect(det, bgr, width, height, width * 3, 0.5f, boxes, 300, &n) == DEIMV2_OK) { ... }
 *     deimv2_close(det);
 *
 * Build it with `deimv2-capi build --output DIR`; link with `-IDIR -LDIR -ldeimv2 -Wl,-rpath,DIR`.
 * The library runs the detector in an embedded Python (the environment it was built from; see
 * `deimv2-capi info` and DEIMV2_PYTHON below).
 *
 * Conventions
 *   - Every function that can fail returns a deimv2_status (int); on failure deimv2_last_error()
 *     describes it. No function aborts the process on bad input.
 *   - Thread safety: calls on distinct handles run in parallel (inference releases Python's GIL);
 *     calls on one handle are serialised by a lock inside the handle.
 *   - Memory: the library never keeps pointers to caller memory after a call returns. Strings it
 *     returns stay valid as documented per function; never free them.
 *
 * Environment (read once, at the first call that needs Python)
 *   DEIMV2_PYTHON  python executable of the environment to run in (default: the one that built
 *                  the library). The library starts Python as if that executable ran, so a venv's
 *                  site-packages (and its .pth files) are used.
 *   PYTHONHOME, PYTHONPATH  honoured as by the python executable.
 */
#ifndef DEIMV2_H
#define DEIMV2_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define DEIMV2_API __attribute__((visibility("default")))
#else
#define DEIMV2_API
#endif

/* Bumped when a signature or struct layout changes. */
#define DEIMV2_ABI_VERSION 1

typedef enum deimv2_status {
    DEIMV2_OK = 0,
    DEIMV2_ERR_INVALID_ARGUMENT = 1, /* NULL pointer, bad size/stride/capacity, unknown backend or device name */
    DEIMV2_ERR_NOT_FOUND = 2,        /* the artifact path does not exist */
    DEIMV2_ERR_CAPACITY = 3,         /* more detections than `capacity`; *count holds the number needed */
    DEIMV2_ERR_UNAVAILABLE = 4,      /* the backend (or device) is not installed/usable on this machine */
    DEIMV2_ERR_RUNTIME = 5,          /* loading or inference failed (message says why) */
    DEIMV2_ERR_PYTHON = 6            /* the embedded Python could not start or import deimv2_deploy */
} deimv2_status;

/* An open detector (one loaded artifact on one backend and device). Opaque. */
typedef struct deimv2 deimv2_t;

/* One detection; box corners in pixels of the image passed to deimv2_detect. */
typedef struct deimv2_detection {
    float x1, y1, x2, y2;
    float score;
    int label; /* class index: 0 .. deimv2_num_classes(h) - 1; see deimv2_class_name */
} deimv2_detection;

/*
 * Load an artifact (.onnx, .xml OpenVINO IR, .engine TensorRT, or a checkpoint).
 *   backend: "onnxruntime", "openvino", "tensorrt", "torch" (aliases ort, ov, trt), or NULL for the
 *            default of the file type.
 *   device:  "cpu", "cuda", "gpu", ... as the backend accepts; NULL means "cpu".
 * On success *out is the new handle; on failure *out is NULL.
 */
DEIMV2_API int deimv2_open(const char *artifact, const char *backend, const char *device, deimv2_t **out);

/*
 * Detect objects in one BGR image (8-bit, interleaved B,G,R; rows `stride` bytes apart, stride >= width * 3).
 * Detections with score >= score_threshold are written to out[0 .. *count - 1], best first.
 * When more than `capacity` detections pass, the best `capacity` are written, *count is set to the
 * number needed and DEIMV2_ERR_CAPACITY is returned; a capacity of deimv2_max_detections(h) is always
 * enough. `out` may be NULL when capacity is 0 (to ask for the count; this still runs the model).
 */
DEIMV2_API int deimv2_detect(deimv2_t *h, const uint8_t *bgr, int width, int height, int stride,
                             float score_threshold, deimv2_detection *out, int capacity, int *count);

/* Release a handle. NULL is ignored. The handle must not be used afterwards. */
DEIMV2_API void deimv2_close(deimv2_t *h);

/*
 * Message of the last failing call made by this thread ("" when that call succeeded).
 * Valid until this thread's next deimv2_* call.
 */
DEIMV2_API const char *deimv2_last_error(void);

/* Name of a class label (e.g. "person"), or NULL when label is out of range. Valid until deimv2_close(h). */
DEIMV2_API const char *deimv2_class_name(deimv2_t *h, int label);

/* Number of classes the artifact detects, or -1 on error. */
DEIMV2_API int deimv2_num_classes(deimv2_t *h);

/* Most detections deimv2_detect can return for one image (the model's top-k), or -1 on error. */
DEIMV2_API int deimv2_max_detections(deimv2_t *h);

/* Version of deimv2-deploy the library was built from, e.g. "0.1.0". Static string. */
DEIMV2_API const char *deimv2_version(void);

/* Name of a status code, e.g. "DEIMV2_ERR_CAPACITY" ("DEIMV2_UNKNOWN_STATUS" for other values). Static string. */
DEIMV2_API const char *deimv2_status_name(int status);

#ifdef __cplusplus
}
#endif

#endif /* DEIMV2_H */
