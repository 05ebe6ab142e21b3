//! The TimeoutWatchdog: a job whose work counter has not moved for
//! `watchdog.stall_timeout` is reported to its aggregator, which cancels its
//! copiers and fails it with a message saying so.
//!
//! The deadline logic is [`StallTracker`], a plain struct on tokio's clock, so
//! tests drive it with a paused clock; the actor only ticks it.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use tokio::time::Instant;

use super::messages::{Heartbeat, Reconfigure, Stalled, Unwatch, Watch};

/// Last progress per job.
#[derive(Debug)]
pub struct StallTracker {
    pub timeout: Duration,
    jobs: HashMap<String, (u64, Instant)>,
}

impl StallTracker {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout, jobs: HashMap::new() }
    }

    pub fn watch(&mut self, job: &str, now: Instant) {
        self.jobs.insert(job.to_string(), (0, now));
    }

    /// Records the job's work counter; time restarts only when it moved. Either
    /// way: a failed flush takes back what was written since the last good one,
    /// and writing it again is work, though the counter only climbs back to
    /// where it was.
    pub fn heartbeat(&mut self, job: &str, work: u64, now: Instant) {
        if let Some((w, at)) = self.jobs.get_mut(job)
            && work != *w
        {
            *w = work;
            *at = now;
        }
    }

    pub fn unwatch(&mut self, job: &str) {
        self.jobs.remove(job);
    }

    /// Jobs idle for at least the timeout, with how long; each is reported once
    /// (it is forgotten here).
    pub fn take_stalled(&mut self, now: Instant) -> Vec<(String, Duration)> {
        let stalled: Vec<(String, Duration)> = self
            .jobs
            .iter()
            .map(|(id, (_, at))| (id.clone(), now.duration_since(*at)))
            .filter(|(_, idle)| *idle >= self.timeout)
            .collect();
        for (id, _) in &stalled {
            self.jobs.remove(id);
        }
        stalled
    }

    /// How often to look: often enough that a stall is seen within ~2 % of the timeout.
    pub fn tick(&self) -> Duration {
        (self.timeout / 50).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }
}

pub struct TimeoutWatchdog {
    tracker: StallTracker,
    notify: HashMap<String, Recipient<Stalled>>,
    ticker: Option<SpawnHandle>,
}

impl TimeoutWatchdog {
    pub fn new(timeout: Duration) -> Self {
        Self { tracker: StallTracker::new(timeout), notify: HashMap::new(), ticker: None }
    }

    fn schedule(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.ticker.take() {
            ctx.cancel_future(h);
        }
        self.ticker = Some(ctx.run_interval(self.tracker.tick(), |act, _| {
            for (job, idle) in act.tracker.take_stalled(Instant::now()) {
                if let Some(r) = act.notify.remove(&job) {
                    tracing::warn!(job_id = %job, idle_s = idle.as_secs(), "job made no progress; failing it");
                    r.do_send(Stalled { idle });
                }
            }
        }));
    }
}

impl Actor for TimeoutWatchdog {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        self.schedule(ctx);
    }
}

impl Supervised for TimeoutWatchdog {
    fn restarting(&mut self, _: &mut Context<Self>) {
        tracing::warn!("timeout watchdog restarting");
        // A handle of the old context means nothing in the new one; cancelling
        // it there could cancel the new ticker.
        self.ticker = None;
    }
}

impl Handler<Watch> for TimeoutWatchdog {
    type Result = ();
    fn handle(&mut self, m: Watch, _: &mut Context<Self>) {
        self.tracker.watch(&m.job_id, Instant::now());
        self.notify.insert(m.job_id, m.notify);
    }
}

impl Handler<Heartbeat> for TimeoutWatchdog {
    type Result = ();
    fn handle(&mut self, m: Heartbeat, _: &mut Context<Self>) {
        self.tracker.heartbeat(&m.job_id, m.work, Instant::now());
    }
}

impl Handler<Unwatch> for TimeoutWatchdog {
    type Result = ();
    fn handle(&mut self, m: Unwatch, _: &mut Context<Self>) {
        self.tracker.unwatch(&m.job_id);
        self.notify.remove(&m.job_id);
    }
}

impl Handler<Reconfigure> for TimeoutWatchdog {
    type Result = ();
    fn handle(&mut self, Reconfigure(s): Reconfigure, ctx: &mut Context<Self>) {
        if s.watchdog.stall_timeout != self.tracker.timeout {
            self.tracker.timeout = s.watchdog.stall_timeout;
            self.schedule(ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_jobs_are_reported_once_after_the_timeout() {
        let t0 = Instant::now();
        let mut t = StallTracker::new(Duration::from_secs(300));
        t.watch("a", t0);
        t.watch("b", t0);
        t.heartbeat("a", 10, t0 + Duration::from_secs(200));
        assert!(t.take_stalled(t0 + Duration::from_secs(299)).is_empty());
        assert_eq!(t.take_stalled(t0 + Duration::from_secs(300)), vec![("b".to_string(), Duration::from_secs(300))]);
        assert!(t.take_stalled(t0 + Duration::from_secs(400)).is_empty(), "b is reported once; a moved at 200");
        assert_eq!(t.take_stalled(t0 + Duration::from_secs(500)).len(), 1);
    }

    #[test]
    fn a_counter_that_does_not_grow_is_no_progress() {
        let t0 = Instant::now();
        let mut t = StallTracker::new(Duration::from_secs(10));
        t.watch("a", t0);
        t.heartbeat("a", 5, t0 + Duration::from_secs(1));
        t.heartbeat("a", 5, t0 + Duration::from_secs(9));
        assert_eq!(t.take_stalled(t0 + Duration::from_secs(11)).len(), 1);
    }

    #[test]
    fn a_counter_taken_back_and_climbing_again_is_progress() {
        let t0 = Instant::now();
        let mut t = StallTracker::new(Duration::from_secs(10));
        t.watch("a", t0);
        t.heartbeat("a", 100, t0 + Duration::from_secs(1));
        t.heartbeat("a", 40, t0 + Duration::from_secs(6));
        t.heartbeat("a", 100, t0 + Duration::from_secs(12));
        assert!(t.take_stalled(t0 + Duration::from_secs(21)).is_empty(), "it moved at 6 and at 12");
        assert_eq!(t.take_stalled(t0 + Duration::from_secs(22)).len(), 1);
    }

    #[derive(Default)]
    struct Collector(Vec<Duration>);
    impl Actor for Collector {
        type Context = Context<Self>;
    }
    impl Handler<Stalled> for Collector {
        type Result = ();
        fn handle(&mut self, m: Stalled, _: &mut Context<Self>) {
            self.0.push(m.idle);
        }
    }
    #[derive(Message)]
    #[rtype(result = "Vec<Duration>")]
    struct Take;
    impl Handler<Take> for Collector {
        type Result = MessageResult<Take>;
        fn handle(&mut self, _: Take, _: &mut Context<Self>) -> Self::Result {
            MessageResult(std::mem::take(&mut self.0))
        }
    }

    #[actix_rt::test]
    async fn the_actor_fails_a_stalled_job_after_the_timeout_on_a_paused_clock() {
        tokio::time::pause();
        let dog = TimeoutWatchdog::new(Duration::from_secs(300)).start();
        let c = Collector::default().start();
        dog.send(Watch { job_id: "j".into(), notify: c.clone().recipient() }).await.unwrap();
        dog.send(Heartbeat { job_id: "j".into(), work: 1 }).await.unwrap();
        tokio::time::sleep(Duration::from_secs(290)).await;
        assert!(c.send(Take).await.unwrap().is_empty(), "not before the timeout");
        dog.send(Heartbeat { job_id: "j".into(), work: 2 }).await.unwrap();
        tokio::time::sleep(Duration::from_secs(290)).await;
        assert!(c.send(Take).await.unwrap().is_empty(), "progress restarted the clock");
        tokio::time::sleep(Duration::from_secs(20)).await;
        let got = c.send(Take).await.unwrap();
        assert_eq!(got.len(), 1, "reported once");
        assert!(got[0] >= Duration::from_secs(300) && got[0] < Duration::from_secs(310), "{got:?}");
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct StopNow;
    impl Handler<StopNow> for TimeoutWatchdog {
        type Result = ();
        fn handle(&mut self, _: StopNow, ctx: &mut Context<Self>) {
            ctx.stop();
        }
    }

    #[actix_rt::test]
    async fn a_stopped_watchdog_is_restarted_by_its_supervisor_and_keeps_its_jobs() {
        tokio::time::pause();
        let dog = Supervisor::start(|_| TimeoutWatchdog::new(Duration::from_secs(60)));
        let c = Collector::default().start();
        dog.send(Watch { job_id: "j".into(), notify: c.clone().recipient() }).await.unwrap();
        dog.send(StopNow).await.unwrap();
        // Restarted: it still answers, still knows "j", and its timer runs again.
        dog.send(Heartbeat { job_id: "j".into(), work: 1 }).await.expect("the supervisor restarted the watchdog");
        tokio::time::sleep(Duration::from_secs(70)).await;
        assert_eq!(c.send(Take).await.unwrap().len(), 1, "the job watched before the restart is still watched");
    }
}
