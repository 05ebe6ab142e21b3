//! The DiskCopier: one per disk. It runs the engine on a thread of its own
//! (plan, wait for the go and a copy slot, copy), forwards progress to its
//! JobAggregator four times a second, and turns whatever the engine does, a panic
//! included, into a [`DiskReport`]. The thread is joined when the actor stops.
//!
//! [`DiskSlots`] bounds how many disks copy at once over the whole daemon.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use actix::prelude::*;

use super::messages::*;
use crate::engine::{CancelToken, Copier};

/// How often progress is forwarded.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// A counting semaphore for copy slots, shared by every DiskCopier; blocking,
/// because it is taken on the copy thread.
#[derive(Clone)]
pub struct DiskSlots(Arc<(Mutex<SlotState>, Condvar)>);

struct SlotState {
    capacity: usize,
    used: usize,
}

/// A held slot; released on drop.
pub struct Slot(DiskSlots);

impl Drop for Slot {
    fn drop(&mut self) {
        let (m, cv) = &*self.0.0;
        let mut s = m.lock().unwrap_or_else(|e| e.into_inner());
        s.used -= 1;
        cv.notify_one();
    }
}

impl DiskSlots {
    pub fn new(capacity: usize) -> Self {
        Self(Arc::new((Mutex::new(SlotState { capacity, used: 0 }), Condvar::new())))
    }

    /// Takes a slot if one is free now.
    pub fn try_acquire(&self) -> Option<Slot> {
        let (m, _) = &*self.0;
        let mut s = m.lock().unwrap_or_else(|e| e.into_inner());
        (s.used < s.capacity).then(|| {
            s.used += 1;
            Slot(self.clone())
        })
    }

    /// Waits for a slot; `None` when `cancel` fires first.
    pub fn acquire(&self, cancel: &CancelToken) -> Option<Slot> {
        let (m, cv) = &*self.0;
        let mut s = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if cancel.is_cancelled() {
                return None;
            }
            if s.used < s.capacity {
                s.used += 1;
                return Some(Slot(self.clone()));
            }
            s = cv.wait_timeout(s, Duration::from_millis(100)).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
    }

    pub fn in_use(&self) -> usize {
        self.0.0.lock().map(|s| s.used).unwrap_or(0)
    }

    pub fn capacity(&self) -> usize {
        self.0.0.lock().map(|s| s.capacity).unwrap_or(0)
    }

    /// New capacity (SIGHUP); slots in use stay in use.
    pub fn set_capacity(&self, capacity: usize) {
        let (m, cv) = &*self.0;
        m.lock().unwrap_or_else(|e| e.into_inner()).capacity = capacity;
        cv.notify_all();
    }
}

pub struct DiskCopier {
    disk_id: String,
    copier: Arc<Copier>,
    report: Recipient<DiskReport>,
    slots: DiskSlots,
    go: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl DiskCopier {
    pub fn new(disk_id: String, copier: Copier, report: Recipient<DiskReport>, slots: DiskSlots) -> Self {
        Self { disk_id, copier: Arc::new(copier), report, slots, go: None, thread: None }
    }
}

/// The copy thread: plan, wait for the go, take a slot, copy.
fn copy_thread(
    disk_id: String,
    copier: Arc<Copier>,
    report: Recipient<DiskReport>,
    slots: DiskSlots,
    go: mpsc::Receiver<()>,
) {
    let send = |kind| report.do_send(DiskReport { disk_id: disk_id.clone(), kind });
    let on_event = |e| send(DiskReportKind::Engine(e));
    let cancel = copier.cancel_token();
    let cancelled = || CopyFailure { message: "cancelled".into(), cancelled: true, fenced: false };
    let body = || -> Result<_, CopyFailure> {
        let failure = |e: crate::engine::CopyError| CopyFailure {
            cancelled: e.is_cancelled(),
            fenced: e.is_fenced(),
            message: e.to_string(),
        };
        let info = copier.prepare(&on_event).map_err(failure)?;
        send(DiskReportKind::Planned(info));
        loop {
            match go.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => break,
                Err(mpsc::RecvTimeoutError::Timeout) if !cancel.is_cancelled() => {}
                Err(_) => return Err(cancelled()),
            }
        }
        let _slot = match slots.try_acquire() {
            Some(s) => s,
            None => {
                // Waiting may take long: do not hold idle connections meanwhile.
                copier.park();
                slots.acquire(&cancel).ok_or_else(cancelled)?
            }
        };
        send(DiskReportKind::Started);
        copier.run(&on_event).map_err(failure)
    };
    let result = caught(&disk_id, body);
    // Progress first, so the aggregator sees the final figures before the end.
    send(DiskReportKind::Progress(copier.progress().snapshot()));
    send(DiskReportKind::Finished(result));
}

/// Runs `body`, turning a panic into a failed copy: a bug in the engine fails
/// one disk, never the daemon.
fn caught<T>(disk_id: &str, body: impl FnOnce() -> Result<T, CopyFailure>) -> Result<T, CopyFailure> {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(r) => r,
        Err(panic) => {
            let what = super::panic_message(&*panic);
            tracing::error!(disk_id = %disk_id, panic = %what, "copy engine panicked");
            Err(CopyFailure {
                message: format!("internal error: copy engine panicked: {what}"),
                cancelled: false,
                fenced: false,
            })
        }
    }
}

impl Actor for DiskCopier {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (tx, rx) = mpsc::channel();
        self.go = Some(tx);
        let (disk, copier, report, slots) =
            (self.disk_id.clone(), self.copier.clone(), self.report.clone(), self.slots.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("disk-{}", self.disk_id))
            .spawn(move || copy_thread(disk, copier, report, slots, rx));
        match spawned {
            Ok(h) => self.thread = Some(h),
            Err(e) => {
                self.report.do_send(DiskReport {
                    disk_id: self.disk_id.clone(),
                    kind: DiskReportKind::Finished(Err(CopyFailure {
                        message: format!("cannot start a copy thread: {e}"),
                        cancelled: false,
                        fenced: false,
                    })),
                });
                ctx.stop();
                return;
            }
        }
        let progress = self.copier.progress();
        ctx.run_interval(PROGRESS_EVERY, move |act, _| {
            act.report.do_send(DiskReport {
                disk_id: act.disk_id.clone(),
                kind: DiskReportKind::Progress(progress.snapshot()),
            });
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.copier.cancel_token().cancel();
        self.go = None;
        if let Some(h) = self.thread.take() {
            // The engine stops within a second of being cancelled.
            if h.join().is_err() {
                tracing::error!(disk_id = %self.disk_id, "copy thread panicked outside the engine");
            }
        }
    }
}

impl Handler<StartTransfer> for DiskCopier {
    type Result = ();
    fn handle(&mut self, _: StartTransfer, _: &mut Context<Self>) {
        if let Some(go) = &self.go {
            let _ = go.send(());
        }
    }
}

impl Handler<CancelCopy> for DiskCopier {
    type Result = ();
    fn handle(&mut self, _: CancelCopy, _: &mut Context<Self>) {
        self.copier.cancel_token().cancel();
    }
}

impl Handler<Dismiss> for DiskCopier {
    type Result = ();
    fn handle(&mut self, _: Dismiss, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::panic)]
    fn a_panic_in_the_engine_becomes_a_failed_disk() {
        let r: Result<(), CopyFailure> = caught("d1", || panic!("index out of bounds"));
        let f = r.unwrap_err();
        assert_eq!(f.message, "internal error: copy engine panicked: index out of bounds");
        assert!(!f.cancelled);
        let n = 7;
        let r: Result<(), CopyFailure> = caught("d1", || panic!("formatted {n}"));
        assert!(r.unwrap_err().message.ends_with("formatted 7"));
        assert_eq!(caught("d1", || Ok::<_, CopyFailure>(5)).unwrap(), 5);
    }

    #[test]
    fn slots_bound_concurrency_and_come_back() {
        let s = DiskSlots::new(2);
        let a = s.try_acquire().unwrap();
        let _b = s.try_acquire().unwrap();
        assert!(s.try_acquire().is_none());
        assert_eq!(s.in_use(), 2);
        drop(a);
        assert!(s.try_acquire().is_some());
    }

    #[test]
    fn waiting_for_a_slot_ends_on_cancel() {
        let s = DiskSlots::new(1);
        let _a = s.try_acquire().unwrap();
        let c = CancelToken::default();
        let c2 = c.clone();
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.acquire(&c2).is_none());
        c.cancel();
        assert!(t.join().unwrap());
    }

    #[test]
    fn a_freed_slot_wakes_a_waiter() {
        let s = DiskSlots::new(1);
        let a = s.try_acquire().unwrap();
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.acquire(&CancelToken::default()).is_some());
        drop(a);
        assert!(t.join().unwrap());
    }
}
