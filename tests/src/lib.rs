//! # caas-tests: end-to-end tests
//!
//! Will start the real binaries as processes on free ports with temporary directories and
//! check the whole system's promises.
