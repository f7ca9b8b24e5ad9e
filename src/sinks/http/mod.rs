//! HTTP target. (Being written.)
