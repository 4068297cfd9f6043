package org.edgetune;

/** ZO fine-tuning of a {@link Model}: one logged step per {@link #step} call (close it: the seed
 *  log is fsync'd and closed).  {@link #cancel} may be called from any thread. */
public final class Trainer implements AutoCloseable {
    private final Model model;
    private final TrainerConfig config;
    private volatile long handle;

    Trainer(Model model, long handle, TrainerConfig config) {
        this.model = model;
        this.handle = handle;
        this.config = config;
    }

    private long h() {
        long v = handle;
        if (v == 0) throw new EdgeTuneException(EdgeTuneException.ARG, "the trainer is closed");
        return v;
    }

    public int nextStep() {
        return model.engine().nextStep(h());
    }

    public Step step(Batch batch) {
        return step(batch, null);
    }

    public Step step(Batch batch, ProgressListener listener) {
        return model.engine().step(h(), batch, listener);
    }

    /** Predicted class of each sequence (argmax of the label-word logits). */
    public int[] predict(Batch batch) {
        int c = config.labelTokens.length;
        float[] lg = model.engine().predict(h(), batch, c);
        int[] out = new int[batch.size()];
        for (int b = 0; b < out.length; b++) {
            int best = 0;
            for (int k = 1; k < c; k++) if (lg[b * c + k] > lg[b * c + best]) best = k;
            out[b] = best;
        }
        return out;
    }

    /** The trained state as an .npz that `edgetune` (Python) loads and exports. */
    public void saveState(String path) {
        model.engine().saveState(h(), path);
    }

    public void cancel() {
        long v = handle;
        if (v != 0) model.engine().cancel(v);
    }

    @Override
    public void close() {
        long v = handle;
        if (v != 0) {
            handle = 0;
            model.engine().freeTrainer(v);
        }
    }
}
