//! Per-target delivery loop. (Being written.)
