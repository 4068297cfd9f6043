package android.content;

/** Type-checking stub (tests/test_capi_jni.py): just the members the sample app uses. */
public abstract class Context {
    public java.io.File getFilesDir() { throw new UnsupportedOperationException("stub"); }
    public java.io.File getExternalFilesDir(String type) { throw new UnsupportedOperationException("stub"); }
}
