// The edgetune Android build: the library module (Java API + JNI over edgetune's C++ core, built
// by the NDK from ../cpp_ext with CMake) and a one-Activity sample app.  See README.md.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}
rootProject.name = "edgetune-android"
include(":edgetune", ":sample")
