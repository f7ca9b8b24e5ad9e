//! Recording HTTP receiver. (Being written.)
