//! The Debian package description (`[package.metadata.deb]`, built with
//! `cargo deb`) points at files that exist and installs what an operator
//! needs: the binary, the unit, the configuration as a conffile, the alert
//! rules and dashboard, and a postinst creating the `steward` user.

use std::path::Path;

fn deb_metadata() -> toml::Table {
    let manifest: toml::Table =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
    manifest["package"]["metadata"]["deb"]
        .as_table()
        .expect("[package.metadata.deb]")
        .clone()
}

#[test]
fn every_packaged_file_exists_and_the_essentials_are_installed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deb = deb_metadata();
    let assets = deb["assets"].as_array().expect("assets");
    let mut destinations = Vec::new();
    for asset in assets {
        let fields = asset.as_array().expect("[source, destination, mode]");
        let source = fields[0].as_str().unwrap();
        let destination = fields[1].as_str().unwrap();
        destinations.push(destination.to_string());
        if source.starts_with("target/") {
            continue; // built by `cargo deb`
        }
        assert!(
            root.join(source).is_file(),
            "packaged file {source} is missing"
        );
    }
    for needed in ["usr/bin/", "etc/steward/steward.toml", "usr/share/steward/"] {
        assert!(
            destinations.iter().any(|d| d.starts_with(needed)),
            "nothing installed to {needed}"
        );
    }
    let sources: Vec<&str> = assets.iter().map(|a| a[0].as_str().unwrap()).collect();
    for needed in [
        "target/release/steward",
        "config/steward.example.toml",
        "config/alerts.yml",
        "config/grafana-dashboard.json",
    ] {
        assert!(sources.contains(&needed), "{needed} is not packaged");
    }
    // The configuration is a conffile: upgrades keep the operator's edits.
    let conffiles: Vec<&str> = deb["conf-files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(conffiles.contains(&"/etc/steward/steward.toml"));
    // HTTP and PostgreSQL targets verify servers against the system's CA
    // store (rustls-platform-verifier); without one no HTTP client is built.
    let depends = deb["depends"].as_str().expect("depends");
    assert!(depends.contains("ca-certificates"), "{depends}");

    // The unit comes from systemd/ and runs as the user postinst creates.
    let units = deb["systemd-units"]["unit-scripts"].as_str().unwrap();
    let unit = std::fs::read_to_string(root.join(units).join("steward.service")).unwrap();
    assert!(unit.contains("User=steward"), "{unit}");
    let scripts = deb["maintainer-scripts"].as_str().unwrap();
    let postinst = std::fs::read_to_string(root.join(scripts).join("postinst")).unwrap();
    assert!(
        postinst.contains("adduser --system") && postinst.contains("steward"),
        "{postinst}"
    );
    // The example configuration it installs is valid as shipped.
    steward_sinks::config::parse(
        &std::fs::read_to_string(root.join("config/steward.example.toml")).unwrap(),
        Path::new("steward.toml"),
        Path::new("/tmp"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}
