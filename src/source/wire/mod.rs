//! Walsender protocol client. (Being written.)
