//! Durable state in one redb file. (Being written.)
