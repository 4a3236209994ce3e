//! The scheduler's state machine: workers and their leases, running jobs, and the fair queue of
//! clients waiting for a slot. Pure: no sockets, no clocks of its own (every call takes `now`), no
//! async — the service layer feeds it events and carries out what it answers.
//!
//! Choosing a worker, best first: free slots at all; toolchain locality (a worker that has the
//! toolchain unpacked beats one that must fetch it); lower load; fewer recent failures; faster
//! measured jobs. When no worker has a free slot the request waits in a queue that serves clients
//! round-robin, so one client's thousand jobs cannot starve another's one.
//!
//! A worker whose jobs fail for infrastructure reasons (its sandbox broke, its disk is full) is
//! *quarantined*: after [`QUARANTINE_AFTER`] failures in a row it gets no jobs for a backoff period
//! ([`QUARANTINE_BASE`], doubling each time it fails again right after, up to [`QUARANTINE_MAX`]),
//! so builds stop paying for a broken machine. `ferry status` shows its failures and last error.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use ferry_toolchains::ToolchainId;

pub type WorkerId = String;
pub type ClientId = String;

/// A scheduler-wide job number, unique for the scheduler's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u64);

/// A queued allocation request, so its waiter can be answered or cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WaitId(pub u64);

/// What a worker says about itself when its session starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub id: WorkerId,
    /// Where clients send jobs (host:port as the worker advertises it).
    pub address: String,
    pub slots: u32,
    /// Toolchains already unpacked on the worker.
    pub toolchains: Vec<ToolchainId>,
    pub version: String,
}

/// A decision to run one job on one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub job: JobId,
    pub worker: WorkerId,
    pub address: String,
    /// False when the worker will have to fetch the toolchain first.
    pub has_toolchain: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allocation {
    Assigned(Assignment),
    /// Every slot is busy; the request waits (answered later from [`Scheduler::finish`] or
    /// [`Scheduler::register`], or cancelled by the caller's timeout).
    Queued(WaitId),
    /// No worker is registered at all: waiting cannot help.
    NoWorkers,
    /// Every registered worker is quarantined: waiting cannot help either.
    AllQuarantined,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    Succeeded {
        duration: Duration,
    },
    /// The compile could not run on the worker (not a compiler error): counts against the worker,
    /// and [`QUARANTINE_AFTER`] of them in a row quarantine it. `error` is the worker's message.
    Failed {
        error: String,
    },
    /// The job never started (its client went away before reaching the worker): counts nothing.
    Released,
}

/// The cluster as `ferry status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub workers: Vec<WorkerStatus>,
    pub queued: usize,
    pub running: usize,
    pub jobs_done: u64,
    pub jobs_failed: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerStatus {
    pub id: WorkerId,
    pub address: String,
    pub slots: u32,
    pub busy: u32,
    pub toolchains: Vec<ToolchainId>,
    pub version: String,
    /// Time since the last report.
    pub last_seen: Duration,
    /// Jobs that failed on this worker for infrastructure reasons since it registered.
    pub failures: u64,
    /// The worker's message for the latest of them.
    pub last_error: Option<String>,
    /// Time left in quarantine (no jobs are sent to it meanwhile).
    pub quarantined_for: Option<Duration>,
}

/// What happened to jobs and waiters when workers went away or slots freed up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effects {
    /// Jobs that were running on a worker that is gone: their clients must be told to fall back.
    pub failed_jobs: Vec<JobId>,
    /// Waiters that now have a slot.
    pub assigned: Vec<(WaitId, Assignment)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateError {
    UnknownWorker(WorkerId),
    UnknownJob(JobId),
    ZeroSlots(WorkerId),
    /// A worker reported the end of a job the scheduler gave to another worker.
    NotAssignedTo {
        job: JobId,
        worker: WorkerId,
    },
}

impl std::fmt::Display for StateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateError::UnknownWorker(id) => write!(f, "worker '{id}' is not registered"),
            StateError::UnknownJob(id) => write!(f, "job {} is not running", id.0),
            StateError::ZeroSlots(id) => write!(f, "worker '{id}' offers no slots"),
            StateError::NotAssignedTo { job, worker } => write!(f, "job {} was not given to worker '{worker}'", job.0),
        }
    }
}

impl std::error::Error for StateError {}

/// The whole scheduler state.
#[derive(Debug)]
pub struct Scheduler {
    workers: BTreeMap<WorkerId, Worker>,
    /// Workers with a free slot by score, best first; and the same per toolchain they hold, so
    /// picking the best worker is two lookups, not a scan of every worker.
    free: BTreeSet<(u32, WorkerId)>,
    free_holding: HashMap<ToolchainId, BTreeSet<(u32, WorkerId)>>,
    jobs: HashMap<JobId, RunningJob>,
    queue: FairQueue,
    lease: Duration,
    next_job: u64,
    next_wait: u64,
    jobs_done: u64,
    jobs_failed: u64,
}

#[derive(Debug)]
struct Worker {
    reg: Registration,
    toolchains: HashSet<ToolchainId>,
    busy: u32,
    jobs: HashSet<JobId>,
    /// Recent failures, decaying by half with every success, so one bad hour is not held forever.
    failures: f64,
    /// Exponentially weighted mean job duration in ms; None until the first job finishes.
    mean_ms: Option<f64>,
    /// Infrastructure failures since registration, and in a row (reset by a success).
    failed_total: u64,
    failed_in_a_row: u32,
    /// Quarantines in a row (reset by a success): the next one lasts twice as long.
    quarantines: u32,
    quarantined_until: Option<Instant>,
    last_error: Option<String>,
    last_seen: Instant,
    /// The score this worker is indexed under in the free sets (None: not indexed).
    indexed: Option<u32>,
}

#[derive(Debug)]
struct RunningJob {
    worker: WorkerId,
    /// When the scheduler handed it out; a job the worker still does not list as running well
    /// after this was never claimed by its client.
    assigned_at: Instant,
}

#[derive(Debug)]
struct Waiter {
    id: WaitId,
    toolchain: ToolchainId,
}

/// Round-robin between clients; FIFO within a client.
#[derive(Debug, Default)]
struct FairQueue {
    by_client: HashMap<ClientId, VecDeque<Waiter>>,
    ring: VecDeque<ClientId>,
    len: usize,
}

impl Scheduler {
    /// `lease`: how long a worker stays registered without a report.
    pub fn new(lease: Duration) -> Scheduler {
        Scheduler {
            workers: BTreeMap::new(),
            free: BTreeSet::new(),
            free_holding: HashMap::new(),
            jobs: HashMap::new(),
            queue: FairQueue::default(),
            lease,
            next_job: 1,
            next_wait: 1,
            jobs_done: 0,
            jobs_failed: 0,
        }
    }

    /// Numbers jobs from `first` on: a restarted scheduler must not hand out ids that workers may
    /// still be running from before the restart.
    pub fn starting_jobs_at(mut self, first: u64) -> Scheduler {
        self.next_job = first.max(1);
        self
    }

    /// A worker (re)starts its session. A worker that registers again under the same id has
    /// restarted: whatever it was running is lost. New slots serve waiting requests at once.
    pub fn register(&mut self, reg: Registration, now: Instant) -> Result<Effects, StateError> {
        if reg.slots == 0 {
            return Err(StateError::ZeroSlots(reg.id));
        }
        let mut effects = self.remove(&reg.id);
        let worker = Worker {
            toolchains: reg.toolchains.iter().copied().collect(),
            reg,
            busy: 0,
            jobs: HashSet::new(),
            failures: 0.0,
            mean_ms: None,
            failed_total: 0,
            failed_in_a_row: 0,
            quarantines: 0,
            quarantined_until: None,
            last_error: None,
            last_seen: now,
            indexed: None,
        };
        let id = worker.reg.id.clone();
        self.workers.insert(id.clone(), worker);
        self.index(&id);
        effects.assigned = self.serve_waiters(Some(&id));
        Ok(effects)
    }

    /// A worker's periodic report renews its lease and updates its unpacked toolchains. With
    /// `running` (the jobs the worker runs now), assignments older than `claim_within` that the
    /// worker never saw are released: their clients went away; and jobs it runs that this
    /// scheduler does not know (it restarted while they ran) are taken on, holding their slots
    /// until the worker reports their end.
    pub fn report(
        &mut self,
        id: &str,
        toolchains: Option<Vec<ToolchainId>>,
        running: Option<&[JobId]>,
        claim_within: Duration,
        now: Instant,
    ) -> Result<Effects, StateError> {
        if !self.workers.contains_key(id) {
            return Err(StateError::UnknownWorker(id.to_owned()));
        }
        if let Some(t) = toolchains {
            self.unindex(id);
            self.workers.get_mut(id).expect("checked").toolchains = t.into_iter().collect();
            self.index(id);
        }
        let worker = self.workers.get_mut(id).expect("checked");
        worker.last_seen = now;
        let mut effects = Effects::default();
        if let Some(running) = running {
            let unclaimed: Vec<JobId> = worker
                .jobs
                .iter()
                .filter(|j| !running.contains(j))
                .filter(|j| {
                    self.jobs.get(j).is_some_and(|r| now.saturating_duration_since(r.assigned_at) > claim_within)
                })
                .copied()
                .collect();
            for job in unclaimed {
                effects.assigned.extend(self.finish(job, JobOutcome::Released, now)?.assigned);
            }
            let unknown: Vec<JobId> = running.iter().filter(|j| !self.jobs.contains_key(j)).copied().collect();
            if !unknown.is_empty() {
                self.unindex(id);
                let worker = self.workers.get_mut(id).expect("checked");
                for job in unknown {
                    worker.jobs.insert(job);
                    worker.busy += 1;
                    self.jobs.insert(job, RunningJob { worker: id.to_owned(), assigned_at: now });
                }
                self.index(id);
            }
        }
        Ok(effects)
    }

    /// A worker is gone (stream dropped, lease expired): its running jobs fail.
    pub fn remove(&mut self, id: &str) -> Effects {
        self.unindex(id);
        let Some(worker) = self.workers.remove(id) else { return Effects::default() };
        let mut failed_jobs: Vec<JobId> = worker.jobs.into_iter().collect();
        failed_jobs.sort();
        for job in &failed_jobs {
            self.jobs.remove(job);
        }
        self.jobs_failed += failed_jobs.len() as u64;
        Effects { failed_jobs, assigned: Vec::new() }
    }

    /// Removes every worker whose lease ran out, and ends quarantines that are over (their
    /// slots serve waiting requests at once).
    pub fn expire(&mut self, now: Instant) -> Effects {
        let released: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.quarantined_until.is_some_and(|until| until <= now))
            .map(|w| w.reg.id.clone())
            .collect();
        let mut assigned = Vec::new();
        for id in released {
            let worker = self.workers.get_mut(&id).expect("listed");
            worker.quarantined_until = None;
            // On probation: one more failure quarantines it again, for longer.
            worker.failed_in_a_row = QUARANTINE_AFTER - 1;
            self.index(&id);
            assigned.extend(self.serve_waiters(Some(&id)));
        }
        let dead: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| now.saturating_duration_since(w.last_seen) > self.lease)
            .map(|w| w.reg.id.clone())
            .collect();
        let mut effects = Effects { failed_jobs: Vec::new(), assigned };
        for id in dead {
            effects.failed_jobs.extend(self.remove(&id).failed_jobs);
        }
        effects
    }

    /// One allocation request from `client` for a job needing `toolchain`.
    pub fn allocate(&mut self, client: &str, toolchain: ToolchainId) -> Allocation {
        if self.workers.is_empty() {
            return Allocation::NoWorkers;
        }
        if self.workers.values().all(|w| w.quarantined_until.is_some()) {
            return Allocation::AllQuarantined;
        }
        if self.queue.len == 0
            && let Some(assignment) = self.assign_best(toolchain, None)
        {
            return Allocation::Assigned(assignment);
        }
        let id = WaitId(self.next_wait);
        self.next_wait += 1;
        self.queue.push(client, Waiter { id, toolchain });
        Allocation::Queued(id)
    }

    /// A waiter gave up (its timeout); true if it was still queued.
    pub fn cancel(&mut self, wait: WaitId) -> bool {
        self.queue.remove(wait)
    }

    /// A worker says a job of its own ended: refused when the job was given to another worker.
    pub fn finish_reported(
        &mut self,
        worker: &str,
        job: JobId,
        outcome: JobOutcome,
        now: Instant,
    ) -> Result<Effects, StateError> {
        match self.jobs.get(&job) {
            None => Err(StateError::UnknownJob(job)),
            Some(r) if r.worker != worker => Err(StateError::NotAssignedTo { job, worker: worker.to_owned() }),
            Some(_) => self.finish(job, outcome, now),
        }
    }

    /// A job ended; its slot goes to the next waiter, if any.
    pub fn finish(&mut self, job: JobId, outcome: JobOutcome, now: Instant) -> Result<Effects, StateError> {
        let running = self.jobs.remove(&job).ok_or(StateError::UnknownJob(job))?;
        self.unindex(&running.worker);
        let worker = self.workers.get_mut(&running.worker).ok_or(StateError::UnknownJob(job))?;
        worker.jobs.remove(&job);
        worker.busy -= 1;
        match outcome {
            JobOutcome::Succeeded { duration } => {
                self.jobs_done += 1;
                worker.failures /= 2.0;
                worker.failed_in_a_row = 0;
                worker.quarantines = 0;
                let ms = duration.as_secs_f64() * 1000.0;
                worker.mean_ms = Some(worker.mean_ms.map_or(ms, |m| 0.8 * m + 0.2 * ms));
            }
            JobOutcome::Failed { error } => {
                self.jobs_failed += 1;
                worker.failures += 1.0;
                worker.failed_total += 1;
                worker.failed_in_a_row += 1;
                worker.last_error = Some(error);
                if worker.failed_in_a_row >= QUARANTINE_AFTER && worker.quarantined_until.is_none() {
                    let period = QUARANTINE_BASE.saturating_mul(1 << worker.quarantines.min(16)).min(QUARANTINE_MAX);
                    worker.quarantined_until = Some(now + period);
                    worker.quarantines += 1;
                }
            }
            JobOutcome::Released => {}
        }
        let id = running.worker.clone();
        self.index(&id);
        Ok(Effects { failed_jobs: Vec::new(), assigned: self.serve_waiters(Some(&id)) })
    }

    /// Marks a toolchain as present on a worker (it fetched and unpacked it).
    pub fn toolchain_ready(&mut self, worker: &str, toolchain: ToolchainId) {
        self.unindex(worker);
        if let Some(w) = self.workers.get_mut(worker) {
            w.toolchains.insert(toolchain);
        }
        self.index(worker);
    }

    /// Workers holding `toolchain`, by id.
    pub fn holders(&self, toolchain: &ToolchainId) -> Vec<WorkerId> {
        self.workers.values().filter(|w| w.toolchains.contains(toolchain)).map(|w| w.reg.id.clone()).collect()
    }

    pub fn status(&self, now: Instant) -> Status {
        Status {
            workers: self
                .workers
                .values()
                .map(|w| {
                    let mut toolchains: Vec<ToolchainId> = w.toolchains.iter().copied().collect();
                    toolchains.sort();
                    WorkerStatus {
                        id: w.reg.id.clone(),
                        address: w.reg.address.clone(),
                        slots: w.reg.slots,
                        busy: w.busy,
                        toolchains,
                        version: w.reg.version.clone(),
                        last_seen: now.saturating_duration_since(w.last_seen),
                        failures: w.failed_total,
                        last_error: w.last_error.clone(),
                        quarantined_for: w.quarantined_until.map(|u| u.saturating_duration_since(now)),
                    }
                })
                .collect(),
            queued: self.queue.len,
            running: self.jobs.len(),
            jobs_done: self.jobs_done,
            jobs_failed: self.jobs_failed,
        }
    }

    /// Gives free slots (of `only`, or anywhere) to waiters in fair order.
    fn serve_waiters(&mut self, only: Option<&str>) -> Vec<(WaitId, Assignment)> {
        let mut out = Vec::new();
        while self.queue.len > 0 {
            let Some(toolchain) = self.queue.peek().map(|w| w.toolchain) else { break };
            let Some(assignment) = self.assign_best(toolchain, only) else { break };
            let waiter = self.queue.pop().expect("peeked");
            out.push((waiter.id, assignment));
        }
        out
    }

    /// Picks the best worker with a free slot and records the job there: the lowest score
    /// (load, recent failures, measured speed), where not holding the toolchain costs
    /// [`LOCALITY_PENALTY`]; ties go to the holder, then to the smaller id.
    fn assign_best(&mut self, toolchain: ToolchainId, only: Option<&str>) -> Option<Assignment> {
        let best = match only {
            Some(id) => {
                let w = self.workers.get(id)?;
                (w.busy < w.reg.slots && w.quarantined_until.is_none()).then(|| id.to_owned())?
            }
            None => {
                let holder = self.free_holding.get(&toolchain).and_then(BTreeSet::first);
                let any = self.free.first();
                match (holder, any) {
                    (Some((h, hid)), Some((a, aid))) => {
                        if *h <= a + LOCALITY_PENALTY {
                            hid.clone()
                        } else {
                            aid.clone()
                        }
                    }
                    (Some((_, id)), None) | (None, Some((_, id))) => id.clone(),
                    (None, None) => return None,
                }
            }
        };
        self.unindex(&best);
        let worker = self.workers.get_mut(&best).expect("candidate exists");
        let job = JobId(self.next_job);
        self.next_job += 1;
        worker.busy += 1;
        worker.jobs.insert(job);
        let assignment = Assignment {
            job,
            worker: best.clone(),
            address: worker.reg.address.clone(),
            has_toolchain: worker.toolchains.contains(&toolchain),
        };
        self.jobs.insert(job, RunningJob { worker: best.clone(), assigned_at: Instant::now() });
        self.index(&best);
        Some(assignment)
    }

    /// Takes a worker out of the free sets (before anything its score depends on changes).
    fn unindex(&mut self, id: &str) {
        let Some(w) = self.workers.get_mut(id) else { return };
        let Some(score) = w.indexed.take() else { return };
        let key = (score, id.to_owned());
        self.free.remove(&key);
        for t in &w.toolchains {
            if let Some(set) = self.free_holding.get_mut(t) {
                set.remove(&key);
                if set.is_empty() {
                    self.free_holding.remove(t);
                }
            }
        }
    }

    /// Puts a worker into the free sets under its current score, if it has a free slot.
    fn index(&mut self, id: &str) {
        let Some(w) = self.workers.get_mut(id) else { return };
        if w.busy >= w.reg.slots || w.indexed.is_some() || w.quarantined_until.is_some() {
            return;
        }
        let score = score(w);
        w.indexed = Some(score);
        self.free.insert((score, id.to_owned()));
        for t in &w.toolchains {
            self.free_holding.entry(*t).or_default().insert((score, id.to_owned()));
        }
    }
}

/// Infrastructure failures in a row that quarantine a worker.
pub const QUARANTINE_AFTER: u32 = 3;
/// The first quarantine's length; each one that follows a failure right after release doubles it.
pub const QUARANTINE_BASE: Duration = Duration::from_secs(30);
/// The longest quarantine.
pub const QUARANTINE_MAX: Duration = Duration::from_secs(600);

/// What fetching a toolchain first costs, in score units: more than a fully loaded worker
/// (1000), so a holder with a free slot always wins over an idle worker that must fetch.
const LOCALITY_PENALTY: u32 = 2000;

/// Lower is better: load in permille of slots, 500 per recent failure (at most 8), and up to 250
/// for slow jobs (mean duration, saturating at one minute).
fn score(w: &Worker) -> u32 {
    let load = w.busy * 1000 / w.reg.slots;
    let failures = (w.failures.min(8.0) * 500.0) as u32;
    let speed = w.mean_ms.map_or(0, |m| (m.min(60_000.0) * 250.0 / 60_000.0) as u32);
    load + failures + speed
}

impl FairQueue {
    fn push(&mut self, client: &str, waiter: Waiter) {
        let queue = self.by_client.entry(client.to_owned()).or_default();
        if queue.is_empty() {
            self.ring.push_back(client.to_owned());
        }
        queue.push_back(waiter);
        self.len += 1;
    }

    fn peek(&self) -> Option<&Waiter> {
        self.ring.front().and_then(|c| self.by_client.get(c)).and_then(VecDeque::front)
    }

    fn pop(&mut self) -> Option<Waiter> {
        let client = self.ring.pop_front()?;
        let queue = self.by_client.get_mut(&client)?;
        let waiter = queue.pop_front();
        if queue.is_empty() {
            self.by_client.remove(&client);
        } else {
            self.ring.push_back(client);
        }
        self.len -= usize::from(waiter.is_some());
        waiter
    }

    fn remove(&mut self, wait: WaitId) -> bool {
        let Some((client, queue)) = self.by_client.iter_mut().find(|(_, q)| q.iter().any(|w| w.id == wait)) else {
            return false;
        };
        queue.retain(|w| w.id != wait);
        self.len -= 1;
        if queue.is_empty() {
            let client = client.clone();
            self.by_client.remove(&client);
            self.ring.retain(|c| *c != client);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tc(n: u8) -> ToolchainId {
        ToolchainId([n; 32])
    }

    fn reg(id: &str, slots: u32, toolchains: &[ToolchainId]) -> Registration {
        Registration {
            id: id.into(),
            address: format!("{id}:1"),
            slots,
            toolchains: toolchains.to_vec(),
            version: "t".into(),
        }
    }

    fn assigned(a: Allocation) -> Assignment {
        match a {
            Allocation::Assigned(a) => a,
            other => panic!("expected an assignment, got {other:?}"),
        }
    }

    #[test]
    fn locality_beats_load_and_no_workers_is_immediate() {
        let now = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(10));
        assert_eq!(s.allocate("c", tc(1)), Allocation::NoWorkers);
        s.register(reg("a", 4, &[]), now).unwrap();
        s.register(reg("b", 4, &[tc(1)]), now).unwrap();
        let first = assigned(s.allocate("c", tc(1)));
        assert_eq!((first.worker.as_str(), first.has_toolchain), ("b", true));
        // b is now a quarter loaded, still better than a worker that must fetch.
        assert_eq!(assigned(s.allocate("c", tc(1))).worker, "b");
        // For a toolchain nobody has, the least loaded worker wins.
        assert_eq!(assigned(s.allocate("c", tc(2))).worker, "a");
        // Once b reports it fetched tc(2), it is preferred for it... unless a is less loaded.
        s.toolchain_ready("a", tc(1));
        assert_eq!(assigned(s.allocate("c", tc(1))).worker, "a");
    }

    #[test]
    fn full_cluster_queues_fairly_between_clients() {
        let now = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(10));
        s.register(reg("w", 1, &[tc(1)]), now).unwrap();
        let running = assigned(s.allocate("greedy", tc(1)));
        let mut waits = Vec::new();
        for _ in 0..3 {
            waits.push(("greedy", s.allocate("greedy", tc(1))));
        }
        waits.push(("polite", s.allocate("polite", tc(1))));
        assert!(waits.iter().all(|(_, a)| matches!(a, Allocation::Queued(_))));
        // The slot frees: greedy's first waiter, then polite's (round-robin), then greedy's again.
        let mut order = Vec::new();
        let mut job = running.job;
        for _ in 0..3 {
            let effects = s.finish(job, JobOutcome::Succeeded { duration: Duration::from_millis(5) }, now).unwrap();
            let (wait, next) = effects.assigned.into_iter().next().expect("a waiter is served");
            let who = waits.iter().find(|(_, a)| *a == Allocation::Queued(wait)).unwrap().0;
            order.push(who);
            job = next.job;
        }
        assert_eq!(order, ["greedy", "polite", "greedy"]);
        assert_eq!(s.status(now).queued, 1);
    }

    #[test]
    fn cancelled_waiters_are_skipped_and_new_workers_serve_the_queue() {
        let now = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(10));
        s.register(reg("w", 1, &[]), now).unwrap();
        assigned(s.allocate("c", tc(1)));
        let Allocation::Queued(w1) = s.allocate("c", tc(1)) else { panic!() };
        let Allocation::Queued(w2) = s.allocate("d", tc(1)) else { panic!() };
        assert!(s.cancel(w1));
        assert!(!s.cancel(w1));
        let effects = s.register(reg("v", 1, &[]), now).unwrap();
        assert_eq!(effects.assigned.len(), 1);
        assert_eq!(effects.assigned[0].0, w2);
        assert_eq!(effects.assigned[0].1.worker, "v");
    }

    #[test]
    fn a_restarted_scheduler_takes_on_the_jobs_workers_report() {
        let now = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(10)).starting_jobs_at(1000);
        s.register(reg("w", 2, &[tc(1)]), now).unwrap();
        // The worker runs jobs 5 and 6 from before the restart: both slots are taken.
        s.report("w", None, Some(&[JobId(5), JobId(6)]), Duration::from_secs(30), now).unwrap();
        assert_eq!((s.status(now).running, s.status(now).workers[0].busy), (2, 2));
        assert!(matches!(s.allocate("c", tc(1)), Allocation::Queued(_)), "no free slot");
        // Job 5 ends: its slot serves the waiter.
        let effects = s
            .finish_reported("w", JobId(5), JobOutcome::Succeeded { duration: Duration::from_millis(1) }, now)
            .unwrap();
        assert_eq!(effects.assigned.len(), 1);
        assert_eq!(s.status(now).workers[0].busy, 2);
    }

    #[test]
    fn lost_workers_fail_their_jobs() {
        let now = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(10));
        s.register(reg("w", 2, &[]), now).unwrap();
        s.register(reg("v", 2, &[]), now).unwrap();
        let jobs: Vec<Assignment> = (0..4).map(|_| assigned(s.allocate("c", tc(1)))).collect();
        let on_w: Vec<JobId> = jobs.iter().filter(|a| a.worker == "w").map(|a| a.job).collect();
        // v keeps reporting; w goes silent past its lease.
        s.report("v", None, None, Duration::ZERO, now + Duration::from_secs(8)).unwrap();
        let effects = s.expire(now + Duration::from_secs(11));
        assert_eq!(effects.failed_jobs, on_w);
        assert_eq!(s.status(now).workers.len(), 1);
        assert_eq!(
            s.finish(on_w[0], JobOutcome::Failed { error: "e".into() }, now),
            Err(StateError::UnknownJob(on_w[0]))
        );
        // A worker re-registering (restart) loses its running jobs too.
        let on_v: Vec<JobId> = jobs.iter().filter(|a| a.worker == "v").map(|a| a.job).collect();
        assert_eq!(s.register(reg("v", 2, &[]), now).unwrap().failed_jobs, on_v);
        assert!(s.report("w", None, None, Duration::ZERO, now).is_err());
    }

    #[test]
    fn assignments_never_claimed_are_released() {
        let now = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(10));
        s.register(reg("w", 1, &[]), now).unwrap();
        let job = assigned(s.allocate("gone", tc(1)));
        let Allocation::Queued(wait) = s.allocate("c", tc(1)) else { panic!("slot is busy") };
        // Within the claim window nothing happens; after it, the slot goes to the waiter.
        let later = Instant::now() + Duration::from_secs(30);
        assert!(s.report("w", None, Some(&[]), Duration::from_secs(60), later).unwrap().assigned.is_empty());
        let effects = s.report("w", None, Some(&[]), Duration::from_secs(5), later).unwrap();
        assert_eq!(effects.assigned.len(), 1);
        assert_eq!(effects.assigned[0].0, wait);
        assert_eq!(
            s.finish(job.job, JobOutcome::Failed { error: "e".into() }, now),
            Err(StateError::UnknownJob(job.job))
        );
        assert_eq!(s.status(now).jobs_failed, 0);
    }

    /// The free-worker indexes must always agree with a scan of every worker.
    fn check_index(s: &Scheduler) {
        let mut expected = BTreeSet::new();
        let mut holding: HashMap<ToolchainId, BTreeSet<(u32, WorkerId)>> = HashMap::new();
        for (id, w) in &s.workers {
            if w.busy < w.reg.slots && w.quarantined_until.is_none() {
                expected.insert((score(w), id.clone()));
                for t in &w.toolchains {
                    holding.entry(*t).or_default().insert((score(w), id.clone()));
                }
            }
        }
        assert_eq!(s.free, expected);
        assert_eq!(s.free_holding, holding);
    }

    #[test]
    fn indexes_stay_exact_through_any_sequence() {
        let now = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(10));
        let mut running: Vec<JobId> = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for step in 0..5_000 {
            match next(7) {
                0 => {
                    let id = format!("w{}", next(6));
                    let toolchains: Vec<ToolchainId> = (0..next(3)).map(|t| tc(t as u8)).collect();
                    s.register(reg(&id, 1 + next(3) as u32, &toolchains), now).unwrap();
                }
                1 => {
                    s.remove(&format!("w{}", next(6)));
                }
                2 | 3 => {
                    if let Allocation::Assigned(a) = s.allocate("c", tc(next(3) as u8)) {
                        running.push(a.job);
                    }
                }
                4 | 5 if !running.is_empty() => {
                    let job = running.swap_remove(next(running.len() as u64) as usize);
                    let outcome = match next(3) {
                        0 => JobOutcome::Failed { error: "e".into() },
                        1 => JobOutcome::Released,
                        _ => JobOutcome::Succeeded { duration: Duration::from_millis(next(90_000)) },
                    };
                    let _ = s.finish(job, outcome, now);
                }
                _ => {
                    let id = format!("w{}", next(6));
                    let _ = s.report(&id, Some(vec![tc(next(3) as u8)]), None, Duration::ZERO, now);
                }
            }
            check_index(&s);
            // The chosen worker is the brute-force best.
            let t = tc(next(3) as u8);
            let brute = s
                .workers
                .values()
                .filter(|w| w.busy < w.reg.slots && w.quarantined_until.is_none())
                .map(|w| {
                    let penalty = if w.toolchains.contains(&t) { 0 } else { LOCALITY_PENALTY };
                    (score(w) + penalty, u8::from(!w.toolchains.contains(&t)), w.reg.id.clone())
                })
                .min()
                .map(|(total, _, _)| total);
            if let Some(a) = s.assign_best(t, None) {
                let w = &s.workers[&a.worker];
                let penalty = if w.toolchains.contains(&t) { 0 } else { LOCALITY_PENALTY };
                // Its score before this assignment raised its load by one job.
                let load = |busy: u32| busy * 1000 / w.reg.slots;
                let before = score(w) - load(w.busy) + load(w.busy - 1);
                assert_eq!(Some(before + penalty), brute, "step {step}");
                running.push(a.job);
            } else {
                assert_eq!(brute, None, "step {step}");
            }
            check_index(&s);
        }
    }

    #[test]
    fn failures_steer_work_away() {
        let now = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(10));
        s.register(reg("a", 4, &[tc(1)]), now).unwrap();
        s.register(reg("b", 4, &[tc(1)]), now).unwrap();
        // Equal workers: the tie goes to "a"; after one failure there, "b" is preferred.
        let job = assigned(s.allocate("c", tc(1)));
        assert_eq!(job.worker, "a");
        s.finish(job.job, JobOutcome::Failed { error: "e".into() }, now).unwrap();
        let job = assigned(s.allocate("c", tc(1)));
        assert_eq!(job.worker, "b");
        s.finish(job.job, JobOutcome::Succeeded { duration: Duration::from_millis(10) }, now).unwrap();
        assert_eq!(assigned(s.allocate("c", tc(1))).worker, "b");
        assert_eq!((s.status(now).jobs_failed, s.status(now).jobs_done), (1, 1));
    }

    #[test]
    fn failing_workers_are_quarantined_then_probed_again() {
        let now = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(3600));
        s.register(reg("bad", 4, &[tc(1)]), now).unwrap();
        s.register(reg("ok", 1, &[]), now).unwrap();
        let fail = |s: &mut Scheduler, at: Instant| {
            let job = assigned(s.allocate("c", tc(1)));
            assert_eq!(job.worker, "bad");
            s.finish_reported("bad", job.job, JobOutcome::Failed { error: "sandbox: bwrap missing".into() }, at)
                .unwrap();
        };
        for _ in 0..QUARANTINE_AFTER {
            fail(&mut s, now);
        }
        let status = s.status(now);
        let bad = status.workers.iter().find(|w| w.id == "bad").unwrap();
        assert_eq!((bad.failures, bad.last_error.as_deref()), (3, Some("sandbox: bwrap missing")));
        assert_eq!(bad.quarantined_for, Some(QUARANTINE_BASE));
        // Only the healthy worker gets work now; once it is full, requests wait.
        assert_eq!(assigned(s.allocate("c", tc(1))).worker, "ok");
        assert!(matches!(s.allocate("c", tc(1)), Allocation::Queued(_)));
        // The quarantine ends: the waiter is served by "bad", which is on probation.
        let effects = s.expire(now + QUARANTINE_BASE);
        assert_eq!(effects.assigned.len(), 1);
        assert_eq!(effects.assigned[0].1.worker, "bad");
        let later = now + QUARANTINE_BASE;
        s.finish_reported("bad", effects.assigned[0].1.job, JobOutcome::Failed { error: "again".into() }, later)
            .unwrap();
        let bad = s.status(later).workers.into_iter().find(|w| w.id == "bad").unwrap();
        assert_eq!(bad.quarantined_for, Some(QUARANTINE_BASE * 2), "one failure on probation doubles it");
        // With every worker quarantined, allocation answers at once.
        s.remove("ok");
        assert_eq!(s.allocate("c", tc(1)), Allocation::AllQuarantined);
        check_index(&s);
    }

    #[test]
    fn a_worker_cannot_report_another_workers_job() {
        let now = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(10));
        s.register(reg("a", 1, &[]), now).unwrap();
        s.register(reg("b", 1, &[]), now).unwrap();
        let job = assigned(s.allocate("c", tc(1)));
        let other = if job.worker == "a" { "b" } else { "a" };
        let done = JobOutcome::Succeeded { duration: Duration::from_millis(1) };
        assert_eq!(
            s.finish_reported(other, job.job, done.clone(), now),
            Err(StateError::NotAssignedTo { job: job.job, worker: other.to_owned() })
        );
        assert_eq!(s.status(now).running, 1);
        s.finish_reported(&job.worker, job.job, done, now).unwrap();
        assert_eq!(s.status(now).running, 0);
    }
}
