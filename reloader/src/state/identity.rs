//! Which configuration each generation serves (`--config`): the digest is
//! recorded with the generation when it begins, kept in the state file so
//! a restarted controller still knows it, and reported by `status` and the
//! metrics.

use super::InstanceState;

impl InstanceState {
    /// The number the next generation will get (what `--check` is told:
    /// a failed check takes no number).
    pub fn next_generation(&self) -> u64 {
        self.generations.next_number()
    }

    /// Records that generation `number` was started with config `digest`.
    pub fn set_config_sha256(&mut self, number: u64, digest: Option<String>) {
        let _ = self.generations.set_config_sha256(number, digest);
    }

    /// The config digest of the active generation.
    pub fn active_config_sha256(&self) -> Option<String> {
        self.generations
            .active()
            .and_then(|g| g.config_sha256.clone())
    }
}
