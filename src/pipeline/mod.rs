//! Pure transformation of decoded changes into target events: table
//! selection and field mapping. No I/O. (Being written.)
