//! The `docker:` section of a manifest: the container the `docker` driver runs.

use serde::{Deserialize, Serialize};

/// The `docker:` section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerSpec {}

impl DockerSpec {
    /// Checks what serde cannot. On error returns the field path (under `docker`) and the
    /// reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}
