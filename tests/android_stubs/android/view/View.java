package android.view;

/** Type-checking stub. */
public class View {
    public View(android.content.Context c) {}
}
