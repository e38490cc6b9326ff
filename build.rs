//! Builds the shim to Gloo, the CPU's collectives for data-parallel training
//! (src/distributed), where its headers are: Debian/Ubuntu's `libgloo-dev`, or
//! `GLOO_INCLUDE_DIR` / `GLOO_LIB_DIR`. The shim is a shared object the binary embeds and opens at run time, so only a multi-process
//! launch on the CPU needs libgloo. Without the headers the build goes on without it, and such
//! a launch says what to install.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(marlin_gloo)");
    println!("cargo:rerun-if-changed=src/distributed/gloo.cc");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE_DIR");
    println!("cargo:rerun-if-env-changed=GLOO_LIB_DIR");
    println!("cargo:rerun-if-env-changed=MARLIN_NO_GLOO");
    let unix = std::env::var("CARGO_CFG_TARGET_FAMILY").is_ok_and(|f| f == "unix");
    let roots: Vec<PathBuf> = std::env::var_os("GLOO_INCLUDE_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain(["/usr/include", "/usr/local/include"].map(PathBuf::from))
        .collect();
    let header = "gloo/rendezvous/store.h";
    let include = roots.iter().find(|d| d.join(header).is_file()).cloned();
    // Run again when the headers come or go, so that a build made before `libgloo-dev` was
    // installed gains Gloo at the next `cargo build` instead of saying "install libgloo-dev"
    // forever: the header itself where it is, else the folders it would appear in (a folder
    // counts as changed when an entry is added anywhere under it).
    match &include {
        Some(dir) => println!("cargo:rerun-if-changed={}", dir.join(header).display()),
        None => roots
            .iter()
            .filter(|d| d.is_dir())
            .for_each(|d| println!("cargo:rerun-if-changed={}", d.display())),
    }
    if std::env::var_os("MARLIN_NO_GLOO").is_some() || !unix {
        // Asked for (the wheel), or not a Unix: said once, not as a missing package.
        println!(
            "cargo:warning=Gloo left out: multi-process training on the CPU is off in this build"
        );
        return;
    }
    let Some(include) = include else {
        println!(
            "cargo:warning=no Gloo headers (apt-get install libgloo-dev): multi-process training \
             on the CPU is off in this build"
        );
        return;
    };
    // The shim becomes a shared object of its own, linked to libgloo, that the binary carries
    // and opens when a CPU launch needs Gloo (src/distributed/gloo.rs): the binary itself does
    // not need libgloo to start, so a build made where Gloo is installed runs anywhere.
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let shim = out.join("libmarlin_gloo.so");
    let mut cmd = cc::Build::new()
        .cpp(true)
        .std("c++17")
        .pic(true)
        .opt_level(2)
        .include(include)
        .warnings(false)
        .get_compiler()
        .to_command();
    cmd.arg("-shared")
        .arg("-o")
        .arg(&shim)
        .arg("src/distributed/gloo.cc");
    if let Some(lib) = std::env::var_os("GLOO_LIB_DIR") {
        cmd.arg(format!("-L{}", PathBuf::from(lib).display()));
    }
    cmd.arg("-lgloo");
    match cmd.status() {
        Ok(s) if s.success() => {}
        other => {
            println!(
                "cargo:warning=the Gloo shim did not build ({other:?}): multi-process training \
                 on the CPU is off in this build"
            );
            return;
        }
    }
    println!("cargo:rustc-env=MARLIN_GLOO_SHIM={}", shim.display());
    println!("cargo:rustc-cfg=marlin_gloo");
}
