package org.edgetune;

/** A training (or prediction) batch: token ids per sequence, the answer position of each, and
 *  its class index (labels may be null for prediction). */
public final class Batch {
    public final int[][] ids;
    public final int[] answerPos;
    public final int[] labels;

    public Batch(int[][] ids, int[] answerPos, int[] labels) {
        if (ids == null || answerPos == null || ids.length != answerPos.length
                || (labels != null && labels.length != ids.length)) {
            throw new EdgeTuneException(EdgeTuneException.ARG,
                    "batch: ids, answer positions and labels need one entry per sequence");
        }
        this.ids = ids;
        this.answerPos = answerPos;
        this.labels = labels;
    }

    public int size() {
        return ids.length;
    }

    int[] flatIds() {
        int n = 0;
        for (int[] s : ids) n += s.length;
        int[] out = new int[n];
        int o = 0;
        for (int[] s : ids) {
            System.arraycopy(s, 0, out, o, s.length);
            o += s.length;
        }
        return out;
    }

    int[] lengths() {
        int[] out = new int[ids.length];
        for (int i = 0; i < ids.length; i++) out[i] = ids[i].length;
        return out;
    }
}
