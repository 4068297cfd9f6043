/* edgetune_jni.c — JNI glue from org.edgetune.NativeEngine to the C API (edgetune.h).  Handles
 * travel as Java longs; every failed call throws org.edgetune.EdgeTuneException(status, message)
 * with edgetune's own message; a step's progress calls ProgressListener.onProgress on the
 * calling thread (returning true cancels the step). */
#include <jni.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "edgetune/edgetune.h"

#define FN(name) Java_org_edgetune_NativeEngine_##name

static void throw_status(JNIEnv* env, et_status s) {
    jclass cls = (*env)->FindClass(env, "org/edgetune/EdgeTuneException");
    if (!cls) return;
    jmethodID ctor = (*env)->GetMethodID(env, cls, "<init>", "(ILjava/lang/String;)V");
    if (!ctor) return;
    jstring msg = (*env)->NewStringUTF(env, et_last_error());
    jobject ex = (*env)->NewObject(env, cls, ctor, (jint)s, msg);
    if (ex) (*env)->Throw(env, (jthrowable)ex);
}

static void throw_arg(JNIEnv* env, const char* msg) {
    jclass cls = (*env)->FindClass(env, "org/edgetune/EdgeTuneException");
    jmethodID ctor = cls ? (*env)->GetMethodID(env, cls, "<init>", "(ILjava/lang/String;)V") : NULL;
    if (!ctor) return;
    jobject ex = (*env)->NewObject(env, cls, ctor, (jint)ET_ERR_ARG, (*env)->NewStringUTF(env, msg));
    if (ex) (*env)->Throw(env, (jthrowable)ex);
}

/* a Java String as a malloc'd modified-UTF-8 C string (NULL for null) */
static char* cstr(JNIEnv* env, jstring s) {
    if (!s) return NULL;
    const char* u = (*env)->GetStringUTFChars(env, s, NULL);
    if (!u) return NULL;
    char* out = strdup(u);
    (*env)->ReleaseStringUTFChars(env, s, u);
    return out;
}

JNIEXPORT jlong JNICALL FN(nOpenModel)(JNIEnv* env, jclass cls, jstring path, jlong budget) {
    (void)cls;
    char* p = cstr(env, path);
    if (!p) {
        throw_arg(env, "model path is null");
        return 0;
    }
    et_model_options o;
    memset(&o, 0, sizeof o);
    o.memory_budget = (uint64_t)budget;
    et_model* m = NULL;
    et_status s = et_model_open(p, &o, &m);
    free(p);
    if (s != ET_OK) {
        throw_status(env, s);
        return 0;
    }
    return (jlong)(intptr_t)m;
}

JNIEXPORT void JNICALL FN(nCloseModel)(JNIEnv* env, jclass cls, jlong m) {
    (void)env;
    (void)cls;
    et_model_close((et_model*)(intptr_t)m);
}

JNIEXPORT jintArray JNICALL FN(nModelInfo)(JNIEnv* env, jclass cls, jlong m) {
    (void)cls;
    et_model_info i;
    et_status s = et_model_info_get((et_model*)(intptr_t)m, &i);
    if (s != ET_OK) {
        throw_status(env, s);
        return NULL;
    }
    jint v[9] = {i.n_vocab, i.n_embd, i.n_layer, i.n_head, i.n_head_kv, i.n_ff, i.context_length, i.bos_id, i.eos_id};
    jintArray out = (*env)->NewIntArray(env, 9);
    if (out) (*env)->SetIntArrayRegion(env, out, 0, 9, v);
    return out;
}

JNIEXPORT jintArray JNICALL FN(nTokenize)(JNIEnv* env, jclass cls, jlong m, jstring text, jboolean add_bos) {
    (void)cls;
    char* t = cstr(env, text);
    if (!t) {
        throw_arg(env, "text is null");
        return NULL;
    }
    int32_t n = 0;
    et_status s = et_tokenize((et_model*)(intptr_t)m, t, add_bos, NULL, 0, &n);
    int32_t* ids = s == ET_OK ? malloc(sizeof(int32_t) * (n > 0 ? n : 1)) : NULL;
    if (s == ET_OK) s = et_tokenize((et_model*)(intptr_t)m, t, add_bos, ids, n, &n);
    free(t);
    if (s != ET_OK) {
        free(ids);
        throw_status(env, s);
        return NULL;
    }
    jintArray out = (*env)->NewIntArray(env, n);
    if (out) (*env)->SetIntArrayRegion(env, out, 0, n, (const jint*)ids);
    free(ids);
    return out;
}

JNIEXPORT jfloatArray JNICALL FN(nLogits)(JNIEnv* env, jclass cls, jlong m, jintArray ids, jintArray positions,
                                         jintArray rows, jint n_vocab) {
    (void)cls;
    if (!ids || !positions) {
        throw_arg(env, "ids and positions are required");
        return NULL;
    }
    const jsize n = (*env)->GetArrayLength(env, ids), p = (*env)->GetArrayLength(env, positions);
    const jsize r = rows ? (*env)->GetArrayLength(env, rows) : n_vocab;
    jint* a = (*env)->GetIntArrayElements(env, ids, NULL);
    jint* b = (*env)->GetIntArrayElements(env, positions, NULL);
    jint* c = rows ? (*env)->GetIntArrayElements(env, rows, NULL) : NULL;
    float* out = malloc(sizeof(float) * (size_t)p * (size_t)(r > 0 ? r : 1));
    et_status s = et_logits((et_model*)(intptr_t)m, (const int32_t*)a, n, (const int32_t*)b, p, (const int32_t*)c,
                            rows ? r : 0, out);
    (*env)->ReleaseIntArrayElements(env, ids, a, JNI_ABORT);
    (*env)->ReleaseIntArrayElements(env, positions, b, JNI_ABORT);
    if (c) (*env)->ReleaseIntArrayElements(env, rows, c, JNI_ABORT);
    if (s != ET_OK) {
        free(out);
        throw_status(env, s);
        return NULL;
    }
    jfloatArray res = (*env)->NewFloatArray(env, p * r);
    if (res) (*env)->SetFloatArrayRegion(env, res, 0, p * r, out);
    free(out);
    return res;
}

JNIEXPORT jlong JNICALL FN(nNewTrainer)(JNIEnv* env, jclass cls, jlong m, jstring method, jstring layers,
                                       jstring estimator, jstring schedule, jstring dist, jstring log_path,
                                       jdouble lr, jdouble eps, jdouble clip, jint q, jint steps, jint warmup,
                                       jlong seed, jintArray labels, jstring data, jboolean resume) {
    (void)cls;
    et_trainer_config c;
    memset(&c, 0, sizeof c);
    char *me = cstr(env, method), *la = cstr(env, layers), *es = cstr(env, estimator), *sc = cstr(env, schedule),
         *di = cstr(env, dist), *lp = cstr(env, log_path), *da = cstr(env, data);
    c.method = me;
    c.layers = la;
    c.estimator = es;
    c.schedule = sc;
    c.dist = di;
    c.log_path = lp;
    c.data = da;
    c.lr = lr;
    c.eps = eps;
    c.clip = clip;
    c.q = q;
    c.steps = steps;
    c.warmup = warmup;
    c.seed = seed;
    jint* lab = labels ? (*env)->GetIntArrayElements(env, labels, NULL) : NULL;
    c.label_tokens = (const int32_t*)lab;
    c.n_labels = labels ? (*env)->GetArrayLength(env, labels) : 0;
    et_trainer* t = NULL;
    int32_t next = 0;
    et_status s = resume ? et_trainer_resume((et_model*)(intptr_t)m, &c, &t, &next)
                         : et_trainer_new((et_model*)(intptr_t)m, &c, &t);
    if (lab) (*env)->ReleaseIntArrayElements(env, labels, lab, JNI_ABORT);
    free(me);
    free(la);
    free(es);
    free(sc);
    free(di);
    free(lp);
    free(da);
    if (s != ET_OK) {
        throw_status(env, s);
        return 0;
    }
    return (jlong)(intptr_t)t;
}

JNIEXPORT void JNICALL FN(nFreeTrainer)(JNIEnv* env, jclass cls, jlong t) {
    (void)env;
    (void)cls;
    et_trainer_free((et_trainer*)(intptr_t)t);
}

JNIEXPORT jint JNICALL FN(nNextStep)(JNIEnv* env, jclass cls, jlong t) {
    (void)env;
    (void)cls;
    return et_trainer_next_step((et_trainer*)(intptr_t)t);
}

JNIEXPORT void JNICALL FN(nCancel)(JNIEnv* env, jclass cls, jlong t) {
    (void)env;
    (void)cls;
    et_trainer_cancel((et_trainer*)(intptr_t)t);
}

struct progress_ctx {
    JNIEnv* env;
    jobject listener;
    jmethodID on_progress;
};

static int on_progress(void* user, int32_t done, int32_t total) {
    struct progress_ctx* p = (struct progress_ctx*)user;
    jboolean stop = (*p->env)->CallBooleanMethod(p->env, p->listener, p->on_progress, (jint)done, (jint)total);
    if ((*p->env)->ExceptionCheck(p->env)) return 1;  /* a throwing listener cancels the step */
    return stop ? 1 : 0;
}

typedef struct {
    jint *ids, *lengths, *ans, *labels;
    et_batch b;
} batch_arrays;

static int get_batch(JNIEnv* env, jintArray ids, jintArray lengths, jintArray ans, jintArray labels, batch_arrays* o) {
    memset(o, 0, sizeof *o);
    if (!ids || !lengths || !ans) {
        throw_arg(env, "batch: ids, lengths and answer positions are required");
        return 0;
    }
    const jsize B = (*env)->GetArrayLength(env, lengths);
    if ((*env)->GetArrayLength(env, ans) != B || (labels && (*env)->GetArrayLength(env, labels) != B)) {
        throw_arg(env, "batch: lengths, answer positions and labels must have one entry per sequence");
        return 0;
    }
    o->ids = (*env)->GetIntArrayElements(env, ids, NULL);
    o->lengths = (*env)->GetIntArrayElements(env, lengths, NULL);
    o->ans = (*env)->GetIntArrayElements(env, ans, NULL);
    o->labels = labels ? (*env)->GetIntArrayElements(env, labels, NULL) : NULL;
    long total = 0;
    for (jsize i = 0; i < B; ++i) total += o->lengths[i] > 0 ? o->lengths[i] : 0;
    if (total > (*env)->GetArrayLength(env, ids)) {
        throw_arg(env, "batch: the lengths add up to more ids than were given");
        return -1;
    }
    o->b.ids = (const int32_t*)o->ids;
    o->b.lengths = (const int32_t*)o->lengths;
    o->b.answer_pos = (const int32_t*)o->ans;
    o->b.labels = (const int32_t*)o->labels;
    o->b.batch = B;
    return 1;
}

static void release_batch(JNIEnv* env, jintArray ids, jintArray lengths, jintArray ans, jintArray labels, batch_arrays* o) {
    if (o->ids) (*env)->ReleaseIntArrayElements(env, ids, o->ids, JNI_ABORT);
    if (o->lengths) (*env)->ReleaseIntArrayElements(env, lengths, o->lengths, JNI_ABORT);
    if (o->ans) (*env)->ReleaseIntArrayElements(env, ans, o->ans, JNI_ABORT);
    if (o->labels) (*env)->ReleaseIntArrayElements(env, labels, o->labels, JNI_ABORT);
}

/* returns {step, queries} in an int[2] and {loss, lr, g_mean_abs} in the double[3] `out` */
JNIEXPORT jintArray JNICALL FN(nStep)(JNIEnv* env, jclass cls, jlong t, jintArray ids, jintArray lengths,
                                     jintArray ans, jintArray labels, jobject listener, jdoubleArray out) {
    (void)cls;
    batch_arrays ba;
    const int ok = get_batch(env, ids, lengths, ans, labels, &ba);
    if (ok <= 0) {
        release_batch(env, ids, lengths, ans, labels, &ba);
        return NULL;
    }
    struct progress_ctx pc = {env, listener, NULL};
    et_trainer* tr = (et_trainer*)(intptr_t)t;
    if (listener) {
        jclass lc = (*env)->GetObjectClass(env, listener);
        pc.on_progress = (*env)->GetMethodID(env, lc, "onProgress", "(II)Z");
        if (!pc.on_progress) {
            release_batch(env, ids, lengths, ans, labels, &ba);
            return NULL;
        }
        et_trainer_set_progress(tr, on_progress, &pc);
    }
    et_step_result r;
    et_status s = et_trainer_step(tr, &ba.b, &r);
    et_trainer_set_progress(tr, NULL, NULL);
    release_batch(env, ids, lengths, ans, labels, &ba);
    if ((*env)->ExceptionCheck(env)) return NULL;  /* the listener threw: let it propagate */
    if (s != ET_OK) {
        throw_status(env, s);
        return NULL;
    }
    jdouble d[3] = {r.loss, r.lr, r.g_mean_abs};
    if (out && (*env)->GetArrayLength(env, out) >= 3) (*env)->SetDoubleArrayRegion(env, out, 0, 3, d);
    jint v[2] = {r.step, r.queries};
    jintArray res = (*env)->NewIntArray(env, 2);
    if (res) (*env)->SetIntArrayRegion(env, res, 0, 2, v);
    return res;
}

JNIEXPORT jfloatArray JNICALL FN(nPredict)(JNIEnv* env, jclass cls, jlong t, jintArray ids, jintArray lengths,
                                          jintArray ans, jint n_labels) {
    (void)cls;
    batch_arrays ba;
    const int ok = get_batch(env, ids, lengths, ans, NULL, &ba);
    if (ok <= 0) {
        release_batch(env, ids, lengths, ans, NULL, &ba);
        return NULL;
    }
    const jsize n = ba.b.batch * n_labels;
    float* out = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    et_status s = et_trainer_predict((et_trainer*)(intptr_t)t, &ba.b, out);
    release_batch(env, ids, lengths, ans, NULL, &ba);
    if (s != ET_OK) {
        free(out);
        throw_status(env, s);
        return NULL;
    }
    jfloatArray res = (*env)->NewFloatArray(env, n);
    if (res) (*env)->SetFloatArrayRegion(env, res, 0, n, out);
    free(out);
    return res;
}

JNIEXPORT void JNICALL FN(nSaveState)(JNIEnv* env, jclass cls, jlong t, jstring path) {
    (void)cls;
    char* p = cstr(env, path);
    if (!p) {
        throw_arg(env, "state path is null");
        return;
    }
    et_status s = et_trainer_save_state((et_trainer*)(intptr_t)t, p);
    free(p);
    if (s != ET_OK) throw_status(env, s);
}

JNIEXPORT void JNICALL FN(nSetThreads)(JNIEnv* env, jclass cls, jint n) {
    (void)cls;
    et_status s = et_set_threads(n);
    if (s != ET_OK) throw_status(env, s);
}
