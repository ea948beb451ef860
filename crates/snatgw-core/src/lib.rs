//! snatgw-core
#![forbid(unsafe_code)]
