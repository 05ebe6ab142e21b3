//! Database faults (scenario `db`): the private MariaDB of [`killable_db`]
//! SIGSTOPped, or killed with SIGKILL and started again on the same data
//! directory and socket, at a random moment of a copy. The copy must finish
//! on its own, the rows catch up to the truth (checked by
//! [`crate::rows_caught_up`] like every round), and the daemon's health must
//! answer throughout: once a second while the database is away, each answer
//! within 2 s and saying the database is unreachable.
//!
//! The outages last 30 s (paused) and 20 s (down) in the long form and are
//! shortened in the short form (see `Outages`).

use std::time::{Duration, Instant};

use testkit::harness::Daemon;

use crate::killable_db;

/// Longest a health answer may take while the database is away.
const HEALTH_WITHIN: Duration = Duration::from_secs(2);

/// Pauses (`pause`) or kills the database for `length`, asking the daemon's
/// health once a second meanwhile, then lets it answer again. What went wrong,
/// if anything.
pub fn outage(daemon: &mut Daemon, pause: bool, length: Duration) -> Option<String> {
    let db = killable_db();
    let from = Instant::now();
    if pause {
        db.pause(true);
    } else {
        db.kill9();
    }
    let mut wrong = None;
    let mut asked = 0;
    while from.elapsed() < length {
        let t = Instant::now();
        let h = daemon.cli(&["health", "--json"]);
        let took = t.elapsed();
        asked += 1;
        let reachable = serde_json::from_str::<serde_json::Value>(h.stdout.trim())
            .ok()
            .and_then(|v| v["database_reachable"].as_bool());
        // The first answers may come before the daemon noticed.
        let settled = from.elapsed() > Duration::from_secs(4);
        if wrong.is_none() {
            // `blockrepl health` exits non-zero while the daemon is degraded
            // (for monitoring); the answer is what counts.
            if reachable.is_none() {
                wrong = Some(format!("health did not answer: {} {}", h.stdout.trim(), h.stderr.trim()));
            } else if took > HEALTH_WITHIN {
                wrong = Some(format!("health took {took:?} with the database away"));
            } else if settled && reachable == Some(true) {
                wrong = Some(format!(
                    "health said the database is reachable while it was away ({:.1} s into the outage, the \
                     answer took {took:?}, server pid {:?}): {}",
                    from.elapsed().as_secs_f64(),
                    db.pid(),
                    h.stdout.trim()
                ));
            }
        }
        if let Some(exit) = daemon.exited() {
            wrong = Some(format!("the daemon exited ({exit}) while the database was away"));
            break;
        }
        // One question a second, as a monitoring system asks: scheduling.
        std::thread::sleep(Duration::from_secs(1).saturating_sub(t.elapsed()));
    }
    if pause {
        db.pause(false);
    } else {
        db.restart();
    }
    if asked == 0 {
        wrong.get_or_insert_with(|| "health was never asked".to_string());
    }
    wrong
}
