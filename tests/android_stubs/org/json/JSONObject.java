package org.json;

/** Type-checking stub of Android's org.json.JSONObject. */
public class JSONObject {
    public JSONObject(String json) {}
    public String getString(String key) { throw new UnsupportedOperationException("stub"); }
}
