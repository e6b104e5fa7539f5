//! [`PolicySlot`]: the active plugin, swapped atomically after a candidate proves itself.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::host::Host;
use crate::plugin::{Plugin, PluginSpec};

/// Holds the active plugin. Readers take a snapshot with [`PolicySlot::current`] and
/// finish on it even if a swap happens meanwhile.
pub struct PolicySlot {
    active: ArcSwap<Plugin>,
}

impl PolicySlot {
    /// A slot serving `plugin`.
    pub fn new(plugin: Arc<Plugin>) -> PolicySlot {
        PolicySlot {
            active: ArcSwap::new(plugin),
        }
    }

    /// The active plugin. Keep the `Arc` for the whole request so it runs on one version.
    pub fn current(&self) -> Arc<Plugin> {
        self.active.load_full()
    }

    /// The active version label.
    pub fn version(&self) -> String {
        self.active.load().version().to_string()
    }

    /// Loads `spec` off the hot path (compile, instantiate, configure: `on_configure` must
    /// return true, for each warm instance: [`Plugin::prove_instances`]), runs
    /// `self_test` on the candidate, then swaps it in. Returns the
    /// previous plugin. On failure the active plugin keeps serving and every reason is
    /// returned.
    pub fn try_swap(
        &self,
        host: &Host,
        spec: PluginSpec,
        self_test: impl FnOnce(&Plugin) -> Result<(), Vec<String>>,
    ) -> Result<Arc<Plugin>, Vec<String>> {
        let version = spec.version.clone();
        let candidate = host
            .load(spec)
            .map_err(|e| vec![format!("candidate {version}: {e}")])?;
        candidate
            .prove_instances()
            .map_err(|e| vec![format!("candidate {version}: another instance: {e}")])?;
        self_test(&candidate).map_err(|reasons| {
            if reasons.is_empty() {
                vec![format!(
                    "candidate {version}: self-test failed without a reason"
                )]
            } else {
                reasons
                    .into_iter()
                    .map(|r| format!("candidate {version}: {r}"))
                    .collect()
            }
        })?;
        Ok(self.active.swap(candidate))
    }

    /// Swaps in an already loaded plugin unconditionally; returns the previous one.
    pub fn replace(&self, plugin: Arc<Plugin>) -> Arc<Plugin> {
        self.active.swap(plugin)
    }
}
