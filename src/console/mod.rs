//! The stewardship console's access control: users, roles and API tokens.

pub mod users;
