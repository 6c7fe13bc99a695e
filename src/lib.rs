//! odissey
