//! Records the target triple so `/v1/health` can say which build is running.

fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_owned());
    println!("cargo:rustc-env=BLUFIO_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
