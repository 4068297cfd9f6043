package android.widget;

/** Type-checking stub. */
public class TextView extends android.view.View {
    public TextView(android.content.Context c) { super(c); }
    public void setText(CharSequence s) {}
    public void append(CharSequence s) {}
}
