/*
 * detect.c: run a DEIMv2 artifact on one image from C (through libdeimv2.so) and print the
 * detections as JSON, in the layout of `deimv2-infer --json` / Detections.to_dict(), after the
 * artifact's class names (deimv2_num_classes, deimv2_class_name: COCO's 80, or a custom model's own).
 *
 *   detect [--backend NAME] [--device NAME] [--threshold T] ARTIFACT IMAGE.ppm
 *   detect [...] --raw WIDTH HEIGHT ARTIFACT IMAGE.bgr      (headerless B,G,R bytes, rows packed)
 *
 * Images are read without any image library: binary PPM (P6, maxval 255; e.g.
 * `python -c "import cv2; cv2.imwrite('x.ppm', cv2.imread('x.jpg'))"` or `convert x.jpg x.ppm`), or raw BGR.
 * Build: see the Makefile next to this file.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deimv2.h"

typedef struct {
    int width, height;
    unsigned char *bgr; /* height rows of width * 3 bytes */
} image_t;

/* Next header number of a PPM, skipping whitespace and # comments; -1 on a malformed header. */
static long ppm_number(FILE *f) {
    int c = fgetc(f);
    while (c == '#' || c == ' ' || c == '\t' || c == '\n' || c == '\r') {
        if (c == '#')
            while (c != '\n' && c != EOF)
                c = fgetc(f);
        c = fgetc(f);
    }
    if (c < '0' || c > '9')
        return -1;
    long value = 0;
    while (c >= '0' && c <= '9') {
        value = value * 10 + (c - '0');
        if (value > 1000000)
            return -1;
        c = fgetc(f);
    }
    return value; /* the one whitespace byte after the number has been consumed */
}

static int read_ppm(const char *path, image_t *image) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "detect: cannot open %s\n", path);
        return -1;
    }
    int ok = fgetc(f) == 'P' && fgetc(f) == '6';
    long width = ok ? ppm_number(f) : -1, height = ok ? ppm_number(f) : -1, maxval = ok ? ppm_number(f) : -1;
    if (!ok || width <= 0 || height <= 0 || maxval != 255) {
        fprintf(stderr, "detect: %s is not an 8-bit binary PPM (P6, maxval 255)\n", path);
        fclose(f);
        return -1;
    }
    size_t size = (size_t)width * (size_t)height * 3;
    image->bgr = malloc(size);
    if (!image->bgr || fread(image->bgr, 1, size, f) != size) {
        fprintf(stderr, "detect: %s is truncated (expected %ld x %ld RGB pixels)\n", path, width, height);
        fclose(f);
        return -1;
    }
    fclose(f);
    for (size_t i = 0; i < size; i += 3) { /* PPM stores R,G,B; the library takes B,G,R */
        unsigned char r = image->bgr[i];
        image->bgr[i] = image->bgr[i + 2];
        image->bgr[i + 2] = r;
    }
    image->width = (int)width;
    image->height = (int)height;
    return 0;
}

static int read_raw(const char *path, int width, int height, image_t *image) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "detect: cannot open %s\n", path);
        return -1;
    }
    size_t size = (size_t)width * (size_t)height * 3;
    image->bgr = malloc(size);
    int ok = image->bgr && fread(image->bgr, 1, size, f) == size && fgetc(f) == EOF;
    fclose(f);
    if (!ok) {
        fprintf(stderr, "detect: %s is not %d x %d x 3 bytes of raw BGR\n", path, width, height);
        return -1;
    }
    image->width = width;
    image->height = height;
    return 0;
}

static void print_json_string(const char *s) {
    putchar('"');
    for (; s && *s; s++) {
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

static int usage(void) {
    fprintf(stderr, "usage: detect [--backend NAME] [--device NAME] [--threshold T] [--raw WIDTH HEIGHT] "
                    "ARTIFACT IMAGE\n");
    return 2;
}

int main(int argc, char **argv) {
    const char *backend = NULL, *device = "cpu";
    float threshold = 0.0f;
    int raw_width = 0, raw_height = 0;
    int i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        if (!strcmp(argv[i], "--backend") && i + 1 < argc)
            backend = argv[++i];
        else if (!strcmp(argv[i], "--device") && i + 1 < argc)
            device = argv[++i];
        else if (!strcmp(argv[i], "--threshold") && i + 1 < argc)
            threshold = strtof(argv[++i], NULL);
        else if (!strcmp(argv[i], "--raw") && i + 2 < argc) {
            raw_width = atoi(argv[++i]);
            raw_height = atoi(argv[++i]);
            if (raw_width <= 0 || raw_height <= 0)
                return usage();
        } else
            return usage();
    }
    if (argc - i != 2)
        return usage();
    const char *artifact = argv[i], *image_path = argv[i + 1];

    image_t image = {0, 0, NULL};
    if ((raw_width ? read_raw(image_path, raw_width, raw_height, &image) : read_ppm(image_path, &image)) != 0)
        return 1;

    deimv2_t *detector = NULL;
    int status = deimv2_open(artifact, backend, device, &detector);
    if (status != DEIMV2_OK) {
        fprintf(stderr, "detect: %s: %s\n", deimv2_status_name(status), deimv2_last_error());
        free(image.bgr);
        return 1;
    }

    /* deimv2_max_detections is always enough; the retry shows the DEIMV2_ERR_CAPACITY protocol. */
    int capacity = deimv2_max_detections(detector), count = 0;
    deimv2_detection *detections = NULL;
    do {
        deimv2_detection *grown = realloc(detections, (size_t)(capacity > 0 ? capacity : 1) * sizeof *grown);
        if (!grown) {
            status = -1;
            break;
        }
        detections = grown;
        status = deimv2_detect(detector, image.bgr, image.width, image.height, image.width * 3, threshold,
                               detections, capacity, &count);
        capacity = count;
    } while (status == DEIMV2_ERR_CAPACITY);

    if (status != DEIMV2_OK) {
        const char *why = status < 0 ? "out of memory" : deimv2_last_error();
        fprintf(stderr, "detect: %s: %s\n", status < 0 ? "error" : deimv2_status_name(status), why);
    } else {
        printf("{\"image_size\": [%d, %d], \"classes\": [", image.height, image.width);
        int classes = deimv2_num_classes(detector); /* the artifact's own classes: 80 for COCO, K for a custom model */
        for (int c = 0; c < classes; c++) {
            printf("%s", c ? ", " : "");
            print_json_string(deimv2_class_name(detector, c));
        }
        printf("], \"detections\": [");
        for (int k = 0; k < count; k++) {
            const deimv2_detection *d = &detections[k];
            /* %.9g prints a float exactly (it reads back as the same float) */
            printf("%s\n  {\"box\": [%.9g, %.9g, %.9g, %.9g], \"score\": %.9g, \"label\": %d, \"class_name\": ",
                   k ? "," : "", d->x1, d->y1, d->x2, d->y2, d->score, d->label);
            print_json_string(deimv2_class_name(detector, d->label));
            putchar('}');
        }
        printf("%s]}\n", count ? "\n" : "");
    }
    free(detections);
    free(image.bgr);
    deimv2_close(detector);
    return status == DEIMV2_OK ? 0 : 1;
}
