//! Links the system libnbd, found through pkg-config (Debian: libnbd-dev).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Err(e) = pkg_config::Config::new().atleast_version("1.14").probe("libnbd") {
        println!("cargo:warning=libnbd not found through pkg-config ({e}); run scripts/setup");
        std::process::exit(1);
    }
}
