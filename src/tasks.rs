//! Lifecycle: the long-lived tasks of an agent (the catch-up shell,
//! membership, the leader part, blob transfer, housekeeping) are spawned
//! through one [`Tasks`], so that a stop cancels them all, waits for them a
//! bounded time, and lets the node close the network and the store after
//! them. Short request handlers that end by themselves use `tokio::spawn`.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Owner of an agent's long-lived tasks. Cheap to clone.
#[derive(Clone, Default)]
pub struct Tasks {
    cancel: CancellationToken,
    set: Arc<Mutex<JoinSet<()>>>,
}

impl Tasks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Run `fut` until it ends or the agent stops, whichever comes first.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        // Reap the ones that ended, so the set holds live tasks only.
        while set.try_join_next().is_some() {}
        set.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = fut => {}
            }
        });
    }

    /// Whether a stop was asked for.
    pub fn stopping(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Cancel every task and wait for them, at most `within`; the ones still
    /// running then are aborted. Returns how many had to be aborted.
    pub async fn stop(&self, within: Duration) -> usize {
        self.cancel.cancel();
        let mut set = std::mem::take(&mut *self.set.lock().unwrap_or_else(|p| p.into_inner()));
        let deadline = tokio::time::Instant::now() + within;
        while !set.is_empty() {
            match tokio::time::timeout_at(deadline, set.join_next()).await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    let n = set.len();
                    set.shutdown().await;
                    return n;
                }
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stop_cancels_every_task_and_reports_none_aborted() {
        let tasks = Tasks::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        for _ in 0..3 {
            let tx = tx.clone();
            tasks.spawn(async move {
                let _keep = tx;
                std::future::pending::<()>().await
            });
        }
        drop(tx);
        assert_eq!(tasks.stop(Duration::from_secs(1)).await, 0);
        assert!(tasks.stopping());
        // Every task dropped its sender: the channel is closed.
        assert!(rx.recv().await.is_none());
        // A task spawned after the stop ends at once.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        tasks.spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await
        });
        assert!(rx.recv().await.is_none());
    }
}
