//! Embeds the web UI in the binary: every file of `webui/ui/dist` (built by
//! `scripts/build-ui.sh`) becomes an entry of `$OUT_DIR/assets.rs`, a table of URL path,
//! content type and bytes, sorted by path, that `src/assets.rs` serves.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let dist = manifest.join("ui").join("dist");
    println!("cargo:rerun-if-changed={}", dist.display());
    if !dist.join("index.html").is_file() {
        eprintln!(
            "\nerror: the web UI is not built: {} has no index.html.\n\
             Run scripts/build-ui.sh (scripts/setup.sh runs it) before building enspeed.\n",
            dist.display()
        );
        std::process::exit(1);
    }
    let mut files = Vec::new();
    walk(&dist, &mut files);
    let mut entries: Vec<(String, PathBuf)> = files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(&dist).expect("under dist");
            let url = rel
                .components()
                .map(|c| c.as_os_str().to_str().expect("UI file names are UTF-8"))
                .fold(String::new(), |mut s, c| {
                    s.push('/');
                    s.push_str(c);
                    s
                });
            (url, p)
        })
        .collect();
    entries.sort();
    let mut out = String::from(
        "/// The UI's files: URL path, content type and bytes, sorted by path.\n\
         pub static FILES: &[(&str, &str, &[u8])] = &[\n",
    );
    for (url, path) in &entries {
        println!("cargo:rerun-if-changed={}", path.display());
        let abs = path.to_str().expect("UI file paths are UTF-8");
        writeln!(
            out,
            "    ({url:?}, {:?}, include_bytes!({abs:?})),",
            content_type(path)
        )
        .expect("write to a String");
    }
    out.push_str("];\n");
    let dest = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it")).join("assets.rs");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
}

/// Every file under `dir`, but hidden ones (the build's own stamp).
fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for e in entries {
        let e = e.unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let p = e.path();
        if p.is_dir() {
            println!("cargo:rerun-if-changed={}", p.display());
            walk(&p, files);
        } else {
            files.push(p);
        }
    }
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "webmanifest" => "application/manifest+json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "ttf" => "font/ttf",
        "txt" => "text/plain; charset=utf-8",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}
