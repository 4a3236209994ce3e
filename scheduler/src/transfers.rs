//! The shared cache's transfer permits: at most `cache_concurrency` `CacheGet`/`CachePut`
//! transfers at once (each holds about 7 MiB, so this bounds the tier's memory), and at most
//! `cache_concurrency_per_caller` of them (half by default) for any one caller, so no caller can
//! hold them all and starve the others. A caller is the bearer token it presents when tokens are
//! configured, else the address its connection comes from.
//!
//! A request waits for its permit at most [`PERMIT_WAIT`]: first for room in its caller's share,
//! then for a permit of the whole. A caller at its share never takes a permit of the whole while
//! it waits, so a caller's flood queues behind itself. How long a permit is held is bounded by
//! the service: a reader that stops reading and a writer that stops writing lose theirs (see the
//! send and idle deadlines in `service.rs`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The longest a transfer waits for its permit before it is told to try again later (and the
/// client compiles instead).
pub(crate) const PERMIT_WAIT: Duration = Duration::from_secs(2);

/// Who asks, for the share each caller may hold.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Caller {
    /// The bearer token presented (tokens are configured): its blake3.
    Token([u8; 32]),
    /// The peer's address (no tokens: the loopback default, or `insecure`).
    Address(IpAddr),
    /// Neither is known (a connection without an address): all such requests share one share.
    Unknown,
}

impl Caller {
    /// The caller of `request`: its token when it carries one, else its peer's address.
    pub(crate) fn of<T>(request: &tonic::Request<T>) -> Caller {
        if let ferry_proto::Credential(Some(token)) = ferry_proto::Credential::of(request) {
            return Caller::Token(token);
        }
        request.remote_addr().map_or(Caller::Unknown, |a| Caller::Address(a.ip()))
    }
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // A digest of a secret: enough to tell two callers apart in a log line, no more.
            Caller::Token(t) => write!(f, "token {:02x}{:02x}…", t[0], t[1]),
            Caller::Address(a) => write!(f, "{a}"),
            Caller::Unknown => f.write_str("unknown"),
        }
    }
}

/// The permits: a semaphore for the whole, and how many each caller holds.
#[derive(Debug)]
pub(crate) struct TransferPermits {
    all: Arc<Semaphore>,
    total: usize,
    shares: Arc<Shares>,
    wait: Duration,
}

/// Why a transfer got no permit within the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Busy {
    /// This caller already holds its whole share.
    Caller { share: usize, total: usize },
    /// Every permit is held (by other callers).
    All { total: usize },
}

/// One transfer's permit; released when dropped.
#[derive(Debug)]
pub(crate) struct TransferPermit {
    _all: OwnedSemaphorePermit,
    _share: ShareHeld,
}

#[derive(Debug)]
struct Shares {
    /// Permits held per caller; a caller holding none has no entry, so the map is never larger
    /// than the number of transfers served at once.
    held: Mutex<HashMap<Caller, usize>>,
    /// Signalled whenever a caller's permit is released.
    freed: Notify,
    per_caller: usize,
}

/// A place in one caller's share.
#[derive(Debug)]
struct ShareHeld {
    shares: Arc<Shares>,
    caller: Caller,
}

impl TransferPermits {
    /// `total` permits, at most `per_caller` (clamped to 1..=total) per caller; a request waits
    /// at most `wait` for one.
    pub(crate) fn new(total: usize, per_caller: usize, wait: Duration) -> TransferPermits {
        let total = total.max(1);
        let shares =
            Shares { held: Mutex::new(HashMap::new()), freed: Notify::new(), per_caller: per_caller.clamp(1, total) };
        TransferPermits { all: Arc::new(Semaphore::new(total)), total, shares: Arc::new(shares), wait }
    }

    /// A permit for `caller`, waiting at most the configured wait in all.
    pub(crate) async fn acquire(&self, caller: Caller) -> Result<TransferPermit, Busy> {
        let deadline = Instant::now() + self.wait;
        let (share, total) = (self.shares.per_caller, self.total);
        // A caller whose share is the whole waited for the whole.
        let busy = if share < total { Busy::Caller { share, total } } else { Busy::All { total } };
        let share = self.shares.take(caller, deadline).await.ok_or(busy)?;
        // Dropping `share` on the way out gives the caller's place back.
        let all = tokio::time::timeout_at(deadline, Arc::clone(&self.all).acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(Busy::All { total: self.total })?;
        Ok(TransferPermit { _all: all, _share: share })
    }

    /// How many callers hold a permit now.
    #[cfg(test)]
    fn callers(&self) -> usize {
        self.shares.lock().len()
    }
}

impl Shares {
    fn lock(&self) -> MutexGuard<'_, HashMap<Caller, usize>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place in `caller`'s share, waiting for one until `deadline`.
    async fn take(self: &Arc<Self>, caller: Caller, deadline: Instant) -> Option<ShareHeld> {
        loop {
            // Registered before the check, so a release between the check and the wait wakes it.
            let freed = self.freed.notified();
            {
                let mut held = self.lock();
                let mine = held.entry(caller).or_insert(0);
                if *mine < self.per_caller {
                    *mine += 1;
                    return Some(ShareHeld { shares: Arc::clone(self), caller });
                }
            }
            tokio::time::timeout_at(deadline, freed).await.ok()?;
        }
    }
}

impl Drop for ShareHeld {
    fn drop(&mut self) {
        let mut held = self.shares.lock();
        if let Some(mine) = held.get_mut(&self.caller) {
            *mine -= 1;
            if *mine == 0 {
                held.remove(&self.caller);
            }
        }
        drop(held);
        self.shares.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(100);

    fn caller(last: u8) -> Caller {
        Caller::Address(IpAddr::from([10, 0, 0, last]))
    }

    #[tokio::test]
    async fn one_caller_holds_at_most_its_share_and_the_others_still_get_theirs() {
        let permits = TransferPermits::new(4, 2, WAIT);
        let (a, b) = (caller(1), caller(2));
        let held: Vec<TransferPermit> = vec![permits.acquire(a).await.unwrap(), permits.acquire(a).await.unwrap()];
        let started = Instant::now();
        assert_eq!(permits.acquire(a).await.unwrap_err(), Busy::Caller { share: 2, total: 4 });
        assert!(started.elapsed() >= WAIT, "refused only after the wait");
        // Another caller is not starved by the first one's flood.
        let other = permits.acquire(b).await.unwrap();
        assert_eq!(permits.callers(), 2);
        drop(held);
        drop(other);
        assert_eq!(permits.callers(), 0, "callers holding nothing are forgotten");
    }

    #[tokio::test]
    async fn a_caller_waiting_at_its_share_gets_the_place_its_own_transfer_frees() {
        let permits = Arc::new(TransferPermits::new(4, 1, Duration::from_secs(5)));
        let first = permits.acquire(caller(1)).await.unwrap();
        let waiter = {
            let permits = Arc::clone(&permits);
            tokio::spawn(async move { permits.acquire(caller(1)).await.map(drop) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the second transfer of a caller with a share of 1 waits");
        drop(first);
        assert_eq!(tokio::time::timeout(Duration::from_secs(1), waiter).await.unwrap().unwrap(), Ok(()));
        assert_eq!(permits.callers(), 0);
    }

    #[tokio::test]
    async fn the_whole_stays_bounded_whatever_the_callers() {
        let permits = TransferPermits::new(3, 2, WAIT);
        let _held = [
            permits.acquire(caller(1)).await.unwrap(),
            permits.acquire(caller(1)).await.unwrap(),
            permits.acquire(caller(2)).await.unwrap(),
        ];
        assert_eq!(permits.acquire(caller(3)).await.unwrap_err(), Busy::All { total: 3 });
        assert_eq!(permits.callers(), 2, "a refused caller keeps no place");
    }

    #[test]
    fn the_share_is_at_least_one_and_at_most_the_whole() {
        assert_eq!(TransferPermits::new(4, 0, WAIT).shares.per_caller, 1);
        assert_eq!(TransferPermits::new(4, 9, WAIT).shares.per_caller, 4);
        assert_eq!(TransferPermits::new(0, 0, WAIT).total, 1);
    }
}
