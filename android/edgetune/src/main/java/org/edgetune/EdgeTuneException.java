package org.edgetune;

/** A failed edgetune call: {@link #status} is the C API's et_status, the message edgetune's own. */
public class EdgeTuneException extends RuntimeException {
    private static final long serialVersionUID = 1L;
    public static final int ARG = 1, IO = 2, FORMAT = 3, UNSUPPORTED = 4, BUDGET = 5, CANCELLED = 6,
            NONFINITE = 7, INTERNAL = 8;

    public final int status;

    public EdgeTuneException(int status, String message) {
        super(message);
        this.status = status;
    }
}
