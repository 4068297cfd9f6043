package org.edgetune.sample;

import android.app.Activity;
import android.os.Bundle;
import android.widget.TextView;

import java.io.BufferedReader;
import java.io.File;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.InputStreamReader;
import java.io.InputStream;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;

import org.edgetune.Batch;
import org.edgetune.EdgeTuneException;
import org.edgetune.Model;
import org.edgetune.Step;
import org.edgetune.Trainer;
import org.edgetune.TrainerConfig;
import org.json.JSONObject;

/**
 * One screen: copy model.gguf and tweets.jsonl ({"text": ..., "label": "negative|neutral|positive"})
 * from the app's external files directory into its private storage, show the predictions of the
 * first examples, fine-tune the label-word head for a few ZO steps (the loss after each one),
 * show the predictions again.  Going to the background cancels the running step; the next
 * launch resumes the seed log.
 */
public class MainActivity extends Activity {
    static final String TEMPLATE = "Tweet: %s\nSentiment (negative, neutral or positive):";
    static final String[] LABELS = {"negative", "neutral", "positive"};
    static final int STEPS = 20, BATCH = 8;

    private TextView view;
    private volatile Trainer trainer;

    @Override
    protected void onCreate(Bundle state) {
        super.onCreate(state);
        view = new TextView(this);
        setContentView(view);
        new Thread(this::run, "edgetune").start();
    }

    @Override
    protected void onPause() {
        super.onPause();
        Trainer t = trainer;
        if (t != null) t.cancel();   // the step in flight stops; nothing half-done is logged
    }

    private void show(String line) {
        runOnUiThread(() -> view.append(line + "\n"));
    }

    private static File copy(File from, File to) throws Exception {
        if (to.exists() && to.length() == from.length()) return to;
        try (InputStream in = new FileInputStream(from); OutputStream out = new FileOutputStream(to)) {
            byte[] buf = new byte[1 << 16];
            for (int n; (n = in.read(buf)) > 0; ) out.write(buf, 0, n);
        }
        return to;
    }

    static List<String[]> readJsonl(File f) throws Exception {
        List<String[]> rows = new ArrayList<>();
        try (BufferedReader r = new BufferedReader(new InputStreamReader(new FileInputStream(f), StandardCharsets.UTF_8))) {
            for (String line; (line = r.readLine()) != null; ) {
                if (line.trim().isEmpty()) continue;
                JSONObject o = new JSONObject(line);
                rows.add(new String[] {o.getString("text"), o.getString("label")});
            }
        }
        return rows;
    }

    static Batch batch(Model m, List<String[]> rows, int from, int n) {
        int[][] ids = new int[n][];
        int[] pos = new int[n], lab = new int[n];
        for (int i = 0; i < n; i++) {
            String[] r = rows.get((from + i) % rows.size());
            ids[i] = m.tokenize(String.format(TEMPLATE, r[0]), false);
            pos[i] = ids[i].length - 1;
            lab[i] = java.util.Arrays.asList(LABELS).indexOf(r[1]);
        }
        return new Batch(ids, pos, lab);
    }

    private void run() {
        try {
            File ext = getExternalFilesDir(null), dir = getFilesDir();
            File gguf = copy(new File(ext, "model.gguf"), new File(dir, "model.gguf"));
            List<String[]> rows = readJsonl(copy(new File(ext, "tweets.jsonl"), new File(dir, "tweets.jsonl")));
            try (Model m = Model.open(gguf.getPath(), 1L << 30)) {   // refuse to run above 1 GiB
                int[] labels = new int[LABELS.length];
                for (int i = 0; i < LABELS.length; i++) labels[i] = m.tokenize(" " + LABELS[i], false)[0];
                File log = new File(dir, "seedlog.jsonl");
                TrainerConfig cfg = new TrainerConfig().method("head").q(64).lr(1.0).steps(STEPS)
                        .labelTokens(labels).logPath(log.getPath());
                try (Trainer t = m.trainer(cfg, log.exists())) {
                    trainer = t;
                    Batch probe = batch(m, rows, 0, Math.min(8, rows.size()));
                    show("before: " + describe(t.predict(probe), rows));
                    for (int s = t.nextStep(); s < STEPS; s++) {
                        final int step = s;
                        Step r = t.step(batch(m, rows, s * BATCH, BATCH),
                                (done, total) -> { show("step " + step + ": pass " + done + "/" + total); return false; });
                        show(String.format("step %d  loss %.4f  lr %.3g", r.step, r.loss, r.lr));
                    }
                    show("after:  " + describe(t.predict(probe), rows));
                    t.saveState(new File(dir, "state.npz").getPath());   // `edgetune export` turns it into a GGUF
                } finally {
                    trainer = null;
                }
            }
        } catch (EdgeTuneException e) {
            show(e.status == EdgeTuneException.CANCELLED ? "paused (resumes next time)" : "edgetune: " + e.getMessage());
        } catch (Exception e) {
            show("error: " + e);
        }
    }

    private static String describe(int[] pred, List<String[]> rows) {
        StringBuilder b = new StringBuilder();
        int ok = 0;
        for (int i = 0; i < pred.length; i++) {
            b.append(LABELS[pred[i]].charAt(0));
            if (LABELS[pred[i]].equals(rows.get(i)[1])) ok++;
        }
        return b + "  (" + ok + "/" + pred.length + " right)";
    }
}
