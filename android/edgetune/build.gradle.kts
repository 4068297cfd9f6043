// org.edgetune: the Java API (Model, Trainer, Step, Engine) and libedgetune.so +
// libedgetune_jni.so, compiled by the NDK from the same CMake sources as the Python extension
// (../../cpp_ext, option EDGETUNE_CAPI) for arm64-v8a (NEON dotprod kernels) and x86_64.
plugins {
    id("com.android.library")
}

android {
    namespace = "org.edgetune"
    compileSdk = 35
    ndkVersion = "27.2.12479018"

    defaultConfig {
        minSdk = 26
        ndk {
            abiFilters += listOf("arm64-v8a", "x86_64")
        }
        externalNativeBuild {
            cmake {
                arguments += listOf(
                    "-DEDGETUNE_CAPI=ON",
                    "-DEDGETUNE_PYTHON=OFF",
                    "-DEDGETUNE_TESTS=OFF",
                    "-DANDROID_STL=c++_shared",
                )
                cppFlags += listOf("-std=c++17")
                targets += listOf("edgetune", "edgetune_jni")
            }
        }
    }
    externalNativeBuild {
        cmake {
            path = file("../../cpp_ext/CMakeLists.txt")
            version = "3.22.1"
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }
}
