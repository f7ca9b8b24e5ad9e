//! pgoutput decoder. (Being written.)
