//! Validating a submitted job: from the request body to the rows the DbWriter
//! inserts, or the [`AdminError`] that says what is wrong. Pure (the clock and the
//! random part of a generated id are passed in), so unit tests cover every rule.
//!
//! The rules: the body is JSON without unknown fields; the replication type is
//! `full` or `incremental`; the job id (given or generated) fits the column and a
//! URL path; there is at least one disk and no disk id repeats; every source and
//! target is an NBD URI the engine accepts; an incremental disk has exactly one
//! change source (a dirty bitmap or changed areas), a full disk has none; changed
//! areas parse as the engine parses them and have no empty or overflowing range.
//! A VMware job names a vCenter (a `[vmware.NAME]` section's name) and a VM;
//! its disks name a device key and a target but no source (the daemon serves
//! them), and an incremental one its previous change ID instead of a change
//! source. Lengths match the columns, so the database never refuses what
//! passed here.
//! Whether the job id is taken is the database's to say.

use chrono::{DateTime, Utc};

use super::AdminError;
use super::wire::{DiskRequest, SubmitRequest};
use crate::db::{NewDisk, NewJob};
use crate::engine::Role;
use crate::engine::copy::validate_uri;
use crate::engine::plan;
use crate::state::ReplicationType;

/// Most disks in one job.
const MAX_DISKS: usize = 256;

/// A validated job, ready to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub job: NewJob,
    pub disks: Vec<NewDisk>,
}

/// Parses a request body, telling malformed JSON, unknown fields and other
/// mistakes (a missing field, a wrong type) apart.
pub fn parse(body: &[u8]) -> Result<SubmitRequest, AdminError> {
    parse_json(body)
}

/// Any request body: malformed JSON, unknown fields and wrong shapes each get
/// their own error code.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, AdminError> {
    // Syntax first: serde would otherwise judge `[1, 2` as a struct with a bad field.
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| AdminError::MalformedJson(e.to_string()))?;
    serde_json::from_value(value).map_err(|e| {
        let msg = e.to_string();
        if msg.starts_with("unknown field") { AdminError::UnknownField(msg) } else { AdminError::InvalidRequest(msg) }
    })
}

/// A bandwidth limit in a request body: a string like `"200M"` (see
/// `config::parse_rate`) or a number of bytes/s; bytes/s, 0 = none.
pub fn rate(v: &serde_json::Value) -> Result<u64, AdminError> {
    let text = match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) if n.as_u64().is_some() => n.to_string(),
        v => return Err(AdminError::InvalidRate(format!("{v} is not a rate (e.g. \"200M\", 1048576, 0 for none)"))),
    };
    crate::config::parse_rate(&text).map_err(AdminError::InvalidRate)
}

/// `job-YYYYMMDD-HHMMSS-xxxx`, from the time and 16 random bits.
pub fn generate_id(now: DateTime<Utc>, random: u16) -> String {
    format!("job-{}-{random:04x}", now.format("%Y%m%d-%H%M%S"))
}

/// Checks `req` and turns it into rows; `id` is used when the request has none.
pub fn validate(req: SubmitRequest, id: impl FnOnce() -> String) -> Result<Submission, AdminError> {
    let kind = ReplicationType::parse(&req.replication_type)
        .ok_or_else(|| AdminError::UnknownReplicationType(req.replication_type.clone()))?;
    let id = match given(req.id) {
        Some(id) => {
            let ok =
                id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
            if !ok {
                return Err(AdminError::InvalidJobId(id));
            }
            id
        }
        None => id(),
    };
    if req.vm_name.is_empty() {
        return Err(AdminError::InvalidRequest("vm_name must not be empty".into()));
    }
    check_len("vm_name", &req.vm_name, 255)?;
    let vm_path = given(req.vm_path);
    check_len_opt("vm_path", &vm_path, 1024)?;
    let nbd_export_name = given(req.nbd_export_name);
    check_len_opt("nbd_export_name", &nbd_export_name, 255)?;
    if req.disks.is_empty() {
        return Err(AdminError::NoDisks);
    }
    if req.disks.len() > MAX_DISKS {
        return Err(AdminError::InvalidRequest(format!("a job has at most {MAX_DISKS} disks")));
    }
    let (vmware_vcenter, vmware_vm) = match req.vmware {
        None => (None, None),
        Some(v) => {
            let name_ok = !v.vcenter.is_empty()
                && v.vcenter.len() <= 64
                && v.vcenter.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !name_ok {
                return Err(AdminError::InvalidRequest(format!(
                    "vmware.vcenter '{}' must be a [vmware.NAME] section's name: 1 to 64 letters, digits, '-' or '_'",
                    v.vcenter
                )));
            }
            if v.vm.trim().is_empty() {
                return Err(AdminError::InvalidRequest("vmware.vm must name the VM (inventory path or UUID)".into()));
            }
            check_len("vmware.vm", &v.vm, 1024)?;
            (Some(v.vcenter), Some(v.vm.trim().to_string()))
        }
    };
    let mut disks: Vec<NewDisk> = Vec::with_capacity(req.disks.len());
    for d in req.disks {
        let disk = if vmware_vcenter.is_some() { validate_vmware_disk(d, kind)? } else { validate_disk(d, kind)? };
        if disks.iter().any(|other| other.disk_id == disk.disk_id) {
            return Err(AdminError::DuplicateDisk(disk.disk_id));
        }
        disks.push(disk);
    }
    let job = NewJob {
        id,
        vm_name: req.vm_name,
        vm_path,
        replication_type: kind,
        nbd_export_name,
        vmware_vcenter,
        vmware_vm,
        skip_change_check: req.skip_change_check,
        max_rate: req.max_rate.as_ref().map(rate).transpose()?.filter(|&r| r > 0).map(|r| r as i64),
    };
    Ok(Submission { job, disks })
}

/// A disk of a VMware job: a device key and a target; the source is the
/// daemon's, the changes are vCenter's (an incremental disk names the change
/// ID its target is consistent with).
fn validate_vmware_disk(d: DiskRequest, kind: ReplicationType) -> Result<NewDisk, AdminError> {
    let id = d.disk_id;
    if id.is_empty() {
        return Err(AdminError::InvalidRequest("disk_id must not be empty".into()));
    }
    check_len("disk_id", &id, 64)?;
    let label = given(d.label);
    check_len_opt("label", &label, 255)?;
    let Some(key) = d.vmware_disk_key.filter(|k| *k >= 0) else {
        return Err(AdminError::InvalidRequest(format!("disk '{id}' of a VMware job needs vmware_disk_key")));
    };
    if !d.source.is_empty() {
        return Err(AdminError::InvalidRequest(format!(
            "disk '{id}' of a VMware job has no source: the daemon serves it"
        )));
    }
    validate_uri(Role::Target, &d.target).map_err(|e| AdminError::InvalidUri(format!("disk '{id}': {e}")))?;
    if d.dirty_bitmap.is_some() || d.changed_areas.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(AdminError::UnexpectedChangeSource(id));
    }
    let previous_change_id = given(d.previous_change_id);
    check_len_opt("previous_change_id", &previous_change_id, 255)?;
    if kind == ReplicationType::Incremental && previous_change_id.is_none() {
        return Err(AdminError::InvalidRequest(format!(
            "disk '{id}': an incremental VMware copy needs previous_change_id"
        )));
    }
    Ok(NewDisk {
        disk_id: id,
        label,
        vmware_disk_key: Some(key),
        source_uri: String::new(),
        target_uri: d.target,
        destination_is_zero: d.destination_is_zero,
        keep_allocated: d.keep_allocated,
        previous_change_id,
        ..NewDisk::default()
    })
}

fn validate_disk(d: DiskRequest, kind: ReplicationType) -> Result<NewDisk, AdminError> {
    let id = d.disk_id;
    if id.is_empty() {
        return Err(AdminError::InvalidRequest("disk_id must not be empty".into()));
    }
    check_len("disk_id", &id, 64)?;
    if d.vmware_disk_key.is_some() {
        return Err(AdminError::InvalidRequest(format!("disk '{id}': vmware_disk_key needs a VMware job (vmware)")));
    }
    let label = given(d.label);
    check_len_opt("label", &label, 255)?;
    for (role, uri) in [(Role::Source, &d.source), (Role::Target, &d.target)] {
        validate_uri(role, uri).map_err(|e| AdminError::InvalidUri(format!("disk '{id}': {e}")))?;
    }
    let dirty_bitmap = given(d.dirty_bitmap);
    check_len_opt("dirty_bitmap", &dirty_bitmap, 255)?;
    let changed_areas = match d.changed_areas {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(areas_text(&id, v)?),
    };
    match (kind, &dirty_bitmap, &changed_areas) {
        (ReplicationType::Full, None, None) => {}
        (ReplicationType::Full, _, _) => return Err(AdminError::UnexpectedChangeSource(id)),
        (ReplicationType::Incremental, None, None) => return Err(AdminError::MissingChangeSource(id)),
        (ReplicationType::Incremental, Some(_), Some(_)) => return Err(AdminError::ConflictingChangeSources(id)),
        (ReplicationType::Incremental, _, _) => {}
    }
    let previous_change_id = given(d.previous_change_id);
    check_len_opt("previous_change_id", &previous_change_id, 255)?;
    let change_id = given(d.change_id);
    check_len_opt("change_id", &change_id, 255)?;
    Ok(NewDisk {
        disk_id: id,
        label,
        vmware_disk_key: None,
        source_uri: d.source,
        target_uri: d.target,
        destination_is_zero: d.destination_is_zero,
        keep_allocated: d.keep_allocated,
        dirty_bitmap,
        changed_areas,
        previous_change_id,
        change_id,
    })
}

/// The changed areas as the text stored in `vm_disks.changed_areas`, checked
/// with the engine's own parser (and for empty or overflowing ranges, which the
/// engine would only find when it plans).
fn areas_text(disk: &str, v: serde_json::Value) -> Result<String, AdminError> {
    let bad = |reason: String| AdminError::InvalidChangedAreas { disk: disk.to_string(), reason };
    if !v.is_array() {
        return Err(bad("expected a JSON list of {\"start\", \"length\"} objects".into()));
    }
    let text = v.to_string();
    let areas = plan::parse_areas(&text).map_err(|e| bad(e.to_string()))?;
    plan::normalize_areas(&areas, u64::MAX).map_err(|e| bad(e.to_string()))?;
    Ok(text)
}

/// An optional string, where an empty one means "not given".
fn given(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), AdminError> {
    if value.chars().count() > max {
        return Err(AdminError::InvalidRequest(format!("{field} is longer than {max} characters")));
    }
    Ok(())
}

fn check_len_opt(field: &str, value: &Option<String>, max: usize) -> Result<(), AdminError> {
    value.as_deref().map_or(Ok(()), |v| check_len(field, v, max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(kind: &str, disks: serde_json::Value) -> serde_json::Value {
        json!({"id": "job-1", "vm_name": "vm1", "replication_type": kind, "disks": disks})
    }

    fn disk(extra: serde_json::Value) -> serde_json::Value {
        let mut d = json!({"disk_id": "disk-2000", "source": "nbd+unix:///?socket=/tmp/s.sock",
                           "target": "nbd://10.0.0.1:10809/vol-1"});
        for (k, v) in extra.as_object().unwrap() {
            d[k] = v.clone();
        }
        d
    }

    fn run(v: serde_json::Value) -> Result<Submission, AdminError> {
        validate(parse(v.to_string().as_bytes())?, || "job-generated".into())
    }

    /// Submitting `v` fails with `code`.
    fn check(v: serde_json::Value, code: &str) {
        match run(v.clone()) {
            Ok(s) => panic!("{v} was accepted: {s:?}"),
            Err(e) => assert_eq!(e.code(), code, "{v}: {e}"),
        }
    }

    #[test]
    fn a_full_job_becomes_rows() {
        let s = run(json!({"vm_name": "vm1", "vm_path": "/DC/vm/vm1", "replication_type": "full",
            "nbd_export_name": "migration-vol-1",
            "disks": [disk(json!({"label": "Hard disk 1", "destination_is_zero": true, "dirty_bitmap": null,
                                  "changed_areas": null, "change_id": "52 1/2"}))]}))
        .unwrap();
        assert_eq!(s.job.id, "job-generated");
        assert_eq!(s.job.replication_type, ReplicationType::Full);
        assert_eq!(s.job.nbd_export_name.as_deref(), Some("migration-vol-1"));
        assert_eq!(s.disks.len(), 1);
        let d = &s.disks[0];
        assert_eq!((d.disk_id.as_str(), d.label.as_deref()), ("disk-2000", Some("Hard disk 1")));
        assert!(d.destination_is_zero);
        assert_eq!((d.changed_areas.as_deref(), d.change_id.as_deref()), (None, Some("52 1/2")));
    }

    #[test]
    fn incremental_disks_keep_their_change_source() {
        let s = run(body(
            "incremental",
            json!([
                disk(json!({"changed_areas": [{"start": 0, "length": 4096}, {"start": 8192, "length": 512}]})),
                disk(json!({"disk_id": "disk-2001", "dirty_bitmap": "bitmap0", "changed_areas": null}))
            ]),
        ))
        .unwrap();
        let areas = s.disks[0].changed_areas.as_deref().unwrap();
        assert_eq!(plan::parse_areas(areas).unwrap().len(), 2);
        assert_eq!(s.disks[1].dirty_bitmap.as_deref(), Some("bitmap0"));
        // No changes since last time is a legal, empty incremental copy.
        assert!(run(body("incremental", json!([disk(json!({"changed_areas": []}))]))).is_ok());
    }

    #[test]
    fn a_vmware_job_names_its_vcenter_and_vm_and_its_disks_keys() {
        let vmdisk = |key: i32, extra: serde_json::Value| {
            let mut d = json!({"disk_id": format!("disk-{key}"), "vmware_disk_key": key,
                               "target": "nbd://10.0.0.1:10809/vol-1"});
            for (k, v) in extra.as_object().unwrap() {
                d[k] = v.clone();
            }
            d
        };
        let job = |kind: &str, disks: serde_json::Value| {
            json!({"id": "job-1", "vm_name": "web", "replication_type": kind,
                   "vmware": {"vcenter": "vc1", "vm": "/DC0/vm/web"}, "disks": disks})
        };
        let s = run(job("full", json!([vmdisk(2000, json!({})), vmdisk(2001, json!({}))]))).unwrap();
        assert_eq!((s.job.vmware_vcenter.as_deref(), s.job.vmware_vm.as_deref()), (Some("vc1"), Some("/DC0/vm/web")));
        assert_eq!(s.disks.iter().map(|d| d.vmware_disk_key).collect::<Vec<_>>(), vec![Some(2000), Some(2001)]);
        assert!(s.disks.iter().all(|d| d.source_uri.is_empty()));
        let s = run(job("incremental", json!([vmdisk(2000, json!({"previous_change_id": "52 aa/1"}))]))).unwrap();
        assert_eq!(s.disks[0].previous_change_id.as_deref(), Some("52 aa/1"));

        // Never a silent full copy; no source; no other change source; a key.
        check(job("incremental", json!([vmdisk(2000, json!({}))])), "invalid_request");
        check(job("full", json!([vmdisk(2000, json!({"source": "nbd://s/"}))])), "invalid_request");
        check(job("full", json!([vmdisk(2000, json!({"dirty_bitmap": "b"}))])), "unexpected_change_source");
        check(job("full", json!([{"disk_id": "disk-2000", "target": "nbd://t/"}])), "invalid_request");
        check(job("full", json!([vmdisk(2000, json!({"target": "http://x/"}))])), "invalid_uri");
        let mut bad = job("full", json!([vmdisk(2000, json!({}))]));
        bad["vmware"]["vcenter"] = json!("vc 1");
        check(bad, "invalid_request");
        // A key without a VMware job is a mistake.
        check(body("full", json!([disk(json!({"vmware_disk_key": 2000}))])), "invalid_request");
    }

    #[test]
    fn skip_change_check_is_off_unless_asked_for() {
        let areas = json!([disk(json!({"changed_areas": []}))]);
        assert!(!run(body("incremental", areas.clone())).unwrap().job.skip_change_check);
        let mut v = body("incremental", areas);
        v["skip_change_check"] = json!(true);
        assert!(run(v.clone()).unwrap().job.skip_change_check);
        v["skip_change_check"] = json!("yes");
        check(v, "invalid_request");
    }

    #[test]
    fn bad_bodies_are_told_apart() {
        for (text, code) in [
            ("{", "malformed_json"),
            ("[1, 2", "malformed_json"),
            ("", "malformed_json"),
            ("not json", "malformed_json"),
            (r#"{"vm_name": "v", "replication_type": "full", "disks": [], "extra": 1}"#, "unknown_field"),
            (r#"{"replication_type": "full", "disks": []}"#, "invalid_request"),
            (r#"{"vm_name": 3, "replication_type": "full", "disks": []}"#, "invalid_request"),
            ("[]", "invalid_request"),
        ] {
            assert_eq!(parse(text.as_bytes()).unwrap_err().code(), code, "{text}");
        }
        check(body("full", json!([disk(json!({"colour": "red"}))])), "unknown_field");
    }

    #[test]
    fn every_rule_is_enforced() {
        check(body("differential", json!([disk(json!({}))])), "unknown_replication_type");
        check(body("Full", json!([disk(json!({}))])), "unknown_replication_type");
        check(body("full", json!([])), "no_disks");
        check(body("full", json!([disk(json!({})), disk(json!({}))])), "duplicate_disk");
        check(body("full", json!([disk(json!({"source": "/dev/sda"}))])), "invalid_uri");
        check(body("full", json!([disk(json!({"target": "nbd+unix:///x"}))])), "invalid_uri");
        check(body("full", json!([disk(json!({"target": "http://x/y"}))])), "invalid_uri");
        check(body("full", json!([disk(json!({"dirty_bitmap": "b"}))])), "unexpected_change_source");
        check(body("incremental", json!([disk(json!({}))])), "missing_change_source");
        check(body("incremental", json!([disk(json!({"dirty_bitmap": ""}))])), "missing_change_source");
        check(
            body("incremental", json!([disk(json!({"dirty_bitmap": "b", "changed_areas": []}))])),
            "conflicting_change_sources",
        );
        for areas in [
            json!("[{\"start\":0,\"length\":1}]"),
            json!({"start": 0, "length": 1}),
            json!([{"start": 0}]),
            json!([{"start": -1, "length": 1}]),
            json!([{"start": 0, "length": 1, "extra": 2}]),
            json!([{"start": 0, "length": 0}]),
            json!([{"start": u64::MAX, "length": 2}]),
        ] {
            check(body("incremental", json!([disk(json!({"changed_areas": areas}))])), "invalid_changed_areas");
        }
        let mut v = body("full", json!([disk(json!({}))]));
        for bad in ["job/1", "job 1", "..?", &"x".repeat(65)] {
            v["id"] = json!(bad);
            check(v.clone(), "invalid_job_id");
        }
        v["id"] = json!("job-1");
        v["vm_name"] = json!("");
        check(v.clone(), "invalid_request");
        v["vm_name"] = json!("x".repeat(256));
        check(v.clone(), "invalid_request");
        check(body("full", json!([disk(json!({"disk_id": "d".repeat(65)}))])), "invalid_request");
        check(body("full", json!([disk(json!({"disk_id": ""}))])), "invalid_request");
    }

    #[test]
    fn generated_ids_have_the_documented_shape() {
        let t = DateTime::parse_from_rfc3339("2025-09-05T17:16:11Z").unwrap().with_timezone(&Utc);
        assert_eq!(generate_id(t, 0x3a), "job-20250905-171611-003a");
        let s = run(json!({"vm_name": "v", "replication_type": "full", "id": "", "disks": [disk(json!({}))]})).unwrap();
        assert_eq!(s.job.id, "job-generated", "an empty id is no id");
    }
}
