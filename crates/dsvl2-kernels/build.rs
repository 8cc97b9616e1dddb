//! Links OpenBLAS when the `openblas` feature is on and `pkg-config` finds the library, and then sets
//! `cfg(dsvl2_openblas)`; otherwise the large products stay on the `gemm` crate (see src/blas.rs).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dsvl2_openblas)");
    if std::env::var_os("CARGO_FEATURE_OPENBLAS").is_none() {
        return;
    }
    match pkg_config::Config::new().probe("openblas") {
        Ok(_) => println!("cargo::rustc-cfg=dsvl2_openblas"),
        Err(e) => println!(
            "cargo::warning=OpenBLAS not found ({}); large matrix products use the slower `gemm` crate. \
             Install it (Debian: apt install libopenblas-dev) for the faster vision tower and prefill.",
            e.to_string().lines().next().unwrap_or("pkg-config failed")
        ),
    }
}
