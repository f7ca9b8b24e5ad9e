//! Installs the PostgreSQL server binaries of every supported major the
//! tests use (fetched with npm when Debian does not ship that major) and
//! prints one `MAJOR DIRECTORY` line each; `.ci/run` runs it before the
//! tests so a missing npm or registry shows as one clear error up front.
//!
//! `cargo run -p steward-devkit --example postgres_bin_dirs`

use steward_devkit::pgbin::{postgres_bin_dir, SUPPORTED_MAJORS};

fn main() {
    let mut failed = false;
    for major in SUPPORTED_MAJORS {
        match postgres_bin_dir(major) {
            Ok(dir) => println!("{major} {}", dir.display()),
            Err(e) => {
                eprintln!("PostgreSQL {major}: {e}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
