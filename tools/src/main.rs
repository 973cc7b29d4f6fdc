//! # caasctl: the operator and technician CLI
fn main() {}
