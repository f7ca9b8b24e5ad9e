//! The keys of `[targets.NAME]` with `type = "file"`: the NDJSON file, its
//! envelope and rotation.

use std::path::PathBuf;

use steward_core::config::check::{resolve, Errors, Reader};
use steward_core::config::TargetContext;

use crate::config::envelope;
use crate::envelope::Envelope;

pub(crate) const KEYS: &[&str] = &["path", "envelope", "max_bytes", "max_files"];

/// Built by `check` only, so the sink can rely on its rules.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub(crate) struct FileTargetConfig {
    pub(crate) path: PathBuf,
    pub(crate) envelope: Envelope,
    pub(crate) max_bytes: u64,
    /// Rotated files kept besides the active one.
    pub(crate) max_files: u32,
}

pub(crate) fn check(
    target: &TargetContext,
    r: &Reader,
    errs: &mut Errors,
) -> Option<FileTargetConfig> {
    let base_dir = target.base_dir;
    let path = r
        .required_string(
            "path",
            "the NDJSON file to append to, e.g. path = \"/var/lib/steward/events.ndjson\"",
            errs,
        )
        .and_then(|p| {
            if p.is_empty() || p.ends_with('/') {
                errs.add(&r.key("path"), "must name a file, e.g. events.ndjson");
                return None;
            }
            Some(resolve(base_dir, p))
        });
    let envelope = envelope(r, errs);
    let max_bytes = r.int("max_bytes", 100 * 1024 * 1024, 1024, 1 << 50, "bytes", errs);
    let max_files = r.int("max_files", 10, 0, 10_000, "files", errs);
    if target.delivery.is_some_and(|d| d.max_in_flight > 1) {
        errs.add(
            &r.key("max_in_flight"),
            "a file target appends to one file, one batch at a time; remove max_in_flight (or set 1)",
        );
        return None;
    }
    Some(FileTargetConfig {
        path: path?,
        envelope: envelope?,
        max_bytes: max_bytes?,
        max_files: u32::try_from(max_files?).ok()?,
    })
}
