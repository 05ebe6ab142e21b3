//! Test-only: clients of the vSphere simulator (`testkit::vcsim`, shared with
//! the integration tests).

pub use testkit::vcsim;
pub use testkit::vcsim::pattern;

use std::path::Path;
use std::time::Duration;

use super::client::{Client, Endpoint, Secret, Timeouts};
use super::tls::Thumbprint;
use crate::engine::CancelToken;
use testkit::vcsim::Vcsim;

/// An endpoint for the simulator, with short timeouts for tests.
pub fn endpoint(sim: &Vcsim) -> Endpoint {
    Endpoint {
        name: "sim".into(),
        url: url::Url::parse(&sim.url).unwrap(),
        user: vcsim::USER.into(),
        password: Secret::new(vcsim::PASSWORD),
        thumbprint: Thumbprint::parse(&sim.thumbprint).unwrap(),
        timeouts: Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(30),
            task: Duration::from_secs(60),
        },
    }
}

/// A logged-in client of the simulator.
pub fn client(sim: &Vcsim) -> Client {
    Client::connect(endpoint(sim), CancelToken::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// A temporary directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("blockrepl-vmware-").tempdir().unwrap()
}

/// The file's bytes equal the other's.
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}
