//! A build without the `store` feature: no session store. Sessions live in memory only and
//! the spend is kept in `spend.json`; these types stand in for the store's so the daemon
//! compiles unchanged, and [`Store`] has no value (it is never built).

#[path = "store/turn.rs"]
mod turn;

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub use self::turn::{OfflineDelete, Opened, StoreError, StoreOptions, StoredSession, StoredTurn};
use crate::{
    agent::Turn,
    error::Error,
    metrics::{ErrorCounter, StoreMetrics},
};

/// The database's file name inside `[daemon] state_dir` (a store-enabled build's).
pub const DB_FILE: &str = "blufio.db";

/// Never built without the `store` feature.
#[derive(Debug, Clone)]
pub enum Store {}

fn disabled(dir: &Path) -> Error {
    Error::State {
        path: dir.join(DB_FILE),
        message: "this blufio was built without the `store` feature; set [store] enabled = \
                  false or use a build with it"
            .to_owned(),
    }
}

#[allow(clippy::unused_async, missing_docs)]
impl Store {
    /// Refuses: there is no store in this build.
    ///
    /// # Errors
    ///
    /// Always [`Error::State`].
    pub fn open(
        dir: &Path,
        _options: StoreOptions,
        _today: u64,
        _metrics: StoreMetrics,
        _errors: ErrorCounter,
    ) -> Result<Opened, Error> {
        Err(disabled(dir))
    }
    pub fn path(&self) -> &Path {
        match *self {}
    }
    pub fn failing(&self) -> Option<String> {
        match *self {}
    }
    pub async fn create(&self, _session: StoredSession) -> Result<(), StoreError> {
        match *self {}
    }
    pub async fn append(
        &self,
        _id: &str,
        _create: Option<StoredSession>,
        _turns: Vec<StoredTurn>,
        _spend: Option<(u64, f64)>,
    ) -> Result<(), StoreError> {
        match *self {}
    }
    pub async fn delete(&self, _ids: Vec<String>) -> Result<(), StoreError> {
        match *self {}
    }
    pub async fn history(
        &self,
        _id: &str,
        _max_messages: u64,
        _max_bytes: u64,
    ) -> Result<Vec<Turn>, StoreError> {
        match *self {}
    }
    pub async fn page(
        &self,
        _id: &str,
        _after: Option<u64>,
        _limit: usize,
        _max_bytes: usize,
    ) -> Result<(Vec<StoredTurn>, bool), StoreError> {
        match *self {}
    }
    pub async fn enforce_cap(&self) -> Result<Vec<String>, StoreError> {
        match *self {}
    }
    pub fn save_spend_blocking(&self, _utc_day: u64, _spent_usd: f64) -> Result<(), StoreError> {
        match *self {}
    }
    pub async fn save_spend(&self, _utc_day: u64, _spent_usd: f64) -> Result<(), StoreError> {
        match *self {}
    }
    pub fn submit_spend(&self, _utc_day: u64, _spent_usd: f64) {
        match *self {}
    }
    pub fn mark_spend_imported_blocking(&self) -> Result<(), StoreError> {
        match *self {}
    }
    pub async fn close(&self, _timeout: Duration) -> bool {
        match *self {}
    }
}

/// Never opens without the `store` feature.
#[derive(Debug)]
pub struct ReadOnly(());

impl ReadOnly {
    /// Refuses: there is no store in this build.
    ///
    /// # Errors
    ///
    /// Always [`Error::State`].
    pub fn open(dir: &Path) -> Result<ReadOnly, Error> {
        Err(disabled(dir))
    }

    /// Never called (no value exists).
    ///
    /// # Errors
    ///
    /// Never.
    pub fn sessions(&self) -> Result<Vec<StoredSession>, String> {
        Ok(Vec::new())
    }

    /// Never called (no value exists).
    ///
    /// # Errors
    ///
    /// Never.
    pub fn session(&self, _id: &str) -> Result<Option<StoredSession>, String> {
        Ok(None)
    }

    /// Never called (no value exists).
    ///
    /// # Errors
    ///
    /// Never.
    pub fn conversation(
        &self,
        _id: &str,
    ) -> Result<Option<(StoredSession, Vec<StoredTurn>)>, String> {
        Ok(None)
    }

    /// Never called (no value exists).
    ///
    /// # Errors
    ///
    /// Never.
    pub fn turns(&self, _id: &str) -> Result<Vec<StoredTurn>, String> {
        Ok(Vec::new())
    }
}

/// Refuses: there is no store in this build.
///
/// # Errors
///
/// Always [`Error::State`].
pub fn delete_session(dir: &Path, _id: &str) -> Result<OfflineDelete, Error> {
    Err(disabled(dir))
}

/// Nothing to check without a store.
///
/// # Errors
///
/// Never.
pub fn check(_dir: &Path) -> Result<String, Error> {
    Ok("store: not in this build (the `store` feature is off)".to_owned())
}

/// Without a store the spend stays in `spend.json`: never imported.
pub fn spend_imported(_dir: &Path) -> bool {
    false
}

/// Returns seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}
