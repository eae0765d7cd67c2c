//! The `sandbox:` section of a manifest: the walls the `sandbox` driver builds.

use serde::{Deserialize, Serialize};

/// The `sandbox:` section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {}

impl SandboxSpec {
    /// Checks what serde cannot. On error returns the field path (under `sandbox`) and the
    /// reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}
