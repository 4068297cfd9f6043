package org.edgetune;

/** The result of one logged ZO step. */
public final class Step {
    public final int step;
    public final double loss;
    public final double lr;
    public final double gradMeanAbs;
    public final int queries;

    public Step(int step, double loss, double lr, double gradMeanAbs, int queries) {
        this.step = step;
        this.loss = loss;
        this.lr = lr;
        this.gradMeanAbs = gradMeanAbs;
        this.queries = queries;
    }

    @Override
    public String toString() {
        return "step " + step + " loss " + loss + " lr " + lr;
    }
}
