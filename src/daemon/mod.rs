//! Wires source, pipeline, store and sinks together. (Being written.)
