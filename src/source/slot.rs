//! Slot and publication setup checks. (Being written.)
