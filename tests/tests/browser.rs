//! The web UI in a real browser: a three-server cluster on loopback (`WebCluster`), and
//! `tests/browser/ui.test.mjs` driving Debian's Chromium through playwright-core as a Manager,
//! a Power User and a Regular User, each on a different server: users and a VM created, the VM
//! powered on and off by its owner with the status following without a reload, deleted by its
//! Power User, what each role's tabs show. Screenshots of every page are kept in
//! `$ENSPEED_ARTIFACTS` (default: the Cargo target directory's `ui-screenshots`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use enspeed_tests::web::{WebCluster, PASSWORD};
use enspeed_tests::{enspeed_bin, kvm_available, repo_root};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Where the screenshots go: `$ENSPEED_ARTIFACTS`, else `<target>/ui-screenshots`.
fn artifacts() -> PathBuf {
    if let Some(d) = std::env::var_os("ENSPEED_ARTIFACTS") {
        return d.into();
    }
    // <target>/release/enspeed
    let bin = enspeed_bin();
    let target = bin
        .parent()
        .and_then(Path::parent)
        .expect("the binary lies in <target>/<profile>");
    target.join("ui-screenshots")
}

/// Every server serves the embedded UI: `index.html` at every app path with the CSP and no
/// caching, the hashed files it loads as immutable, a clear 404 for a missing hashed file, and
/// 405 for a change outside the API.
fn ui_files_are_served(base: &str) {
    let get = |path: &str| match ureq::get(&format!("{base}{path}")).call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {base}{path}: {e}"),
    };
    let mut script = None;
    for path in ["/", "/vms", "/users/12", "/login"] {
        let r = get(path);
        assert_eq!(r.status(), 200, "GET {path}");
        assert_eq!(
            r.header("content-type"),
            Some("text/html; charset=utf-8"),
            "GET {path}"
        );
        assert_eq!(r.header("cache-control"), Some("no-cache"), "GET {path}");
        let csp = r
            .header("content-security-policy")
            .unwrap_or("")
            .to_string();
        assert!(
            csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "GET {path}: CSP {csp:?}"
        );
        let html = r.into_string().expect("index.html");
        assert!(html.contains("<div id=\"app\""), "GET {path}: {html}");
        script = html
            .split("src=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .map(str::to_string);
    }
    let script = script.expect("index.html loads a script");
    let r = get(&script);
    assert_eq!(r.status(), 200, "GET {script}");
    assert_eq!(
        r.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(
        r.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    let missing = get("/assets/no-such-file.js");
    assert_eq!(missing.status(), 404);
    assert!(missing.into_string().unwrap().contains("no UI file"));
    match ureq::post(&format!("{base}/vms")).send_string("") {
        Err(ureq::Error::Status(405, r)) => {
            assert_eq!(r.header("allow"), Some("GET, HEAD"))
        }
        other => panic!("POST /vms: {other:?}"),
    }
    // The API is untouched: its own 404 for an unknown endpoint.
    let api = get("/api/v1/nothing");
    assert_eq!(api.status(), 404);
    assert_eq!(api.header("content-type"), Some("application/json"));
}

#[test]
fn the_ui_in_chromium_as_manager_power_user_and_regular_user() {
    if !kvm_available("the_ui_in_chromium") {
        return;
    }
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium"
    );
    let dir = repo_root().join("tests/browser");
    // Cheap when its node_modules already matches the lock.
    let npm = Command::new(repo_root().join("scripts/npm-ci.sh"))
        .arg(&dir)
        .status()
        .expect("run scripts/npm-ci.sh");
    assert!(npm.success(), "npm ci in {} failed", dir.display());

    // For the console page, the test guest (entered with boot_params, which describe the
    // framebuffer) paints its pattern, reads a line typed on the graphical console's keyboard,
    // then echoes what is typed on its serial console.
    let scratch = enspeed_tests::Scratch::new("browser-guest");
    let kernel = enspeed_tests::linux64_testguest(&scratch);
    let cluster = WebCluster::start(
        "browser",
        &[
            "--guest-kernel",
            kernel.to_str().unwrap(),
            "--guest-cmdline",
            "console=ttyS0 tg.run=fb,keys,echo tg.keylines=1 tg.kbdms=300000 tg.echoms=300000",
        ],
    );
    for base in &cluster.web {
        ui_files_are_served(base);
    }
    // A fourth server waiting to be added through the UI (a witness: it runs no VMs).
    let mut waiting = enspeed_tests::cluster::Server::new(
        4,
        format!("127.0.0.1:{}", enspeed_tests::cluster::free_port()),
        scratch.path("server4"),
        &["--witness"],
    );
    let token = waiting.start_awaiting_join();
    // An appliance to import: the boot disk (a BIOS boots it, it powers off) in an OVA as
    // VirtualBox writes one, its disk a stream-optimized VMDK.
    let ova_dir = scratch.path("ova");
    std::fs::create_dir_all(&ova_dir).unwrap();
    let ova = scratch.path("boot-disk.ova");
    std::fs::write(
        &ova,
        enspeed_tests::ova::one_disk(
            "bootdisk",
            &enspeed_tests::bootdisk(),
            "vmdk",
            &ova_dir,
            true,
        ),
    )
    .unwrap();
    // An appliance directory offering the same OVA (its catalogue names it with its SHA-256).
    let ova_bytes = std::fs::read(&ova).unwrap();
    let directory = enspeed_tests::web::serve_files(|site| {
        use sha2::Digest;
        let sha: String = sha2::Sha256::digest(&ova_bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let catalogue = serde_json::json!([{"name": "from-directory",
            "description": "the boot disk, from a directory", "size": ova_bytes.len(),
            "sha256": sha, "url": format!("{site}/boot-disk.ova")}]);
        vec![
            ("/boot-disk.ova".into(), ova_bytes.clone()),
            ("/catalogue.json".into(), catalogue.to_string().into_bytes()),
        ]
    });
    let artifacts = artifacts();
    println!(
        "browser test: servers {:?}; screenshots in {}",
        cluster.web,
        artifacts.display()
    );
    let mut child = Command::new("node")
        .arg("ui.test.mjs")
        .current_dir(&dir)
        .env("ENSPEED_WEB", cluster.web.join(","))
        .env("ENSPEED_MANAGER", "admin")
        .env("ENSPEED_MANAGER_PASSWORD", PASSWORD)
        .env("ENSPEED_ARTIFACTS", &artifacts)
        .env("ENSPEED_CHROMIUM", CHROMIUM)
        .env("ENSPEED_NEW_SERVER", &waiting.addr)
        .env("ENSPEED_NEW_SERVER_TOKEN", &token)
        .env("ENSPEED_BARS_ISO", enspeed_tests::bars_iso())
        .env("ENSPEED_INSTALLER_ISO", enspeed_tests::installer_iso())
        .env("ENSPEED_OVA", &ova)
        .env("ENSPEED_DIRECTORY", format!("{directory}/catalogue.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node (scripts/setup.sh installs it)");
    // Through the test harness's output, so it shows with --nocapture or on failure.
    let stderr = child.stderr.take().expect("piped");
    let errs = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
        }
    });
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        println!("{line}");
    }
    let status = child.wait().expect("wait for node");
    errs.join().expect("stderr reader");
    // The bridge the test's network had on this machine.
    let _ = Command::new("ip")
        .args(["link", "del", "br-uitest"])
        .status();
    assert!(
        status.success(),
        "the browser test failed ({status}); screenshots in {}",
        artifacts.display()
    );
    // noVNC lists Zlib among its encodings: the VMMs sent the screens it showed compressed.
    // Each VM's VMM logs to agent/vms/NAME/vmm.log in its server's data directory.
    let logs: Vec<String> = cluster
        .servers
        .iter()
        .flat_map(|s| {
            std::fs::read_dir(s.data.join("agent/vms"))
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter_map(|vm| std::fs::read_to_string(vm.path().join("vmm.log")).ok())
        .collect();
    assert!(
        logs.iter()
            .any(|l| l.contains("RFB client's updates change encoding")
                && l.contains("encoding=\"zlib\"")),
        "no VMM log says a console client got Zlib-encoded updates"
    );
}
