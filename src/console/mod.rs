//! The stewardship console: a web front end to the daemon's control
//! service, served on `[console] listen` (off by default), with users,
//! roles and API tokens from `[console] users_file`.

mod actions;
mod api;
mod listener;
mod pages;
mod server;
mod session;
pub mod users;

pub use server::Console;
