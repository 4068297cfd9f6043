package org.edgetune;

/** The engine an app uses: edgetune's C API (libedgetune.so) through libedgetune_jni.so. */
public final class NativeEngine implements Engine {
    static {
        System.loadLibrary("edgetune_jni");
    }

    public static final NativeEngine INSTANCE = new NativeEngine();

    private NativeEngine() {}

    public static void setThreads(int n) {
        nSetThreads(n);
    }

    @Override public long openModel(String path, long budget) { return nOpenModel(path, budget); }
    @Override public void closeModel(long m) { nCloseModel(m); }
    @Override public int[] modelInfo(long m) { return nModelInfo(m); }
    @Override public int[] tokenize(long m, String text, boolean addBos) { return nTokenize(m, text, addBos); }

    @Override
    public float[] logits(long m, int[] ids, int[] positions, int[] rows) {
        return nLogits(m, ids, positions, rows, nModelInfo(m)[0]);
    }

    @Override
    public long newTrainer(long m, TrainerConfig c, boolean resume) {
        if (c.logPath == null) throw new EdgeTuneException(EdgeTuneException.ARG, "trainer: logPath is required");
        return nNewTrainer(m, c.method, c.layers, c.estimator, c.schedule, c.dist, c.logPath, c.lr, c.eps,
                c.clip, c.q, c.steps, c.warmup, c.seed, c.labelTokens, c.data, resume);
    }

    @Override public void freeTrainer(long t) { nFreeTrainer(t); }
    @Override public int nextStep(long t) { return nNextStep(t); }

    @Override
    public Step step(long t, Batch b, ProgressListener listener) {
        if (b.labels == null) throw new EdgeTuneException(EdgeTuneException.ARG, "batch: labels are required to train");
        double[] d = new double[3];
        int[] r = nStep(t, b.flatIds(), b.lengths(), b.answerPos, b.labels, listener, d);
        return new Step(r[0], d[0], d[1], d[2], r[1]);
    }

    @Override
    public float[] predict(long t, Batch b, int numLabels) {
        return nPredict(t, b.flatIds(), b.lengths(), b.answerPos, numLabels);
    }

    @Override public void saveState(long t, String path) { nSaveState(t, path); }
    @Override public void cancel(long t) { nCancel(t); }

    // JNI: cpp_ext/jni/edgetune_jni.c
    private static native long nOpenModel(String path, long budget);
    private static native void nCloseModel(long m);
    private static native int[] nModelInfo(long m);
    private static native int[] nTokenize(long m, String text, boolean addBos);
    private static native float[] nLogits(long m, int[] ids, int[] positions, int[] rows, int nVocab);
    private static native long nNewTrainer(long m, String method, String layers, String estimator, String schedule,
                                          String dist, String logPath, double lr, double eps, double clip, int q,
                                          int steps, int warmup, long seed, int[] labels, String data,
                                          boolean resume);
    private static native void nFreeTrainer(long t);
    private static native int nNextStep(long t);
    private static native int[] nStep(long t, int[] ids, int[] lengths, int[] ans, int[] labels,
                                     ProgressListener listener, double[] out);
    private static native float[] nPredict(long t, int[] ids, int[] lengths, int[] ans, int numLabels);
    private static native void nSaveState(long t, String path);
    private static native void nCancel(long t);
    private static native void nSetThreads(int n);
}
