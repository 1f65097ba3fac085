/*
 * selftest.c: every error path of libdeimv2.so, plus threads, reported as one JSON object per line.
 * tests/test_capi.py runs it and asserts on the lines; run it by hand after building to check a setup:
 *
 *   selftest ARTIFACT IMAGE.bgr WIDTH HEIGHT      (raw B,G,R bytes, rows packed)
 *
 * Each line: {"case": NAME, "status": STATUS_NAME, "count": N, "value": V, "error": LAST_ERROR}.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deimv2.h"

#define THREADS 4
#define ROUNDS 3

static void json_string(const char *s) {
    if (!s) {
        fputs("null", stdout);
        return;
    }
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

/* One result line. `value` is printed as a JSON string when given (else null). */
static void report(const char *name, int status, int count, const char *value) {
    printf("{\"case\": \"%s\", \"status\": \"%s\", \"count\": %d, \"value\": ", name, deimv2_status_name(status),
           count);
    json_string(value);
    fputs(", \"error\": ", stdout);
    json_string(deimv2_last_error());
    puts("}");
    fflush(stdout);
}

static void report_int(const char *name, int result) {
    char text[32];
    snprintf(text, sizeof text, "%d", result);
    report(name, DEIMV2_OK, result, text);
}

/* Run `call` first, then report (C leaves the order of argument evaluation unspecified). */
#define CHECK(name, call, count)                                                                                   \
    do {                                                                                                           \
        int status_ = (call);                                                                                      \
        report(name, status_, count, NULL);                                                                        \
    } while (0)
#define CHECK_OPEN(name, call)                                                                                     \
    do {                                                                                                           \
        int status_ = (call);                                                                                      \
        report(name, status_, 0, h ? "handle not reset to NULL" : NULL);                                           \
    } while (0)

typedef struct {
    deimv2_t *handle;
    const uint8_t *bgr;
    int width, height;
    const deimv2_detection *expected;
    int expected_count;
    int mismatches;   /* rounds whose detections differ from `expected` */
    int failures;     /* rounds that did not return DEIMV2_OK */
    int error_leaked; /* another thread's error message showed up in this thread's deimv2_last_error */
} worker_t;

static void *worker(void *arg) {
    worker_t *w = arg;
    deimv2_detection *found = calloc((size_t)w->expected_count + 1, sizeof *found);
    for (int round = 0; round < ROUNDS; round++) {
        int count = 0;
        int status = deimv2_detect(w->handle, w->bgr, w->width, w->height, w->width * 3, 0.0f, found,
                                   w->expected_count + 1, &count);
        if (status != DEIMV2_OK)
            w->failures++;
        else if (count != w->expected_count || memcmp(found, w->expected, (size_t)count * sizeof *found) != 0)
            w->mismatches++;
        if (deimv2_last_error()[0] != '\0')
            w->error_leaked++;
    }
    free(found);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: selftest ARTIFACT IMAGE.bgr WIDTH HEIGHT\n");
        return 2;
    }
    const char *artifact = argv[1];
    int width = atoi(argv[3]), height = atoi(argv[4]);
    size_t size = (size_t)width * (size_t)height * 3;
    uint8_t *bgr = malloc(size);
    FILE *f = fopen(argv[2], "rb");
    if (!f || !bgr || fread(bgr, 1, size, f) != size) {
        fprintf(stderr, "selftest: cannot read %d x %d BGR bytes from %s\n", width, height, argv[2]);
        return 2;
    }
    fclose(f);

    report("version", DEIMV2_OK, DEIMV2_ABI_VERSION, deimv2_version());
    report("status_name_unknown", 99, 0, deimv2_status_name(99));

    /* --- opening ---------------------------------------------------------------------------------- */
    deimv2_t *h = (deimv2_t *)0x1; /* must be reset to NULL on failure */
    CHECK("open_null_out", deimv2_open(artifact, NULL, "cpu", NULL), 0);
    CHECK_OPEN("open_null_artifact", deimv2_open(NULL, NULL, "cpu", &h));
    CHECK_OPEN("open_missing_file", deimv2_open("/nonexistent/deimv2_atto.onnx", NULL, "cpu", &h));
    CHECK_OPEN("open_bad_backend", deimv2_open(artifact, "no-such-backend", "cpu", &h));
    CHECK_OPEN("open_wrong_backend_for_file", deimv2_open(artifact, "tensorrt", "cpu", &h));
    CHECK_OPEN("open_bad_device", deimv2_open(artifact, "onnxruntime", "quantum", &h));
    int status = deimv2_open(artifact, NULL, NULL, &h); /* NULL backend/device: file type's default, cpu */
    report("open", status, 0, NULL);
    if (status != DEIMV2_OK)
        return 1;

    /* --- queries ------------------------------------------------------------------------------------ */
    report_int("num_classes", deimv2_num_classes(h));
    report_int("max_detections", deimv2_max_detections(h));
    report_int("num_classes_null", deimv2_num_classes(NULL));
    report_int("max_detections_null", deimv2_max_detections(NULL));
    const char *name = deimv2_class_name(h, 0);
    report("class_name_0", DEIMV2_OK, 0, name);
    name = deimv2_class_name(h, -1);
    report("class_name_negative", DEIMV2_OK, 0, name);
    name = deimv2_class_name(h, 1000);
    report("class_name_too_large", DEIMV2_OK, 0, name);
    name = deimv2_class_name(NULL, 0);
    report("class_name_null_handle", DEIMV2_OK, 0, name);

    /* --- bad detect arguments ------------------------------------------------------------------------ */
    int max = deimv2_max_detections(h), count = -7;
    deimv2_detection *all = calloc((size_t)max, sizeof *all);
    CHECK("detect_null_handle", deimv2_detect(NULL, bgr, width, height, width * 3, 0.f, all, max, &count), count);
    CHECK("detect_null_image", deimv2_detect(h, NULL, width, height, width * 3, 0.f, all, max, &count), count);
    CHECK("detect_null_count", deimv2_detect(h, bgr, width, height, width * 3, 0.f, all, max, NULL), 0);
    CHECK("detect_zero_width", deimv2_detect(h, bgr, 0, height, width * 3, 0.f, all, max, &count), count);
    CHECK("detect_negative_height", deimv2_detect(h, bgr, width, -5, width * 3, 0.f, all, max, &count), count);
    CHECK("detect_small_stride", deimv2_detect(h, bgr, width, height, width * 3 - 1, 0.f, all, max, &count), count);
    CHECK("detect_negative_capacity", deimv2_detect(h, bgr, width, height, width * 3, 0.f, all, -1, &count), count);
    CHECK("detect_null_out", deimv2_detect(h, bgr, width, height, width * 3, 0.f, NULL, 5, &count), count);
    CHECK("detect_nan_threshold", deimv2_detect(h, bgr, width, height, width * 3, NAN, all, max, &count), count);
    deimv2_t *garbage = (deimv2_t *)(uintptr_t)0x1234; /* never returned by deimv2_open: must not be dereferenced */
    CHECK("detect_garbage_handle", deimv2_detect(garbage, bgr, width, height, width * 3, 0.f, all, max, &count), count);

    /* --- capacity ------------------------------------------------------------------------------------ */
    int full = 0;
    CHECK("detect_full", deimv2_detect(h, bgr, width, height, width * 3, 0.f, all, max, &full), full);
    CHECK("detect_capacity_zero", deimv2_detect(h, bgr, width, height, width * 3, 0.f, NULL, 0, &count), count);
    deimv2_detection best[5];
    status = deimv2_detect(h, bgr, width, height, width * 3, 0.f, best, 5, &count);
    report("detect_capacity_five", status, count,
           full >= 5 && memcmp(best, all, sizeof best) == 0 ? "best five written" : "best five differ");

    /* a padded stride reads the same pixels */
    int stride = width * 3 + 13;
    uint8_t *padded = malloc((size_t)stride * (size_t)height);
    for (int y = 0; y < height; y++) {
        memcpy(padded + (size_t)y * stride, bgr + (size_t)y * width * 3, (size_t)width * 3);
        memset(padded + (size_t)y * stride + width * 3, 0xAB, 13);
    }
    deimv2_detection *strided = calloc((size_t)max, sizeof *strided);
    status = deimv2_detect(h, padded, width, height, stride, 0.f, strided, max, &count);
    report("detect_padded_stride", status, count,
           count == full && memcmp(strided, all, (size_t)full * sizeof *all) == 0 ? "same as packed" : "differs");
    free(strided);
    free(padded);

    /* --- threads: two handles, two threads on each; every round must equal the single-thread result ---- */
    deimv2_t *h2 = NULL;
    status = deimv2_open(artifact, NULL, "cpu", &h2);
    report("open_second", status, 0, NULL);
    if (status != DEIMV2_OK)
        return 1;
    deimv2_class_name(h, -1); /* leave an error on the main thread: workers must not see it */
    char main_error[256];
    snprintf(main_error, sizeof main_error, "%s", deimv2_last_error());
    pthread_t threads[THREADS];
    worker_t workers[THREADS];
    for (int t = 0; t < THREADS; t++) {
        workers[t] = (worker_t){t % 2 ? h2 : h, bgr, width, height, all, full, 0, 0, 0};
        pthread_create(&threads[t], NULL, worker, &workers[t]);
    }
    int mismatches = 0, failures = 0, leaked = 0;
    for (int t = 0; t < THREADS; t++) {
        pthread_join(threads[t], NULL);
        mismatches += workers[t].mismatches;
        failures += workers[t].failures;
        leaked += workers[t].error_leaked;
    }
    char summary[128];
    snprintf(summary, sizeof summary, "rounds=%d mismatches=%d failures=%d leaked=%d", THREADS * ROUNDS, mismatches,
             failures, leaked);
    report("threads", failures ? DEIMV2_ERR_RUNTIME : DEIMV2_OK, THREADS * ROUNDS, summary);
    report("main_error_kept", DEIMV2_OK, 0, strcmp(main_error, deimv2_last_error()) == 0 ? "kept" : "changed");

    /* --- closing ------------------------------------------------------------------------------------- */
    deimv2_close(h2);
    deimv2_close(NULL);
    report("close_null", DEIMV2_OK, 0, NULL);
    deimv2_close(h);
    report("close", DEIMV2_OK, 0, NULL);
    CHECK("detect_after_close", deimv2_detect(h, bgr, width, height, width * 3, 0.f, all, max, &count), count);
    deimv2_close(h); /* double close: reported, not a crash */
    report("close_twice", DEIMV2_OK, 0, NULL);
    free(all);
    free(bgr);
    return 0;
}
