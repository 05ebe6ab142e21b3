//! The admin socket and the operator's CLI, end to end: a daemon as a child
//! process on a throwaway MariaDB, jobs copied between small nbdkit servers, and
//! every endpoint reached through the `blockrepl` CLI (the product), with `curl
//! --unix-socket` only where the CLI cannot go (raw bodies, unknown routes,
//! `/metrics`). Bad input is checked in the database too: it must change nothing.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;
use crate::mariadb::{TestDb, server};

/// Longest any job here may take.
const JOB_DEADLINE: Duration = Duration::from_secs(60);

fn one(db: &TestDb, sql: &str) -> Option<String> {
    db.column(sql).into_iter().next().flatten()
}

fn job_field(db: &TestDb, id: &str, field: &str) -> Option<String> {
    one(db, &format!("SELECT CAST({field} AS CHAR) AS v FROM replication_jobs WHERE id = '{id}'"))
}

/// Every job row, as `id status vm_name` lines plus the disk count: what bad
/// input must leave alone.
fn snapshot(db: &TestDb) -> Vec<String> {
    db.column(
        "SELECT CONCAT_WS(' ', j.id, j.status, j.vm_name, j.updated_at, (SELECT COUNT(*) FROM vm_disks d WHERE d.job_id = j.id)) AS v
         FROM replication_jobs j ORDER BY j.id",
    )
    .into_iter()
    .flatten()
    .collect()
}

/// A job body for `POST /api/v1/jobs`.
fn job_body(id: &str, disks: &[(&str, String, String)]) -> Value {
    json!({
        "id": id, "vm_name": "vm1", "vm_path": "/DC/vm/vm1", "replication_type": "full",
        "nbd_export_name": format!("migration-vol-{id}"),
        "disks": disks.iter().enumerate().map(|(i, (disk_id, s, t))| json!({
            "disk_id": disk_id, "label": format!("Hard disk {}", i + 1), "source": s, "target": t,
            "destination_is_zero": false, "dirty_bitmap": null, "changed_areas": null,
            "previous_change_id": "52 aa-1/7", "change_id": "52 aa-1/8"
        })).collect::<Vec<_>>()
    })
}

fn write_json(dir: &Path, name: &str, v: &Value) -> String {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec(v).unwrap()).unwrap();
    p.display().to_string()
}

/// A source that copies for a few seconds: `size` of sparse random data served
/// at `rate` (bits per second, nbdkit's rate filter), and an empty target.
fn servers(dir: &Path, name: &str, size: &str, rate: &str) -> (Server, Server) {
    let src = Server::nbdkit(
        dir,
        &format!("{name}-src"),
        &["--filter=rate", "sparse-random", &format!("size={size}"), "seed=7", "percent=50", &format!("rate={rate}")],
    );
    let dst = Server::nbdkit(dir, &format!("{name}-dst"), &["memory", &format!("size={size}")]);
    (src, dst)
}

/// `curl --unix-socket` against the daemon: (HTTP status, body).
fn curl(d: &Daemon, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-X", method, "--unix-socket"]).arg(&d.admin_socket).args([
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        &format!("http://localhost{path}"),
    ]);
    if body.is_some() {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", "@-"]);
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = body.map(<[u8]>::to_vec).unwrap_or_default();
    // curl may stop reading once the daemon answered early (413).
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim().parse().unwrap_or_else(|_| panic!("curl: {text} {}", String::from_utf8_lossy(&out.stderr))),
        body.to_string(),
    )
}

/// The error code of a JSON error body.
fn code_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not a JSON error ({e}): {body}"));
    let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("no message: {body}"));
    assert!(!msg.is_empty());
    v["error"]["code"].as_str().unwrap_or_else(|| panic!("no code: {body}")).to_string()
}

/// The CLI run as another user, through `setpriv`.
fn cli_as(d: &Daemon, setpriv: &[&str], args: &[&str]) -> Run {
    let out = Command::new("setpriv")
        .args(setpriv)
        .arg(bin())
        .args(args)
        .arg("--socket")
        .arg(&d.admin_socket)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Polls `progress --json` until `f` holds.
fn progress_until(d: &Daemon, key: &str, what: &str, mut f: impl FnMut(&Value) -> bool) -> Value {
    let end = Instant::now() + JOB_DEADLINE;
    loop {
        let p = d.cli(&["progress", key, "--json"]).json();
        if f(&p) {
            return p;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}; last progress {p}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks `v` against the progress shape README.md documents: every field there, with its
/// type (byte counts are integers, percentages floats, times RFC 3339 UTC
/// strings with a `Z`); more fields may follow.
fn check_progress_shape(v: &Value) {
    let s = |v: &Value, k: &str| assert!(v[k].is_string(), "{k} is not a string in {v}");
    let t = |v: &Value, k: &str| {
        let x = v[k].as_str().unwrap_or_else(|| panic!("{k} is not a time string in {v}"));
        assert!(x.len() == 20 && x.ends_with('Z') && x.as_bytes()[10] == b'T', "{k} = {x} is not RFC 3339 UTC");
    };
    let u = |v: &Value, k: &str| assert!(v[k].is_u64(), "{k} is not an integer in {v}");
    let f = |v: &Value, k: &str| assert!(v[k].is_f64(), "{k} is not a float in {v}");
    for k in ["job_id", "stage", "status"] {
        s(v, k);
    }
    t(v, "started_at");
    t(v, "updated_at");
    let a = &v["aggregate"];
    for k in ["total_bytes", "bytes_transferred", "throughput_bps"] {
        u(a, k);
    }
    f(a, "percent");
    for k in ["type", "previous_change_id", "change_id"] {
        s(&v["cbt"], k);
    }
    let exports = v["nbd"]["exports"].as_array().unwrap_or_else(|| panic!("no nbd.exports in {v}"));
    assert!(!exports.is_empty());
    for e in exports {
        s(e, "name");
        s(e, "device");
        assert!(e["connected"].is_boolean(), "{e}");
        t(e, "started_at");
    }
    let disks = v["disks"].as_array().unwrap_or_else(|| panic!("no disks in {v}"));
    assert!(!disks.is_empty());
    for d in disks {
        for k in ["id", "label", "status"] {
            s(d, k);
        }
        for k in ["planned_bytes", "bytes_transferred", "throughput_bps"] {
            u(d, k);
        }
        f(d, "percent");
    }
    let words = ["Queued", "Preparing", "Snapshotting", "Streaming", "Finalizing", "Succeeded", "Failed", "Cancelled"];
    assert!(words.contains(&v["status"].as_str().unwrap()), "{}", v["status"]);
}

/// One sample of a Prometheus exposition: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// Checks every line of an OpenMetrics text exposition, and returns the samples.
fn parse_metrics(text: &str) -> Vec<Sample> {
    let is_name = |n: &str| {
        let mut c = n.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
    };
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    let mut eof = None;
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(is_name(name) && rest.len() > name.len() + 1, "bad HELP line: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line: {line}"));
            assert!(is_name(name), "bad metric name in {line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "info", "unknown"].contains(&kind),
                "bad type in {line}"
            );
            assert!(typed.insert(name.to_string()), "{name} typed twice");
            continue;
        }
        if line == "# EOF" {
            assert!(eof.replace(true).is_none(), "a second # EOF");
            continue;
        }
        assert!(eof.is_none(), "a line after # EOF: {line}");
        assert!(!line.starts_with('#'), "unexpected comment: {line}");
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value: {line}"));
        let name = &line[..name_end];
        assert!(is_name(name), "bad metric name in {line}");
        // A counter's samples end in `_total`, an info's in `_info`.
        let family = ["_total", "_info"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        assert!(typed.contains(name) || typed.contains(family), "{name} has no TYPE line before it");
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut r = r;
            loop {
                if let Some(after) = r.strip_prefix('}') {
                    r = after;
                    break;
                }
                let eq = r.find("=\"").unwrap_or_else(|| panic!("bad label in {line}"));
                let key = &r[..eq];
                assert!(is_name(key) && !key.contains(':'), "bad label name '{key}' in {line}");
                let mut value = String::new();
                let mut chars = r[eq + 2..].char_indices();
                let close = loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c @ ('\\' | '"'))) => value.push(c),
                            other => panic!("bad escape {other:?} in {line}"),
                        },
                        Some((i, '"')) => break eq + 2 + i,
                        Some((_, c)) => value.push(c),
                        None => panic!("unterminated label value in {line}"),
                    }
                };
                labels.push((key.to_string(), value));
                r = &r[close + 1..];
                r = r.strip_prefix(',').unwrap_or(r);
            }
            rest = r;
        }
        let mut fields = rest.trim_start_matches(' ').split(' ');
        let value = fields.next().unwrap();
        let value: f64 = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value '{v}' in {line}")),
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().unwrap_or_else(|_| panic!("bad timestamp in {line}"));
        }
        assert!(fields.next().is_none(), "trailing text in {line}");
        samples.push((name.to_string(), labels, value));
    }
    assert_eq!(eof, Some(true), "no # EOF at the end");
    samples
}

fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v)))
        .map(|(_, _, v)| *v)
}

#[test]
fn a_submitted_job_starts_at_once_and_every_read_command_follows_it() {
    let d = tempdir();
    let db = server().fresh_database("admin_submit");
    // About 8 MB/s for 64 MiB at half data: four seconds of copying.
    let (src, dst) = servers(d.path(), "a", "64M", "64M");
    // Only the wake-up from the submission can explain a fast start.
    let daemon = Daemon::start(d.path(), &db.url, &[("BLOCKREPL__DISCOVERY__INTERVAL", "60s")]);

    let h = daemon.cli(&["health", "--json"]).json();
    assert_eq!((h["status"].as_str(), h["database_reachable"].as_bool()), (Some("ok"), Some(true)), "{h}");
    assert_eq!((h["node_id"].as_str(), h["active_jobs"].as_u64()), (Some(daemon.node.as_str()), Some(0)));
    assert_eq!(h["version"].as_str(), Some(env!("CARGO_PKG_VERSION")));
    let human = daemon.cli(&["health"]);
    assert!(human.assert_ok().stdout.contains("database:    reachable"), "{}", human.stdout);
    assert_eq!(daemon.cli(&["jobs"]).assert_ok().stdout.trim(), "no jobs");

    let file = write_json(d.path(), "job.json", &job_body("job-a", &[("disk-2000", src.uri(), dst.uri())]));
    let submitted = Instant::now();
    let r = daemon.cli(&["submit", &file, "--json"]).json();
    assert_eq!(r["job_id"], "job-a");
    wait_until("the job to be claimed", Duration::from_secs(5), || job_field(&db, "job-a", "owner_node").is_some());
    let latency = submitted.elapsed();
    assert!(latency < Duration::from_secs(1), "claimed {latency:?} after the submission");

    // While it runs: the live view, with the documented shape, by id and by export name.
    // (The stage is Discover until the disk's plan, made while copying, is complete.)
    let p = progress_until(&daemon, "job-a", "a connected export, planned", |p| {
        p["status"] == "Streaming" && p["nbd"]["exports"][0]["connected"] == true && p["stage"] == "Transfer"
    });
    check_progress_shape(&p);
    assert_eq!((p["source"].as_str(), p["stage"].as_str()), (Some("live"), Some("Transfer")));
    assert_eq!(p["nbd"]["exports"][0]["name"], "migration-vol-job-a");
    assert_eq!(p["nbd"]["exports"][0]["device"], dst.uri().as_str());
    assert_eq!((p["cbt"]["type"].as_str(), p["cbt"]["change_id"].as_str()), (Some("full"), Some("52 aa-1/8")));
    assert_eq!(p["disks"][0]["label"], "Hard disk 1");
    let by_export = daemon.cli(&["progress", "migration-vol-job-a", "--json"]).json();
    assert_eq!(by_export["job_id"], "job-a");
    assert!(daemon.cli(&["progress", "job-a"]).assert_ok().stdout.starts_with("job-a Streaming (Transfer)"));
    assert_eq!(daemon.cli(&["health", "--json"]).json()["active_jobs"], 1);

    // /metrics while it runs: valid exposition text with the job's and the disk's series.
    let (status, text) = curl(&daemon, "GET", "/metrics", None);
    assert_eq!(status, 200, "{text}");
    let m = parse_metrics(&text);
    assert_eq!(sample(&m, "blockrepl_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0));
    assert_eq!(sample(&m, "blockrepl_database_up", &[]), Some(1.0));
    assert_eq!(sample(&m, "blockrepl_active_jobs", &[]), Some(1.0));
    let counted: f64 = m.iter().filter(|(n, _, _)| n == "blockrepl_jobs").map(|(_, _, v)| v).sum();
    assert_eq!(counted, 1.0, "one job, whatever its row says this instant:\n{text}");
    for name in ["blockrepl_job_planned_bytes", "blockrepl_job_transferred_bytes", "blockrepl_job_retries_total"] {
        assert!(sample(&m, name, &[("job_id", "job-a")]).is_some(), "no {name} in\n{text}");
    }
    let planned = sample(&m, "blockrepl_disk_planned_bytes", &[("job_id", "job-a"), ("disk_id", "disk-2000")]);
    assert!(planned.is_some_and(|p| p > 0.0), "{text}");
    // Rows may not be written yet (the writer batches every 200 ms): the series exist.
    for kind in ["job", "disk", "record"] {
        assert!(sample(&m, "blockrepl_db_writes_total", &[("kind", kind)]).is_some(), "{text}");
    }

    // Watched to the end: plain lines (stdout is not a terminal), exit 0.
    let w = daemon.cli(&["watch", "job-a"]);
    w.assert_ok();
    let lines: Vec<&str> = w.stdout.lines().collect();
    assert!(lines.last().is_some_and(|l| l.starts_with("job-a Succeeded")), "{}", w.stdout);
    assert!(lines.iter().all(|l| l.starts_with("job-a ")), "{}", w.stdout);

    // Finished: from the database now, the same shape.
    let done = daemon.cli(&["progress", "job-a", "--json"]).json();
    assert_eq!((done["status"].as_str(), done["aggregate"]["percent"].as_f64()), (Some("Succeeded"), Some(100.0)));
    assert_eq!(done["aggregate"]["total_bytes"], done["aggregate"]["bytes_transferred"]);
    assert_eq!(done["nbd"]["exports"][0]["connected"], false);
    let w = daemon.cli(&["watch", "migration-vol-job-a", "--json"]).assert_ok().stdout.clone();
    assert_eq!(serde_json::from_str::<Value>(w.trim()).unwrap()["status"], "Succeeded", "one document: {w}");

    let shown = daemon.cli(&["show", "job-a", "--json"]).json();
    assert_eq!((shown["id"].as_str(), shown["status"].as_str()), (Some("job-a"), Some("Succeeded")));
    assert_eq!(shown["disks"][0]["disk_change_id"], "52 aa-1/8");
    assert_eq!(shown["disks"][0]["source"], src.uri().as_str());
    let events = shown["events"].as_array().unwrap();
    assert!(events.iter().any(|e| e["message"] == "Succeeded"), "{shown}");
    let human = daemon.cli(&["show", "job-a"]).assert_ok().stdout.clone();
    assert!(human.contains("disk-2000") && human.contains("recent events"), "{human}");

    for filter in ["Succeeded", "completed"] {
        let l = daemon.cli(&["jobs", "--status", filter, "--json"]).json();
        assert_eq!(l["jobs"].as_array().unwrap().len(), 1, "{filter}: {l}");
    }
    for filter in ["Queued", "pending", "failed"] {
        assert!(daemon.cli(&["jobs", "--status", filter, "--json"]).json()["jobs"].as_array().unwrap().is_empty());
    }
    let table = daemon.cli(&["jobs"]).assert_ok().stdout.clone();
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].starts_with("ID") && rows[0].contains("STATUS"), "{table}");
    assert!(rows[1].starts_with("job-a") && rows[1].contains("Succeeded") && rows[1].contains("100.0%"), "{table}");

    assert!(daemon.cli(&["discover"]).assert_ok().stdout.contains("looking for jobs"));
    assert_eq!(daemon.cli(&["discover", "--json"]).json()["message"], "looking for jobs now");
    let log = daemon.log_text();
    assert!(log.contains("job submitted through the admin socket") && log.contains("uid=0"), "{log}");
}

#[test]
fn cancel_stops_a_running_job_and_watch_exits_non_zero() {
    let d = tempdir();
    let db = server().fresh_database("admin_cancel");
    // About 1 MB/s: it runs until cancelled.
    let (src, dst) = servers(d.path(), "c", "256M", "8M");
    let daemon = Daemon::start(d.path(), &db.url, &[]);
    // Submitted on standard input.
    let mut child = Command::new(bin())
        .args(["submit", "-", "--socket"])
        .arg(&daemon.admin_socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let body = job_body("job-c", &[("disk-1", src.uri(), dst.uri())]);
    child.stdin.take().unwrap().write_all(body.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "submitted job job-c");

    progress_until(&daemon, "job-c", "the transfer", |p| p["status"] == "Streaming");
    let watcher = Command::new(bin())
        .args(["watch", "job-c", "--socket"])
        .arg(&daemon.admin_socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let r = daemon.cli(&["cancel", "job-c"]);
    assert_eq!(r.assert_ok().stdout.trim(), "job-c: cancel requested; the job stops within a second");
    let cancelled = Instant::now();

    let out = watcher.wait_with_output().unwrap();
    let took = cancelled.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "watch of a cancelled job exits non-zero");
    assert_eq!(stderr.trim(), "blockrepl: job 'job-c' was cancelled: cancelled by operator");
    assert!(took < Duration::from_secs(5), "took {took:?} to notice");
    wait_until("the row to say cancelled", Duration::from_secs(5), || {
        job_field(&db, "job-c", "status").as_deref() == Some("cancelled")
    });

    // Finished jobs cannot be cancelled; unknown ones are not found.
    let line = daemon.cli(&["cancel", "job-c"]).error_line();
    assert_eq!(line, "blockrepl: job 'job-c' has already finished as Cancelled (job_finished)");
    let line = daemon.cli(&["cancel", "job-nope"]).error_line();
    assert_eq!(line, "blockrepl: job 'job-nope' not found (not_found)");

    // A job no node runs (it has no disk yet, so nobody claims it) is cancelled in the database.
    db.execute("INSERT INTO replication_jobs (id, vm_name, replication_type, status, nbd_export_name) VALUES ('job-q', 'vm2', 'full', 'pending', 'vol 1/a%b+c')");
    assert_eq!(daemon.cli(&["progress", "job-q", "--json"]).json()["status"], "Queued");
    // Any export name goes through the URL path.
    assert_eq!(daemon.cli(&["progress", "vol 1/a%b+c", "--json"]).json()["job_id"], "job-q");
    let r = daemon.cli(&["cancel", "job-q", "--json"]).json();
    assert_eq!((r["stopping"].as_bool(), r["message"].as_str()), (Some(false), Some("job cancelled")));
    assert_eq!(job_field(&db, "job-q", "status").as_deref(), Some("cancelled"));
    let w = daemon.cli(&["watch", "job-q"]);
    assert_eq!(w.error_line(), "blockrepl: job 'job-q' was cancelled: cancelled by operator");
    assert!(daemon.log_text().contains("job cancelled through the admin socket"));
}

#[test]
fn bad_input_is_refused_with_stable_codes_and_changes_nothing() {
    let d = tempdir();
    let db = server().fresh_database("admin_bad");
    let daemon = Daemon::start(d.path(), &db.url, &[]);
    // An existing job (no disks, so never claimed): a duplicate id must not touch it.
    db.execute("INSERT INTO replication_jobs (id, vm_name, replication_type) VALUES ('job-x', 'original', 'full')");
    let before = snapshot(&db);

    let s = "nbd+unix:///?socket=/tmp/s.sock".to_string();
    let t = "nbd+unix:///?socket=/tmp/t.sock".to_string();
    let good = job_body("job-new", &[("disk-1", s.clone(), t.clone())]);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        v
    };
    let incremental = |disk: Value| {
        with(&|v| {
            v["replication_type"] = json!("incremental");
            for (k, x) in disk.as_object().unwrap() {
                v["disks"][0][k] = x.clone();
            }
        })
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("malformed_json", b"{\"id\": ".to_vec()),
        ("malformed_json", b"".to_vec()),
        ("unknown_field", with(&|v| v["colour"] = json!("red")).to_string().into_bytes()),
        ("unknown_field", with(&|v| v["disks"][0]["size"] = json!(1)).to_string().into_bytes()),
        (
            "invalid_request",
            with(&|v| v.as_object_mut().unwrap().remove("vm_name").map(drop).unwrap()).to_string().into_bytes(),
        ),
        ("unknown_replication_type", with(&|v| v["replication_type"] = json!("differential")).to_string().into_bytes()),
        ("invalid_uri", with(&|v| v["disks"][0]["source"] = json!("/dev/sda")).to_string().into_bytes()),
        ("invalid_uri", with(&|v| v["disks"][0]["target"] = json!("nbd+unix:///export")).to_string().into_bytes()),
        ("no_disks", with(&|v| v["disks"] = json!([])).to_string().into_bytes()),
        ("duplicate_disk", with(&|v| v["disks"] = json!([v["disks"][0], v["disks"][0]])).to_string().into_bytes()),
        ("missing_change_source", incremental(json!({})).to_string().into_bytes()),
        (
            "conflicting_change_sources",
            incremental(json!({"dirty_bitmap": "b0", "changed_areas": [{"start": 0, "length": 4096}]}))
                .to_string()
                .into_bytes(),
        ),
        ("invalid_changed_areas", incremental(json!({"changed_areas": [{"start": 0}]})).to_string().into_bytes()),
        (
            "invalid_changed_areas",
            incremental(json!({"changed_areas": [{"start": 0, "length": 0}]})).to_string().into_bytes(),
        ),
        ("invalid_changed_areas", incremental(json!({"changed_areas": "0-4096"})).to_string().into_bytes()),
        ("unexpected_change_source", with(&|v| v["disks"][0]["dirty_bitmap"] = json!("b0")).to_string().into_bytes()),
        ("invalid_job_id", with(&|v| v["id"] = json!("job/../1")).to_string().into_bytes()),
        ("duplicate_job", with(&|v| v["id"] = json!("job-x")).to_string().into_bytes()),
    ];
    for (i, (code, body)) in cases.iter().enumerate() {
        let p = d.path().join(format!("bad-{i}.json"));
        std::fs::write(&p, body).unwrap();
        let line = daemon.cli(&["submit", p.to_str().unwrap()]).error_line();
        assert!(line.starts_with("blockrepl: ") && line.ends_with(&format!(" ({code})")), "case {i}: {line}");
    }
    // The same answers over plain HTTP, with their statuses.
    let (status, body) = curl(&daemon, "POST", "/api/v1/jobs", Some(b"[1, 2"));
    assert_eq!((status, code_of(&body).as_str()), (400, "malformed_json"));
    let (status, body) =
        curl(&daemon, "POST", "/api/v1/jobs", Some(with(&|v| v["id"] = json!("job-x")).to_string().as_bytes()));
    assert_eq!((status, code_of(&body).as_str()), (409, "duplicate_job"));
    let mut huge = good.to_string().into_bytes();
    huge.resize(17 << 20, b' ');
    let (status, body) = curl(&daemon, "POST", "/api/v1/jobs", Some(&huge));
    assert_eq!((status, code_of(&body).as_str()), (413, "payload_too_large"));
    // The CLI reads the daemon's early answer too, though it is still sending.
    let huge_file = d.path().join("huge.json");
    std::fs::write(&huge_file, &huge).unwrap();
    let line = daemon.cli(&["submit", huge_file.to_str().unwrap()]).error_line();
    assert!(line.ends_with("(payload_too_large)"), "{line}");
    let line = daemon.cli(&["submit", write_json(d.path(), "x", &json!(0)).as_str()]).error_line();
    assert!(line.ends_with("(invalid_request)"), "{line}");
    for (method, path, status_want, code) in [
        ("GET", "/api/v2/health", 404, "unknown_route"),
        ("GET", "/", 404, "unknown_route"),
        ("DELETE", "/api/v1/jobs/job-x", 405, "method_not_allowed"),
        ("GET", "/api/v1/jobs?status=bogus", 400, "invalid_status"),
        ("GET", "/api/v1/jobs?limit=0", 400, "invalid_request"),
        ("GET", "/api/v1/jobs?limit=1&bogus=1", 400, "invalid_request"),
        ("GET", "/api/v1/jobs?colour=red", 400, "invalid_request"),
        ("GET", "/api/v1/jobs/job-nope", 404, "not_found"),
        ("GET", "/api/v1/progress/nope", 404, "not_found"),
        ("POST", "/api/v1/jobs/job-nope/cancel", 404, "not_found"),
    ] {
        let (status, body) = curl(&daemon, method, path, None);
        assert_eq!((status, code_of(&body).as_str()), (status_want, code), "{method} {path}: {body}");
    }
    assert_eq!(daemon.cli(&["show", "x"]).error_line(), "blockrepl: job 'x' not found (not_found)");
    assert_eq!(daemon.cli(&["progress", "x"]).error_line(), "blockrepl: job 'x' not found (not_found)");
    assert_eq!(
        daemon.cli(&["jobs", "--status", "bogus"]).error_line(),
        "blockrepl: unknown job status 'bogus' (invalid_status)"
    );
    let line = daemon.cli(&["submit", "/nonexistent/job.json"]).error_line();
    assert!(line.starts_with("blockrepl: cannot read job file /nonexistent/job.json"), "{line}");

    // Nothing changed, and the daemon still serves.
    assert_eq!(snapshot(&db), before);
    assert_eq!(job_field(&db, "job-x", "vm_name").as_deref(), Some("original"));
    daemon.cli(&["health"]).assert_ok();
    // A valid job is still accepted (its servers do not exist, so it fails, which is not our concern here).
    assert_eq!(daemon.cli(&["submit", &write_json(d.path(), "ok.json", &good), "--json"]).json()["job_id"], "job-new");
    let generated = with(&|v| v.as_object_mut().unwrap().remove("id").map(drop).unwrap());
    let id = daemon.cli(&["submit", &write_json(d.path(), "gen.json", &generated), "--json"]).json()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let shape = id.split('-').map(str::len).collect::<Vec<_>>();
    assert!(id.starts_with("job-") && shape == [3, 8, 6, 4], "generated id {id}");
    assert!(job_field(&db, &id, "vm_name").is_some());
}

#[test]
fn without_the_database_the_api_answers_503_and_health_says_degraded() {
    let d = tempdir();
    let db = server().fresh_database("admin_outage");
    let (proxy, url) = Proxy::for_database(d.path(), &db.url);
    let daemon = Daemon::start(d.path(), &url, &[]);
    daemon.cli(&["health"]).assert_ok();

    proxy.down();
    let h = daemon.cli(&["health"]);
    assert!(h.stdout.contains("database:    UNREACHABLE"), "{}", h.stdout);
    assert_eq!(h.error_line(), "blockrepl: daemon degraded: the database does not answer");
    let line = daemon.cli(&["jobs"]).error_line();
    assert!(
        line.starts_with("blockrepl: database unavailable: ") && line.ends_with("(database_unavailable)"),
        "{line}"
    );
    let file = write_json(d.path(), "job.json", &job_body("job-o", &[("d", "nbd://h/x".into(), "nbd://h/y".into())]));
    assert!(daemon.cli(&["submit", &file]).error_line().ends_with("(database_unavailable)"));
    let (status, body) = curl(&daemon, "GET", "/metrics", None);
    assert_eq!(status, 200);
    assert_eq!(sample(&parse_metrics(&body), "blockrepl_database_up", &[]), Some(0.0));

    proxy.up();
    wait_until("the database to answer again", READY, || daemon.cli(&["health"]).status.success());
    assert!(snapshot(&db).is_empty(), "nothing was submitted during the outage");
}

#[test]
fn only_root_and_the_admin_group_may_use_the_socket() {
    let d = tempdir();
    let db = server().fresh_database("admin_peer");
    let daemon = Daemon::start(d.path(), &db.url, &[]);
    let meta = std::fs::metadata(&daemon.admin_socket).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, 0), "mode 0660, group admin.group (root)");

    // Let other users reach the socket file at all.
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A member of the group (a supplementary group) and the group as primary gid may.
    let member = cli_as(&daemon, &["--reuid=nobody", "--regid=nogroup", "--groups=0"], &["health", "--json"]);
    assert_eq!(member.json()["status"], "ok");
    let primary = cli_as(&daemon, &["--reuid=nobody", "--regid=0", "--clear-groups"], &["jobs"]);
    primary.assert_ok();
    // Anyone else is stopped by the file's mode...
    let outsider = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"];
    let line = cli_as(&daemon, &outsider, &["health"]).error_line();
    assert!(line.contains("permission denied"), "{line}");
    // ...and, when the file is opened to everyone, by the peer credentials.
    std::fs::set_permissions(&daemon.admin_socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let line = cli_as(&daemon, &outsider, &["health"]).error_line();
    assert_eq!(line, "blockrepl: permission denied: uid 65534 is neither root nor in group 'root' (forbidden)");
    let file = write_json(d.path(), "job.json", &job_body("job-p", &[("d", "nbd://h/x".into(), "nbd://h/y".into())]));
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(cli_as(&daemon, &outsider, &["submit", &file]).error_line().ends_with("(forbidden)"));
    assert!(snapshot(&db).is_empty());
    assert!(daemon.log_text().contains("admin request refused"));
    daemon.cli(&["health"]).assert_ok();
}

#[test]
fn a_second_daemon_on_the_same_socket_fails_with_one_line_and_the_first_keeps_serving() {
    let d = tempdir();
    let db = server().fresh_database("admin_second");
    let daemon = Daemon::start(d.path(), &db.url, &[]);
    let mut second = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&daemon.config)
        .env("BLOCKREPL__LOG__LEVEL", "error")
        // Another node id: the socket's lock, not the node's, is what this is about.
        .env("BLOCKREPL__NODE__ID", format!("{}-second", daemon.node))
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_until("the second daemon to give up", READY, || {
        status = second.try_wait().unwrap();
        status.is_some()
    });
    let out = second.wait_with_output().unwrap();
    let run = Run {
        status: status.unwrap(),
        stdout: String::new(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let line = run.error_line();
    let sock = daemon.admin_socket.display();
    assert!(
        line.starts_with(&format!(
            "blockrepl: admin socket {sock} is in use by another blockrepl daemon (pid {})",
            daemon.pid()
        )),
        "{line}"
    );
    daemon.cli(&["health"]).assert_ok();
    assert!(daemon.admin_socket.exists());
}

#[test]
fn the_socket_can_be_named_in_the_environment_and_a_missing_one_is_one_line() {
    let line = blockrepl(&["health", "--socket", "/nonexistent/admin.sock"]).error_line();
    assert_eq!(
        line,
        "blockrepl: cannot reach the blockrepl daemon at /nonexistent/admin.sock: no such socket (is `blockrepl serve` running?)"
    );
    let out = Command::new(bin()).args(["jobs"]).env("BLOCKREPL_SOCKET", "/nonexistent/env.sock").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/env.sock"));
    assert!(!out.status.success());
}

/// Issue 15 item 1: reads apart from writes. Another session holds the job's row
/// locked (as an orchestrator's long transaction would), so the writer's
/// statement waits and its queue stops; yet the admin reads and the health check
/// answer at once, on connections of their own, and `health` shows the writer's
/// backlog apart from whether the database answers. Before, every read waited
/// behind the writer's statement: 503, and health "degraded".
#[test]
fn admin_reads_answer_while_the_writer_waits_and_health_shows_its_backlog() {
    let d = tempdir();
    let db = server().fresh_database("reads_apart");
    let (src, dst) = servers(d.path(), "ra", "128M", "32M");
    // The writer's blocked statement is not cut during the test.
    let daemon = Daemon::start(d.path(), &db.url, &[("BLOCKREPL__DATABASE__TIMEOUT", "60s")]);
    let file = write_json(d.path(), "job.json", &job_body("job-r", &[("disk-1", src.uri(), dst.uri())]));
    daemon.cli(&["submit", &file]).assert_ok();
    wait_until("progress in the database", JOB_DEADLINE, || {
        job_field(&db, "job-r", "progress_percent").and_then(|p| p.parse::<f64>().ok()).unwrap_or(0.0) > 1.0
    });

    let mut blocker = db.connect();
    diesel::connection::SimpleConnection::batch_execute(
        &mut blocker,
        "START TRANSACTION; UPDATE replication_jobs SET vm_name = vm_name WHERE id = 'job-r'",
    )
    .unwrap();
    // The daemon's statement waits for the row lock (the writer is stuck).
    let waiting = format!(
        "SELECT CAST(COUNT(*) AS CHAR) AS v FROM information_schema.processlist
         WHERE db = '{}' AND command IN ('Query', 'Execute') AND time_ms > 1000 AND id <> CONNECTION_ID()",
        db.name
    );
    let writer_waits = || one(&db, &waiting).is_some_and(|n| n != "0");
    wait_until("the writer to wait for the locked row", JOB_DEADLINE, writer_waits);

    for _ in 0..3 {
        let t = Instant::now();
        let h = daemon.cli(&["health", "--json"]).json();
        assert!(t.elapsed() < Duration::from_secs(2), "health took {:?}", t.elapsed());
        assert_eq!(h["database_reachable"], json!(true), "the ping has its own connection: {h}");
        assert!(h["database_backlog"].as_u64().is_some_and(|n| n >= 1), "the backlog is shown: {h}");
        let t = Instant::now();
        let list = daemon.cli(&["jobs", "--json"]).json();
        assert!(list.to_string().contains("job-r"), "{list}");
        daemon.cli(&["show", "job-r", "--json"]).json();
        assert!(t.elapsed() < Duration::from_secs(2), "reads took {:?} behind the writer", t.elapsed());
    }
    assert!(writer_waits(), "the writer was waiting all along");
    let text = daemon.cli(&["health"]);
    assert!(text.stdout.contains("database:    reachable"), "{}", text.stdout);
    assert!(text.stdout.contains("backlog:     "), "{}", text.stdout);

    diesel::connection::SimpleConnection::batch_execute(&mut blocker, "ROLLBACK").unwrap();
    wait_until("the job to complete", JOB_DEADLINE, || {
        job_field(&db, "job-r", "status").as_deref() == Some("completed")
    });
    wait_until("the backlog to drain", READY, || {
        daemon.cli(&["health", "--json"]).json()["database_backlog"] == json!(0)
    });
}

#[test]
fn a_finished_job_shows_its_final_figures_while_its_last_row_waits() {
    let d = tempdir();
    let db = server().fresh_database("last_rows");
    let (src, dst) = servers(d.path(), "lr", "64M", "64M");
    let daemon = Daemon::start(d.path(), &db.url, &[("BLOCKREPL__DATABASE__TIMEOUT", "60s")]);
    let file = write_json(d.path(), "job.json", &job_body("job-l", &[("disk-1", src.uri(), dst.uri())]));
    daemon.cli(&["submit", &file]).assert_ok();
    wait_until("progress in the database", JOB_DEADLINE, || {
        job_field(&db, "job-l", "progress_percent").and_then(|p| p.parse::<f64>().ok()).unwrap_or(0.0) > 1.0
    });

    // The job's row is locked: the copy ends, its last writes wait.
    let mut blocker = db.connect();
    diesel::connection::SimpleConnection::batch_execute(
        &mut blocker,
        "START TRANSACTION; UPDATE replication_jobs SET vm_name = vm_name WHERE id = 'job-l'",
    )
    .unwrap();
    let done = |p: &Value| p["status"] == "Succeeded" && p["aggregate"]["percent"].as_f64() == Some(100.0);
    let mut shown = 0.0;
    progress_until(&daemon, "job-l", "the copy to end", |p| {
        let pct = p["aggregate"]["percent"].as_f64().unwrap_or(0.0);
        assert!(pct >= shown, "the percentage went down from {shown}: {p}");
        shown = pct;
        done(p)
    });
    let stale = job_field(&db, "job-l", "status").unwrap_or_default();
    assert_ne!(stale, "completed", "the row's last write waits behind the lock");

    // However long the row waits, the job shows what it finished with, not the
    // row as it was (a job that would seem to go back).
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let p = daemon.cli(&["progress", "job-l", "--json"]).json();
        assert!(done(&p), "the finished job shows its final figures: {p}");
    }
    assert_eq!(job_field(&db, "job-l", "status"), Some(stale), "the row waited all along");

    diesel::connection::SimpleConnection::batch_execute(&mut blocker, "ROLLBACK").unwrap();
    wait_until("the row to complete", JOB_DEADLINE, || {
        job_field(&db, "job-l", "status").as_deref() == Some("completed")
    });
    let p = daemon.cli(&["progress", "job-l", "--json"]).json();
    assert!(done(&p), "and the row shows the same: {p}");
    assert_eq!(job_field(&db, "job-l", "progress_percent").and_then(|p| p.parse::<f64>().ok()), Some(100.0));
}
