package org.edgetune;

/** Called on the training thread after each forward pass of a step; return true to cancel it. */
public interface ProgressListener {
    boolean onProgress(int done, int total);
}
