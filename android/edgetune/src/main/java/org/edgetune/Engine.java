package org.edgetune;

/**
 * What {@link Model} and {@link Trainer} call: {@link NativeEngine} (the C API over JNI) in an app,
 * or a stub in the app's own unit tests.  Handles are opaque longs owned by the engine.
 */
public interface Engine {
    long openModel(String path, long memoryBudgetBytes);

    void closeModel(long model);

    /** {n_vocab, n_embd, n_layer, n_head, n_head_kv, n_ff, context_length, bos_id, eos_id} */
    int[] modelInfo(long model);

    int[] tokenize(long model, String text, boolean addBos);

    /** Logits [positions.length x (rows == null ? n_vocab : rows.length)], row-major. */
    float[] logits(long model, int[] ids, int[] positions, int[] rows);

    long newTrainer(long model, TrainerConfig config, boolean resume);

    void freeTrainer(long trainer);

    int nextStep(long trainer);

    Step step(long trainer, Batch batch, ProgressListener listener);

    /** Label-word logits [batch x labels] under the trained state. */
    float[] predict(long trainer, Batch batch, int numLabels);

    void saveState(long trainer, String path);

    /** Any thread: the running (or next) step stops with EdgeTuneException.CANCELLED. */
    void cancel(long trainer);
}
