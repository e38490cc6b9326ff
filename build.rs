//! Links Gloo, the CPU's collectives for data-parallel training (src/dist), where its headers
//! are: Debian/Ubuntu's `libgloo-dev`, or `GLOO_INCLUDE_DIR` / `GLOO_LIB_DIR`. Without them the
//! build goes on without it, and a multi-process launch on the CPU says what to install.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(marlin_gloo)");
    println!("cargo:rerun-if-changed=src/dist/gloo.cc");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE_DIR");
    println!("cargo:rerun-if-env-changed=GLOO_LIB_DIR");
    println!("cargo:rerun-if-env-changed=MARLIN_NO_GLOO");
    let unix = std::env::var("CARGO_CFG_TARGET_FAMILY").is_ok_and(|f| f == "unix");
    let include = std::env::var_os("GLOO_INCLUDE_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain(["/usr/include", "/usr/local/include"].map(PathBuf::from))
        .find(|d| d.join("gloo/rendezvous/store.h").is_file());
    let Some(include) = include.filter(|_| unix && std::env::var_os("MARLIN_NO_GLOO").is_none())
    else {
        println!(
            "cargo:warning=no Gloo headers (apt-get install libgloo-dev): multi-process training \
             on the CPU is off in this build"
        );
        return;
    };
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .include(&include)
        .file("src/dist/gloo.cc")
        .warnings(false)
        .compile("marlin_gloo");
    if let Some(lib) = std::env::var_os("GLOO_LIB_DIR") {
        println!(
            "cargo:rustc-link-search=native={}",
            PathBuf::from(lib).display()
        );
    }
    println!("cargo:rustc-link-lib=dylib=gloo");
    println!("cargo:rustc-cfg=marlin_gloo");
}
