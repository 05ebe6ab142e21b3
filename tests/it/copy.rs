//! `blockrepl copy` against real NBD servers.
