//! The change-ID chain of an incremental disk: its changes (a dirty bitmap or
//! changed areas) are relative to `previous_change_id`, so they make a correct
//! target only if the target holds exactly that state. The target's state is
//! what the last successful sync of the same disk recorded in `cbt_history`
//! (same VM by `replication_jobs.vm_name`, same `disk_id`, in an earlier job;
//! looked up by `db::last_change_ids`). [`check`] decides, before anything is
//! written to the target, whether the disk may be copied.
//!
//! A pure function over values: the database read is in `db`, the consequence
//! (the disk fails at once, the job with it) in `JobRun::start`. The engine
//! knows nothing of change IDs. There is no fallback to a full copy: the only
//! way past a broken chain is the job's explicit `skip_change_check`.

/// Whether an incremental disk continues its chain: `previous` is the disk's
/// `previous_change_id`, `recorded` the change ID of the last successful sync
/// of the disk (`None`: no such sync; `Some(None)`: one without a change ID).
/// The error is one line naming both IDs.
pub fn check(vm: &str, disk: &str, previous: Option<&str>, recorded: Option<Option<&str>>) -> Result<(), String> {
    let given = match previous {
        Some(p) => format!("previous_change_id is '{p}'"),
        None => "previous_change_id is not set".to_string(),
    };
    let found = match recorded {
        Some(Some(r)) if previous == Some(r) => return Ok(()),
        Some(Some(r)) => format!("the last successful sync of vm '{vm}' disk '{disk}' recorded change_id '{r}'"),
        Some(None) => format!("the last successful sync of vm '{vm}' disk '{disk}' recorded no change_id"),
        None => format!("no successful sync of vm '{vm}' disk '{disk}' is recorded"),
    };
    Err(format!(
        "change ID chain broken: {given} but {found}; nothing was copied (set skip_change_check to copy anyway)"
    ))
}

#[cfg(test)]
mod tests {
    use super::check;

    fn check_one(previous: Option<&str>, recorded: Option<Option<&str>>, expected: Result<(), &str>) {
        let got = check("vm1", "disk-1", previous, recorded);
        assert_eq!(got, expected.map_err(str::to_string), "{previous:?} after {recorded:?}");
        if let Err(line) = got {
            assert!(!line.contains('\n'));
        }
    }

    #[test]
    fn an_unbroken_chain_passes() {
        check_one(Some("52 aa/7"), Some(Some("52 aa/7")), Ok(()));
    }

    #[test]
    fn a_broken_chain_names_both_ids() {
        check_one(
            Some("cid-0"),
            Some(Some("cid-1")),
            Err("change ID chain broken: previous_change_id is 'cid-0' but the last successful sync of vm 'vm1' \
                 disk 'disk-1' recorded change_id 'cid-1'; nothing was copied (set skip_change_check to copy anyway)"),
        );
        check_one(
            None,
            Some(Some("cid-1")),
            Err("change ID chain broken: previous_change_id is not set but the last successful sync of vm 'vm1' \
                 disk 'disk-1' recorded change_id 'cid-1'; nothing was copied (set skip_change_check to copy anyway)"),
        );
    }

    #[test]
    fn no_recorded_sync_is_a_broken_chain_too() {
        check_one(
            Some("cid-0"),
            None,
            Err("change ID chain broken: previous_change_id is 'cid-0' but no successful sync of vm 'vm1' \
                 disk 'disk-1' is recorded; nothing was copied (set skip_change_check to copy anyway)"),
        );
        check_one(
            Some("cid-0"),
            Some(None),
            Err("change ID chain broken: previous_change_id is 'cid-0' but the last successful sync of vm 'vm1' \
                 disk 'disk-1' recorded no change_id; nothing was copied (set skip_change_check to copy anyway)"),
        );
        // Nothing on either side is no chain at all.
        check_one(
            None,
            None,
            Err("change ID chain broken: previous_change_id is not set but no successful sync of vm 'vm1' \
                 disk 'disk-1' is recorded; nothing was copied (set skip_change_check to copy anyway)"),
        );
    }
}
