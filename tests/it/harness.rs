//! Starting and stopping real servers for tests.
