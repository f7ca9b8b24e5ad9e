//! Throwaway PostgreSQL cluster. (Being written.)
