//! Compiles bpf/policy.c with clang (installed by scripts/setup.sh) into
//! OUT_DIR; the agent embeds the object.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bpf/policy.c");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("policy.o");
    println!("cargo:rerun-if-changed={}", src.display());
    let status = Command::new("clang")
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu", "-c"])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run clang to build {} ({e}): run scripts/setup.sh", src.display()));
    assert!(status.success(), "clang failed on {}", src.display());
}
