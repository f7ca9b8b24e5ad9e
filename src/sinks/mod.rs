//! Targets: one module per target type, and the per-target delivery driver.

pub mod driver;
pub mod http;
