//! snatgw-dataplane
#![forbid(unsafe_code)]
