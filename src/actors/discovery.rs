//! The DiscoveryActor: every `discovery.interval` (and at once when asked) it
//! claims ready jobs through the DbWriter and starts a JobAggregator for each. It
//! keeps the registry of the jobs this node runs, for the admin API and for
//! shutdown. On start it claims at once, which resumes the jobs this node owned
//! before a restart without waiting for their leases to expire.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;

use super::job_aggregator::{JobAggregator, JobDeps};
use super::messages::*;

pub struct DiscoveryActor {
    deps: JobDeps,
    active: HashMap<String, Addr<JobAggregator>>,
    claiming: bool,
    /// Another discovery was asked for while one was running.
    again: bool,
    stopping: bool,
    ticker: Option<SpawnHandle>,
    /// The database failed last time (log once per outage).
    failing: bool,
}

impl DiscoveryActor {
    pub fn new(deps: JobDeps) -> Self {
        Self {
            deps,
            active: HashMap::new(),
            claiming: false,
            again: false,
            stopping: false,
            ticker: None,
            failing: false,
        }
    }

    fn schedule(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.ticker.take() {
            ctx.cancel_future(h);
        }
        self.ticker = Some(ctx.run_interval(self.deps.settings.discovery.interval, |act, ctx| act.discover(ctx)));
    }

    fn discover(&mut self, ctx: &mut Context<Self>) {
        if self.stopping {
            return;
        }
        if self.claiming {
            self.again = true;
            return;
        }
        // One job per copy slot at most; a job's extra disks queue for slots.
        let room = self.deps.settings.copy.max_concurrent_disks.saturating_sub(self.active.len());
        if room == 0 {
            return;
        }
        self.claiming = true;
        let msg = ClaimJobs {
            node: self.deps.node.clone(),
            lease: self.deps.settings.discovery.lease,
            limit: room as i64,
            exclude: self.active.keys().cloned().collect(),
        };
        self.deps
            .db
            .send(msg)
            .into_actor(self)
            .map(|res, act, ctx| {
                act.claiming = false;
                match res {
                    Ok(Ok(jobs)) => {
                        act.failing = false;
                        for (job, disks) in jobs {
                            if act.stopping {
                                break;
                            }
                            let id = job.id.clone();
                            tracing::info!(job_id = %id, disks = disks.len(), "claimed job");
                            let agg =
                                JobAggregator::new(job, disks, act.deps.clone(), ctx.address().recipient()).start();
                            act.active.insert(id, agg);
                        }
                    }
                    Ok(Err(e)) => {
                        if !act.failing {
                            tracing::warn!(error = %e, "cannot look for jobs; will try again");
                        }
                        act.failing = true;
                    }
                    Err(e) => tracing::error!(error = %e, "db writer unreachable"),
                }
                if std::mem::take(&mut act.again) {
                    act.discover(ctx);
                }
            })
            .spawn(ctx);
    }
}

impl Actor for DiscoveryActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.discover(ctx);
        self.schedule(ctx);
    }
}

impl Supervised for DiscoveryActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        tracing::warn!("discovery restarting");
        self.claiming = false;
        self.ticker = None;
    }
}

impl Handler<DiscoverNow> for DiscoveryActor {
    type Result = ();
    fn handle(&mut self, _: DiscoverNow, ctx: &mut Context<Self>) {
        self.discover(ctx);
    }
}

impl Handler<JobEnded> for DiscoveryActor {
    type Result = ();
    fn handle(&mut self, m: JobEnded, ctx: &mut Context<Self>) {
        self.active.remove(&m.job_id);
        // A slot opened: another job may be waiting for it.
        if !self.stopping {
            self.discover(ctx);
        }
    }
}

impl Handler<FindActive> for DiscoveryActor {
    type Result = Option<Addr<JobAggregator>>;
    fn handle(&mut self, m: FindActive, _: &mut Context<Self>) -> Self::Result {
        self.active.get(&m.job_id).cloned()
    }
}

impl Handler<ListActive> for DiscoveryActor {
    type Result = Vec<String>;
    fn handle(&mut self, _: ListActive, _: &mut Context<Self>) -> Self::Result {
        self.active.keys().cloned().collect()
    }
}

impl Handler<StopDiscovery> for DiscoveryActor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: StopDiscovery, ctx: &mut Context<Self>) -> Self::Result {
        self.stopping = true;
        if let Some(h) = self.ticker.take() {
            ctx.cancel_future(h);
        }
        let waits: Vec<_> = self.active.values().map(|a| a.send(Suspend)).collect();
        Box::pin(async move {
            for w in waits {
                let _ = w.await;
            }
        })
    }
}

impl Handler<Reconfigure> for DiscoveryActor {
    type Result = ();
    fn handle(&mut self, Reconfigure(s): Reconfigure, ctx: &mut Context<Self>) {
        let interval_changed = s.discovery.interval != self.deps.settings.discovery.interval;
        self.deps.slots.set_capacity(s.copy.max_concurrent_disks);
        self.deps.settings = Arc::clone(&s);
        if interval_changed && !self.stopping {
            self.schedule(ctx);
        }
    }
}
