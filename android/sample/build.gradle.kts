// The sample app: copies a GGUF and a JSONL file from its external files directory, fine-tunes
// the label-word head for a few ZO steps with a progress callback, shows the loss and the
// predictions before and after (MainActivity.java).
plugins {
    id("com.android.application")
}

android {
    namespace = "org.edgetune.sample"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.edgetune.sample"
        minSdk = 26
        targetSdk = 35
        versionCode = 1
        versionName = "0.1"
        ndk {
            abiFilters += listOf("arm64-v8a", "x86_64")
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
}

dependencies {
    implementation(project(":edgetune"))
}
