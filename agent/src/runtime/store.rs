//! The durable store: one sled database holding the agent's persisted record.

use std::path::Path;

use anyhow::{anyhow, Context};

const STATE_KEY: &[u8] = b"state";

/// The agent's state on disk. A write is durable when [`Store::save`] returns: sled only
/// guarantees that after `flush`, which `save` waits for.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
}

impl Store {
    /// Opens (or creates) the database under `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("state.sled");
        let db = sled::open(&path).map_err(|e| {
            anyhow!(
                "--data {}: cannot open the state database (is another agent using it?): {e}",
                dir.display()
            )
        })?;
        Ok(Store { db })
    }

    /// The stored record, if any.
    pub fn load(&self) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self
            .db
            .get(STATE_KEY)
            .context("reading the state database")?
            .map(|v| v.to_vec()))
    }

    /// Replaces the stored record and waits until it is on disk.
    pub async fn save(&self, record: Vec<u8>) -> anyhow::Result<()> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            db.insert(STATE_KEY, record)?;
            db.flush()?;
            Ok(())
        })
        .await
        .context("the store task panicked")?
    }
}
