//! A target's type and the settings that belong to it.
//!
//! Core checks what every target has: its entities, batching, retries,
//! delivery policy, initial sync and governance. The keys a `type` adds to
//! `[targets.NAME]` (an HTTP target's url and headers, a file target's path,
//! ...) and what they mean belong to the sink of that type: the sinks crate
//! passes its [`TargetTypes`] to [`Config::load`](super::Config::load), which
//! calls it for each target while checking the file, so that the problems of
//! both show up together, each under its dotted key.

use std::any::Any;
use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

use super::raw::reader::{Errors, Reader};
use super::DeliveryPolicy;

/// A target type's checked settings. Only the [`TargetTypes`] that produced
/// them knows their type; it gets them back with `Any` downcasting.
pub trait TargetSettings: Any + Debug + Send + Sync {}

/// What a type's check may need to know of the target beyond its own keys.
#[derive(Clone, Copy, Debug)]
pub struct TargetContext<'a> {
    #[cfg(test)]
    pub(crate) name: &'a str,
    /// The target's `type`, one of [`TargetTypes::names`].
    pub type_name: &'a str,
    /// The target's entities; `None` when they have problems of their own
    /// (already reported).
    pub entities: Option<&'a [String]>,
    /// The target's delivery policy; `None` when it has problems of its own.
    pub delivery: Option<&'a DeliveryPolicy>,
    /// Relative paths in the file resolve against this directory.
    pub base_dir: &'a Path,
}

/// The target types steward can deliver to.
pub trait TargetTypes {
    /// Every type name, in the order messages list them.
    fn names(&self) -> &[&'static str];

    /// The keys `type_name` adds to `[targets.NAME]`, its address (`url`,
    /// `path`) first; `None` for a type that does not exist.
    fn keys(&self, type_name: &str) -> Option<&'static [&'static str]>;

    /// Checks the type's keys of `[targets.NAME]`, read through `r` (which
    /// has already reported unknown keys), recording every problem in `errs`;
    /// `None` when there was one.
    fn check(
        &self,
        target: &TargetContext,
        r: &Reader,
        errs: &mut Errors,
    ) -> Option<Arc<dyn TargetSettings>>;
}

/// The settings of a target in a configuration checked without its types
/// ([`Config::parse`](super::Config::parse)): no sink can be built from it.
#[derive(Debug)]
pub struct Unchecked;

impl TargetSettings for Unchecked {}
