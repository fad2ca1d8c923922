//! Background upgrade jobs, one per Machine, behind the polled UpdateMachine hook.
//!
//! CAPI calls UpdateMachine again and again until it answers "done", with a short handler timeout,
//! so a call never awaits an upgrade: the first call starts a job and every call reads its
//! progress. Calls for the same Machine and version join the same job. After a failure the next
//! call starts a fresh attempt (which resumes from the node's journal), but not before a backoff
//! has passed, so CAPI's own retries cannot make the upgrader hot-loop on a broken node.
//!
//! The map holds only handles; progress is published over `watch` channels, and the lock is never
//! held across an await.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, watch};
use tracing::{Instrument, info_span, warn};

use super::step::Step;
use crate::version::KubeVersion;

/// A Machine, by `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MachineKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for MachineKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a job publishes while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for a slot under the concurrent-upgrade limit.
    Queued,
    Running(Step),
    Done,
    Failed {
        /// Deterministic: it becomes a condition message on the Machine.
        message: String,
    },
}

/// What one poll tells the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    InProgress {
        message: String,
        retry_after: Duration,
    },
    Done {
        message: String,
    },
    Failed {
        message: String,
    },
}

/// Runs one upgrade attempt to completion, publishing progress. Implemented by the engine; the
/// registry does not care how.
pub trait Runner<R>: Send + Sync + 'static {
    fn run(
        &self,
        request: R,
        progress: watch::Sender<Progress>,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

struct Job {
    target: KubeVersion,
    progress: watch::Receiver<Progress>,
    /// Attempts started for this target, for the backoff.
    attempts: u32,
    /// When the last attempt failed; the watch value says whether it did.
    failed_at: Option<Instant>,
}

/// The backoff after the n-th failed attempt: 5 s doubling up to 5 minutes.
pub fn backoff(attempts: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << attempts.saturating_sub(1).min(6));
    Duration::from_secs(secs.min(300))
}

pub struct JobRegistry<R, X> {
    jobs: Arc<Mutex<HashMap<MachineKey, Job>>>,
    runner: Arc<X>,
    slots: Arc<Semaphore>,
    backoff: fn(u32) -> Duration,
    _request: std::marker::PhantomData<fn(R)>,
}

impl<R, X> Clone for JobRegistry<R, X> {
    fn clone(&self) -> Self {
        JobRegistry {
            jobs: self.jobs.clone(),
            runner: self.runner.clone(),
            slots: self.slots.clone(),
            backoff: self.backoff,
            _request: std::marker::PhantomData,
        }
    }
}

impl<R, X> JobRegistry<R, X>
where
    R: Send + 'static,
    X: Runner<R>,
{
    pub fn new(runner: X, max_concurrent: usize) -> Self {
        JobRegistry {
            jobs: Arc::default(),
            runner: Arc::new(runner),
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            backoff,
            _request: std::marker::PhantomData,
        }
    }

    /// What runs the jobs.
    pub fn runner(&self) -> &X {
        &self.runner
    }

    #[cfg(test)]
    fn with_backoff(mut self, backoff: fn(u32) -> Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// Starts or joins the job for `key` at `target`, and reports where it stands. Never blocks.
    pub fn poll(&self, key: MachineKey, target: KubeVersion, request: impl FnOnce() -> R) -> Poll {
        let mut jobs = self
            .jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if let Some(job) = jobs.get_mut(&key) {
            // A completed attempt records its failure time once, so the backoff counts from it.
            let progress = job.progress.borrow().clone();
            if matches!(progress, Progress::Failed { .. }) && job.failed_at.is_none() {
                job.failed_at = Some(now);
            }
            let running = matches!(progress, Progress::Queued | Progress::Running(_));
            if job.target != target {
                if running {
                    return Poll::InProgress {
                        message: format!(
                            "waiting for the running update to {} to stop",
                            job.target
                        ),
                        retry_after: Duration::from_secs(10),
                    };
                }
                // CAPI changed its mind after a finished or failed attempt: start afresh below.
            } else {
                match progress {
                    Progress::Done => return poll_of(&Progress::Done, &target),
                    Progress::Failed { message } => {
                        let waited = job.failed_at.map_or(Duration::ZERO, |at| now - at);
                        if waited < (self.backoff)(job.attempts) {
                            return Poll::Failed { message };
                        }
                        let attempts = job.attempts + 1;
                        *job = self.spawn(key.clone(), target, attempts, request());
                        return poll_of(&Progress::Queued, &target);
                    }
                    running => return poll_of(&running, &target),
                }
            }
        }
        let job = self.spawn(key.clone(), target, 1, request());
        jobs.insert(key, job);
        poll_of(&Progress::Queued, &target)
    }

    fn spawn(&self, key: MachineKey, target: KubeVersion, attempts: u32, request: R) -> Job {
        let (tx, rx) = watch::channel(Progress::Queued);
        let runner = self.runner.clone();
        let slots = self.slots.clone();
        let span = info_span!("upgrade", machine = %key, to_version = %target, attempt = attempts);
        tokio::spawn(
            async move {
                let Ok(_slot) = slots.acquire_owned().await else {
                    return;
                };
                // Run the attempt in its own task so a panic becomes a Failure, not a job that
                // says "running" forever.
                let attempt_tx = tx.clone();
                let attempt = tokio::spawn(
                    async move { runner.run(request, attempt_tx).await }.in_current_span(),
                );
                let outcome = match attempt.await {
                    Ok(outcome) => outcome,
                    Err(join_error) => {
                        warn!(error = %join_error, "upgrade task ended abnormally");
                        Err("internal error in the upgrader; see its logs".to_string())
                    }
                };
                tx.send_replace(match outcome {
                    Ok(()) => Progress::Done,
                    Err(message) => Progress::Failed { message },
                });
            }
            .instrument(span),
        );
        Job {
            target,
            progress: rx,
            attempts,
            failed_at: None,
        }
    }

    /// Jobs that are queued or running, for metrics and graceful shutdown.
    pub fn in_flight(&self) -> usize {
        let jobs = self
            .jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        jobs.values()
            .filter(|job| {
                matches!(
                    *job.progress.borrow(),
                    Progress::Queued | Progress::Running(_)
                )
            })
            .count()
    }
}

fn poll_of(progress: &Progress, target: &KubeVersion) -> Poll {
    match progress {
        Progress::Queued => Poll::InProgress {
            message: format!("queued: upgrade to {target}"),
            retry_after: Duration::from_secs(5),
        },
        Progress::Running(step) => Poll::InProgress {
            message: step.to_string(),
            retry_after: step.retry_after(),
        },
        Progress::Done => Poll::Done {
            message: format!("upgraded to {target}"),
        },
        Progress::Failed { message } => Poll::Failed {
            message: message.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts attempts; fails while `failures` is positive; each attempt waits for `gate`.
    struct Scripted {
        attempts: AtomicUsize,
        failures: AtomicUsize,
        gate: tokio::sync::Notify,
        hold: bool,
    }

    impl Runner<()> for Arc<Scripted> {
        async fn run(&self, _: (), progress: watch::Sender<Progress>) -> Result<(), String> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            progress.send_replace(Progress::Running(Step::KubeadmUpgrade));
            if self.hold {
                self.gate.notified().await;
            }
            if self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err("step 4/10 kubeadm upgrade failed: exit 1".into());
            }
            Ok(())
        }
    }

    fn scripted(failures: usize, hold: bool) -> Arc<Scripted> {
        Arc::new(Scripted {
            attempts: AtomicUsize::new(0),
            failures: AtomicUsize::new(failures),
            gate: tokio::sync::Notify::new(),
            hold,
        })
    }

    fn key(name: &str) -> MachineKey {
        MachineKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn v(s: &str) -> KubeVersion {
        s.parse().unwrap()
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn duplicate_polls_join_one_job() {
        let runner = scripted(0, true);
        let registry = JobRegistry::new(runner.clone(), 4);
        let polls: Vec<_> = (0..50)
            .map(|_| {
                let registry = registry.clone();
                tokio::spawn(async move { registry.poll(key("m1"), v("v1.32.3"), || ()) })
            })
            .collect();
        for poll in polls {
            assert!(matches!(poll.await.unwrap(), Poll::InProgress { .. }));
        }
        settle().await;
        assert_eq!(runner.attempts.load(Ordering::SeqCst), 1);
        assert_eq!(
            registry.poll(key("m1"), v("v1.32.3"), || ()),
            Poll::InProgress {
                message: "step 4/10: kubeadm upgrade".into(),
                retry_after: Duration::from_secs(10)
            }
        );
        runner.gate.notify_one();
        settle().await;
        assert!(matches!(
            registry.poll(key("m1"), v("v1.32.3"), || ()),
            Poll::Done { .. }
        ));
        assert_eq!(registry.in_flight(), 0);
    }

    #[tokio::test]
    async fn failure_is_reported_until_the_backoff_passes_then_retried() {
        let runner = scripted(1, false);
        let registry =
            JobRegistry::new(runner.clone(), 1).with_backoff(|_| Duration::from_millis(200));
        registry.poll(key("m1"), v("v1.32.3"), || ());
        settle().await;
        let failed = registry.poll(key("m1"), v("v1.32.3"), || ());
        assert_eq!(
            failed,
            Poll::Failed {
                message: "step 4/10 kubeadm upgrade failed: exit 1".into()
            }
        );
        // Within the backoff, polls do not start attempts.
        assert_eq!(registry.poll(key("m1"), v("v1.32.3"), || ()), failed);
        assert_eq!(runner.attempts.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(matches!(
            registry.poll(key("m1"), v("v1.32.3"), || ()),
            Poll::InProgress { .. }
        ));
        settle().await;
        assert_eq!(runner.attempts.load(Ordering::SeqCst), 2);
        assert!(matches!(
            registry.poll(key("m1"), v("v1.32.3"), || ()),
            Poll::Done { .. }
        ));
    }

    #[tokio::test]
    async fn the_concurrency_limit_queues_jobs() {
        let runner = scripted(0, true);
        let registry = JobRegistry::new(runner.clone(), 1);
        registry.poll(key("m1"), v("v1.32.3"), || ());
        registry.poll(key("m2"), v("v1.32.3"), || ());
        settle().await;
        assert_eq!(runner.attempts.load(Ordering::SeqCst), 1);
        assert!(matches!(
            registry.poll(key("m2"), v("v1.32.3"), || ()),
            Poll::InProgress { ref message, .. } if message.starts_with("queued")
        ));
        runner.gate.notify_one();
        settle().await;
        assert_eq!(runner.attempts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_new_target_waits_for_the_running_job() {
        let runner = scripted(0, true);
        let registry = JobRegistry::new(runner.clone(), 2);
        registry.poll(key("m1"), v("v1.32.3"), || ());
        settle().await;
        assert!(matches!(
            registry.poll(key("m1"), v("v1.32.4"), || ()),
            Poll::InProgress { ref message, .. } if message.contains("v1.32.3")
        ));
        runner.gate.notify_one();
        settle().await;
        registry.poll(key("m1"), v("v1.32.4"), || ());
        settle().await;
        assert_eq!(runner.attempts.load(Ordering::SeqCst), 2);
        runner.gate.notify_one();
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(30), Duration::from_secs(300));
    }
}
