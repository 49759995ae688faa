//! Links the guest binary with our own linker script at physical 1 MiB,
//! without the host C runtime. Only the bin gets these arguments
//! (`rustc-link-arg-bins`), the build script itself links normally.
//!
//! The script is copied into OUT_DIR and named from there: a target directory shared by
//! clones at different paths (CI's fresh clone, a work tree) keeps this script's output
//! across them, so it must not name a path inside one clone.
fn main() {
    let out = std::env::var("OUT_DIR").expect("OUT_DIR");
    let script = std::path::Path::new(&out).join("link.ld");
    std::fs::write(&script, include_str!("link.ld")).expect("write link.ld into OUT_DIR");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,max-page-size=4096",
        "-Wl,-z,norelro",
        "-Wl,-z,noexecstack",
        "-Wl,--no-eh-frame-hdr",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
}
