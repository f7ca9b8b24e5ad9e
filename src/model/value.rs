//! Column value conversion to JSON. (Being written.)
