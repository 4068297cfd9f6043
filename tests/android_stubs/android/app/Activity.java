package android.app;

/** Type-checking stub (tests/test_capi_jni.py): just the members the sample app uses. */
public class Activity extends android.content.Context {
    protected void onCreate(android.os.Bundle state) {}
    protected void onPause() {}
    public void setContentView(android.view.View v) {}
    public final void runOnUiThread(Runnable r) { r.run(); }
}
