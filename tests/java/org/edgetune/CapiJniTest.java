package org.edgetune;

import java.io.File;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicReference;

/**
 * The Java API on the host JVM over libedgetune_jni.so (run by tests/test_capi_jni.py):
 * open the model, tokenize, 3 logged ZO steps with a progress listener, predict, save the state,
 * resume, cancel (listener and another thread), errors as EdgeTuneException with edgetune's
 * message, and a stub Engine standing in for the native one.
 *   java org.edgetune.CapiJniTest MODEL.gguf TWEETS.tsv OUT_DIR
 */
public final class CapiJniTest {
    static final String TEMPLATE = "Tweet: %s\nSentiment (negative, neutral or positive):";

    static void check(boolean ok, String what) {
        if (!ok) throw new AssertionError(what);
    }

    static EdgeTuneException expectError(Runnable r, int status, String inMessage) {
        try {
            r.run();
        } catch (EdgeTuneException e) {
            check(e.status == status, "status " + e.status + " != " + status + ": " + e.getMessage());
            check(e.getMessage().contains(inMessage), "message lacks '" + inMessage + "': " + e.getMessage());
            return e;
        }
        throw new AssertionError("no EdgeTuneException (wanted status " + status + ")");
    }

    static Batch batch(Model m, List<String[]> rows, int from, int n) {
        int[][] ids = new int[n][];
        int[] pos = new int[n], lab = new int[n];
        for (int i = 0; i < n; i++) {
            String[] r = rows.get(from + i);
            ids[i] = m.tokenize(String.format(TEMPLATE, r[1]), false);
            pos[i] = ids[i].length - 1;
            lab[i] = Integer.parseInt(r[0]);
        }
        return new Batch(ids, pos, lab);
    }

    public static void main(String[] args) throws Exception {
        String modelPath = args[0], out = args[2];
        List<String[]> rows = new ArrayList<>();
        for (String line : Files.readAllLines(new File(args[1]).toPath())) rows.add(line.split("\t", 2));
        long t0 = System.nanoTime();
        try (Model m = Model.open(modelPath, 0)) {
            check(m.nVocab == 49152 && m.nLayer == 30, "model shape");
            int[] labels = new int[3];
            String[] words = {" negative", " neutral", " positive"};
            for (int i = 0; i < 3; i++) {
                int[] t = m.tokenize(words[i], false);
                check(t.length == 1, "label word is one token");
                labels[i] = t[0];
            }
            check(labels[0] == 3524 && labels[1] == 9174 && labels[2] == 2731, "label ids");
            float[] lg = m.logits(m.tokenize("The capital of France is", false), new int[] {-1}, labels);
            check(lg.length == 3 && Float.isFinite(lg[0]), "logits");

            String log = out + "/seedlog.jsonl";
            TrainerConfig cfg = new TrainerConfig().method("head").q(8).lr(1.0).steps(3).seed(7)
                    .labelTokens(labels).logPath(log);
            AtomicInteger calls = new AtomicInteger();
            try (Trainer t = m.trainer(cfg, false)) {
                for (int s = 0; s < 3; s++) {
                    Step st = t.step(batch(m, rows, 4 * s, 4), (done, total) -> {
                        calls.incrementAndGet();
                        return false;
                    });
                    check(st.step == s && Double.isFinite(st.loss) && st.loss > 0, "step " + st);
                    System.out.println("java: " + st);
                }
                check(calls.get() >= 3, "progress listener called");
                int[] pred = t.predict(batch(m, rows, 12, 4));
                for (int p : pred) check(p >= 0 && p < 3, "prediction in range");
                t.saveState(out + "/state.npz");
                // a listener returning true cancels the step: nothing logged
                expectError(() -> t.step(batch(m, rows, 0, 4), (d, n) -> true), EdgeTuneException.CANCELLED,
                        "cancelled");
                check(t.nextStep() == 3, "cancelled step not counted");
                // bad batch
                expectError(() -> t.step(new Batch(new int[][] {{1, 2, 3}}, new int[] {5}, new int[] {0})),
                        EdgeTuneException.ARG, "answer position");
            }
            check(new File(out + "/state.npz").length() > 0, "state written");
            check(Files.readAllLines(new File(log).toPath()).size() == 4, "header + 3 step records");

            // errors carry edgetune's message
            expectError(() -> Model.open(out + "/missing.gguf", 0), EdgeTuneException.IO, "missing.gguf");
            expectError(() -> Model.open(modelPath, 10L << 20), EdgeTuneException.BUDGET, "needs at least");
            expectError(() -> m.trainer(cfg, false), EdgeTuneException.ARG, "already exists");
            expectError(() -> m.trainer(new TrainerConfig().method("sparse").labelTokens(labels)
                    .logPath(out + "/x.jsonl"), false), EdgeTuneException.UNSUPPORTED, "sparse");

            // resume continues the logged run
            try (Trainer t = m.trainer(cfg, true)) {
                check(t.nextStep() == 3, "resumed at step 3");
            }

            // cancel from another thread while a (long) step runs
            TrainerConfig big = new TrainerConfig().method("scales").q(8).lr(1e-3).steps(3)
                    .labelTokens(labels).logPath(out + "/cancel.jsonl");
            try (Trainer t = m.trainer(big, false)) {
                AtomicReference<Throwable> err = new AtomicReference<>();
                Thread th = new Thread(() -> {
                    try {
                        t.step(batch(m, rows, 0, 4));
                    } catch (Throwable e) {
                        err.set(e);
                    }
                });
                long c0 = System.nanoTime();
                th.start();
                Thread.sleep(200);
                t.cancel();
                th.join();
                check(err.get() instanceof EdgeTuneException
                        && ((EdgeTuneException) err.get()).status == EdgeTuneException.CANCELLED,
                        "cancelled from another thread: " + err.get());
                System.out.printf("java: cancelled from another thread after %.2f s%n", (System.nanoTime() - c0) / 1e9);
                check(t.nextStep() == 0, "nothing logged");
            }
        }

        // an app's unit test swaps in a stub engine
        Engine stub = new Engine() {
            public long openModel(String p, long b) { return 42; }
            public void closeModel(long m) {}
            public int[] modelInfo(long m) { return new int[] {10, 4, 1, 1, 1, 8, 16, 1, 2}; }
            public int[] tokenize(long m, String t, boolean b) { return new int[] {3, 4}; }
            public float[] logits(long m, int[] i, int[] p, int[] r) { return new float[p.length * r.length]; }
            public long newTrainer(long m, TrainerConfig c, boolean r) { return 7; }
            public void freeTrainer(long t) {}
            public int nextStep(long t) { return 0; }
            public Step step(long t, Batch b, ProgressListener l) { return new Step(0, 0.5, 1.0, 0.1, 1); }
            public float[] predict(long t, Batch b, int n) { return new float[] {0f, 1f, 0f}; }
            public void saveState(long t, String p) {}
            public void cancel(long t) {}
        };
        try (Model m = Model.open(stub, "stub.gguf", 0);
             Trainer t = m.trainer(new TrainerConfig().labelTokens(1, 2, 3).logPath("x"), false)) {
            check(m.nVocab == 10 && t.step(new Batch(new int[][] {{3, 4}}, new int[] {1}, new int[] {0})).loss == 0.5,
                    "stub engine");
            check(t.predict(new Batch(new int[][] {{3, 4}}, new int[] {1}, null))[0] == 1, "stub predict");
        }
        System.out.printf("JNI test PASSED in %.1f s%n", (System.nanoTime() - t0) / 1e9);
    }
}
