//! Snapshots of executions, per (credential, execution id).
//!
//! This is the one place the gRPC surface gets execution state from. An execution that has
//! completed or failed never changes again, so its last snapshot is remembered in a bounded
//! LRU cache and repeats are served without an upstream call. Entries are keyed by the
//! credential's fingerprint as well as the id: Synthome's status route does not check that
//! an execution belongs to the key's organisation, so the gateway must never hand one
//! caller's answer to another.
//!
//! Limit: executions still running are read from the upstream on every call; sharing those
//! reads between callers is the job of the poller registry that grows out of this module.

use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex, PoisonError},
};

use lru::LruCache;

use crate::{
    credential::{Credential, Fingerprint},
    execution::{self, is_final},
    execution_id::ExecutionId,
    proto::Execution,
    upstream::{StatusSource, UpstreamError},
};

/// The identity of a snapshot: who asked, and for what.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotKey {
    pub fingerprint: Fingerprint,
    pub execution_id: ExecutionId,
}

impl SnapshotKey {
    pub fn new(credential: &Credential, execution_id: &ExecutionId) -> Self {
        Self {
            fingerprint: credential.fingerprint(),
            execution_id: execution_id.clone(),
        }
    }
}

/// Returns execution snapshots, remembering those of ended executions.
pub struct Snapshots {
    source: Arc<dyn StatusSource>,
    /// A std mutex: it is held only to look up or insert, never across an await.
    ended: Mutex<LruCache<SnapshotKey, Arc<Execution>>>,
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots")
            .field("ended_cached", &self.lock_ended().len())
            .finish_non_exhaustive()
    }
}

impl Snapshots {
    pub fn new(source: Arc<dyn StatusSource>, ended_capacity: NonZeroUsize) -> Self {
        Self {
            source,
            ended: Mutex::new(LruCache::new(ended_capacity)),
        }
    }

    /// The execution as it is now, seen with `credential`.
    pub async fn get(
        &self,
        credential: &Credential,
        execution_id: &ExecutionId,
    ) -> Result<Arc<Execution>, UpstreamError> {
        let key = SnapshotKey::new(credential, execution_id);
        if let Some(ended) = self.lock_ended().get(&key) {
            return Ok(Arc::clone(ended));
        }

        let body = self.source.fetch_status(credential, execution_id).await?;
        let snapshot = Arc::new(execution::from_upstream(body));
        if is_final(snapshot.state()) {
            self.lock_ended().put(key, Arc::clone(&snapshot));
        }
        Ok(snapshot)
    }

    /// A poisoned lock only means another thread panicked mid-insert; the cache holds
    /// whole entries, so it stays usable.
    fn lock_ended(&self) -> std::sync::MutexGuard<'_, LruCache<SnapshotKey, Arc<Execution>>> {
        self.ended.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        future::Future,
        pin::Pin,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;
    use crate::upstream::StatusBody;

    /// Answers every read with the configured status and counts the reads.
    struct FixedSource {
        status: &'static str,
        reads: AtomicUsize,
    }

    impl StatusSource for FixedSource {
        fn fetch_status<'a>(
            &'a self,
            _credential: &'a Credential,
            execution_id: &'a ExecutionId,
        ) -> Pin<Box<dyn Future<Output = Result<StatusBody, UpstreamError>> + Send + 'a>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let body = serde_json::json!({"id": execution_id.as_str(), "status": self.status});
            Box::pin(async move { Ok(serde_json::from_value(body).unwrap()) })
        }
    }

    fn snapshots(status: &'static str) -> (Snapshots, Arc<FixedSource>) {
        let source = Arc::new(FixedSource {
            status,
            reads: AtomicUsize::new(0),
        });
        let snapshots = Snapshots::new(source.clone(), NonZeroUsize::new(2).unwrap());
        (snapshots, source)
    }

    #[tokio::test]
    async fn ended_executions_are_served_from_memory_per_credential() {
        let (snapshots, source) = snapshots("completed");
        let alice = Credential::new("alice").unwrap();
        let bob = Credential::new("bob").unwrap();
        let id = ExecutionId::parse("exec_1").unwrap();

        snapshots.get(&alice, &id).await.unwrap();
        snapshots.get(&alice, &id).await.unwrap();
        assert_eq!(source.reads.load(Ordering::SeqCst), 1);

        snapshots.get(&bob, &id).await.unwrap();
        assert_eq!(
            source.reads.load(Ordering::SeqCst),
            2,
            "bob never sees alice's entry"
        );
    }

    #[tokio::test]
    async fn running_executions_are_always_read_and_the_cache_is_bounded() {
        let (running, source) = snapshots("processing");
        let alice = Credential::new("alice").unwrap();
        let id = ExecutionId::parse("exec_1").unwrap();
        running.get(&alice, &id).await.unwrap();
        running.get(&alice, &id).await.unwrap();
        assert_eq!(source.reads.load(Ordering::SeqCst), 2);

        let (ended, _) = snapshots("failed");
        for n in 0..5 {
            let id = ExecutionId::parse(&format!("exec_{n}")).unwrap();
            ended.get(&alice, &id).await.unwrap();
        }
        assert_eq!(ended.lock_ended().len(), 2);
    }
}
