package org.edgetune;

/** A GGUF model opened by an {@link Engine} (close it: it holds a memory map). */
public final class Model implements AutoCloseable {
    private final Engine engine;
    private long handle;
    public final int nVocab, nEmbd, nLayer, bosId, eosId;

    private Model(Engine engine, long handle) {
        this.engine = engine;
        this.handle = handle;
        int[] i = engine.modelInfo(handle);
        nVocab = i[0];
        nEmbd = i[1];
        nLayer = i[2];
        bosId = i[7];
        eosId = i[8];
    }

    /** Opens with the native engine; memoryBudgetBytes 0 = no limit (else refused if it won't fit). */
    public static Model open(String path, long memoryBudgetBytes) {
        return open(NativeEngine.INSTANCE, path, memoryBudgetBytes);
    }

    public static Model open(Engine engine, String path, long memoryBudgetBytes) {
        return new Model(engine, engine.openModel(path, memoryBudgetBytes));
    }

    long handle() {
        if (handle == 0) throw new EdgeTuneException(EdgeTuneException.ARG, "the model is closed");
        return handle;
    }

    Engine engine() {
        return engine;
    }

    public int[] tokenize(String text, boolean addBos) {
        return engine.tokenize(handle(), text, addBos);
    }

    /** Logits at `positions` for vocabulary `rows` (null: all), [positions x rows] row-major. */
    public float[] logits(int[] ids, int[] positions, int[] rows) {
        return engine.logits(handle(), ids, positions, rows);
    }

    /** A new run writing config.logPath; resume=true continues the log there instead. */
    public Trainer trainer(TrainerConfig config, boolean resume) {
        return new Trainer(this, engine.newTrainer(handle(), config, resume), config);
    }

    @Override
    public void close() {
        if (handle != 0) {
            engine.closeModel(handle);
            handle = 0;
        }
    }
}
