//! Builds every wasm crate of the workspace for `wasm32-unknown-unknown` with the `wasm`
//! profile (lto, panic = abort, strip) and copies the `.wasm` files into `OUT_DIR`.
//!
//! A nested cargo build with its own target directory: the outer build holds the lock on
//! the main target directory, and the wasm target needs a different profile anyway.

use std::path::{Path, PathBuf};
use std::process::Command;

/// (package, file stem cargo produces, file name it is shipped as). The policy module's
/// library is `altroute_policy_module` (a lib named `altroute_policy` would collide with
/// the policy crate's); it ships as `altroute_policy.wasm`.
const MODULES: &[(&str, &str, &str)] = &[
    (
        "altroute-policy-module",
        "altroute_policy_module",
        "altroute_policy.wasm",
    ),
    (
        "altroute-testguest",
        "altroute_testguest",
        "altroute_testguest.wasm",
    ),
    (
        "altroute-ext-finance-secure",
        "altroute_ext_finance_secure",
        "finance_secure.wasm",
    ),
    (
        "altroute-ext-business-hours",
        "altroute_ext_business_hours",
        "business_hours.wasm",
    ),
];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir
        .parent()
        .and_then(Path::parent)
        .expect("crates/modules lives two levels below the workspace root")
        .to_path_buf();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let target_dir = workspace.join("target").join("wasm-nested");

    for dir in [
        "crates/policy",
        "wasm",
        "Cargo.toml",
        "Cargo.lock",
        ".cargo",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args([
            "build",
            "--target",
            "wasm32-unknown-unknown",
            "--profile",
            "wasm",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    for (package, _, _) in MODULES {
        cmd.args(["-p", package]);
    }
    // The outer build's settings must not leak into the nested one (clippy wrappers,
    // host-only rustflags, the jobserver of the outer build).
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_PROFILE_RELEASE_PANIC",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("running the nested cargo build of the wasm modules");
    if !status.success() {
        panic!(
            "building the wasm modules failed ({status}). Is the target installed? \
             Run: rustup target add wasm32-unknown-unknown"
        );
    }
    for (_, stem, shipped) in MODULES {
        let built = target_dir
            .join("wasm32-unknown-unknown")
            .join("wasm")
            .join(format!("{stem}.wasm"));
        let dest = out_dir.join(shipped);
        std::fs::copy(&built, &dest)
            .unwrap_or_else(|e| panic!("copying {} failed: {e}", built.display()));
    }
}
