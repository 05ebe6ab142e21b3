//! `docs/orchestrator.md` runs as written: every fenced `sql` block, in order,
//! through the `mariadb` command-line client (as an orchestrator's operator
//! would run it) against a private MariaDB with the daemon running. A `sql`
//! block followed by a `text` block is polled until its result is that table.
//! The example's NBD addresses are replaced by servers of ours: two snapshots
//! of a disk (files) and a target volume (a file), whose bytes are compared at
//! the end.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::mariadb::{TestDb, server};

const DOC: &str = include_str!("../../docs/orchestrator.md");

/// One fenced `sql` block and, when a `text` block follows it, the table its
/// result must become (header first).
#[derive(Debug)]
struct Block {
    sql: String,
    expect: Option<Vec<Vec<String>>>,
}

/// The fenced blocks of `doc` in order: `(language, text)`.
fn fences(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in doc.lines() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(lang)) => open = Some((lang.trim().to_string(), String::new())),
            (Some(_), Some("")) => out.extend(open.take()),
            (Some((_, text)), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, None) if !line.trim().is_empty() => out.push((String::new(), String::new())),
            (None, None) => {}
        }
    }
    out
}

/// The document's `sql` blocks; prose between two blocks is an empty fence,
/// so a `text` block counts only when it directly follows a `sql` block.
fn blocks(doc: &str) -> Vec<Block> {
    let f = fences(doc);
    let mut out = Vec::new();
    for (i, (lang, text)) in f.iter().enumerate() {
        if lang != "sql" {
            continue;
        }
        let expect = f
            .get(i + 1)
            .filter(|(l, _)| l == "text")
            .map(|(_, t)| t.lines().map(|l| l.split('|').map(|c| c.trim().to_string()).collect()).collect());
        out.push(Block { sql: text.clone(), expect });
    }
    out
}

/// Runs `sql` with the `mariadb` client in batch mode; returns its rows
/// (header first), or the client's error.
fn client(db: &TestDb, sql: &str) -> Result<Vec<Vec<String>>, String> {
    let url = url::Url::parse(&db.url).unwrap();
    let mut cmd = Command::new("mariadb");
    cmd.arg("--batch").arg("--raw").arg(format!("--user={}", url.username()));
    if let Some(pw) = url.password() {
        cmd.arg(format!("--password={}", percent_encoding::percent_decode_str(pw).decode_utf8_lossy()));
    }
    match url.query_pairs().find(|(k, _)| k == "unix_socket") {
        Some((_, socket)) => cmd.arg("--protocol=socket").arg(format!("--socket={socket}")),
        None => {
            cmd.arg(format!("--host={}", url.host_str().unwrap())).arg(format!("--port={}", url.port().unwrap_or(3306)))
        }
    };
    cmd.arg(format!("--database={}", db.name));
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(sql.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(|l| l.split('\t').map(str::to_string).collect()).collect())
}

/// An 8 MiB disk with data everywhere (no byte is zero).
fn disk_image(path: &Path) -> Vec<u8> {
    let bytes: Vec<u8> = (0..8u32 << 20).map(|i| (i / 4096) as u8 | 1).collect();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

#[test]
fn the_orchestrator_document_runs_as_written() {
    let d = tempdir();
    // Snapshot 1 of the disk, and snapshot 2 with changes in exactly the areas
    // the document's incremental job names.
    let snap1 = d.path().join("snap1.img");
    let snap2 = d.path().join("snap2.img");
    let mut bytes = disk_image(&snap1);
    bytes[1 << 20..(1 << 20) + 65536].fill(0x42);
    bytes[4 << 20..(4 << 20) + 4096].fill(0x43);
    std::fs::write(&snap2, &bytes).unwrap();
    // The target: a fresh volume, reading as zeros.
    let target = d.path().join("target.img");
    std::fs::File::create(&target).unwrap().set_len(8 << 20).unwrap();

    let file = |p: &Path| format!("file={}", p.display());
    let s1 = Server::nbdkit(d.path(), "snap1", &["-r", "file", &file(&snap1)]);
    let s2 = Server::nbdkit(d.path(), "snap2", &["-r", "file", &file(&snap2)]);
    let t = Server::nbdkit(d.path(), "target", &["file", &file(&target)]);
    let ours = [
        ("nbd+unix:///?socket=/run/migration/vm1-disk-2000-snap1.sock", s1.uri()),
        ("nbd+unix:///?socket=/run/migration/vm1-disk-2000-snap2.sock", s2.uri()),
        ("nbd://cloud-target.example:10809/migration-vol-7", t.uri()),
    ];

    let db = server().fresh_database("orchestrator_doc");
    let daemon = Daemon::start(d.path(), &db.url, &[]);
    let all = blocks(DOC);
    assert!(all.len() >= 8, "{all:?}");
    assert!(all.iter().filter(|b| b.expect.is_some()).count() >= 6);
    for (placeholder, _) in &ours {
        assert!(DOC.contains(placeholder), "the document no longer names {placeholder}");
    }

    for (n, block) in all.iter().enumerate() {
        let mut sql = block.sql.clone();
        for (placeholder, uri) in &ours {
            sql = sql.replace(placeholder, uri);
        }
        let Some(expect) = &block.expect else {
            client(&db, &sql).unwrap_or_else(|e| panic!("block {n} failed: {e}\n{sql}"));
            continue;
        };
        let end = Instant::now() + testkit::jobs::JOB_DEADLINE;
        loop {
            let got = client(&db, &sql).unwrap_or_else(|e| panic!("block {n} failed: {e}\n{sql}"));
            if &got == expect {
                break;
            }
            let failed = got.iter().flatten().any(|c| c == "failed") && !expect.iter().flatten().any(|c| c == "failed");
            assert!(
                !failed && Instant::now() < end,
                "block {n} returned {got:?}, the document expects {expect:?}\n{sql}\n{}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // The target now holds snapshot 2, byte for byte.
    assert!(std::fs::read(&target).unwrap() == bytes, "the target differs from the source's snapshot 2");
}

#[test]
fn the_readme_links_the_document_and_no_document_names_a_missing_one() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains("(docs/orchestrator.md)"), "README.md does not link docs/orchestrator.md");

    // Every markdown file named in the documents and the sources is a file here.
    let mut present = std::collections::BTreeSet::new();
    let mut texts = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                if !name.starts_with('.') && name != "target" {
                    stack.push(p);
                }
            } else {
                if name.ends_with(".md") {
                    present.insert(name.clone());
                }
                if name.ends_with(".md") || name.ends_with(".rs") || name.ends_with(".toml") {
                    texts.push(p);
                }
            }
        }
    }
    let mut missing = Vec::new();
    for p in &texts {
        let text = std::fs::read_to_string(p).unwrap();
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')) {
            let word = word.trim_end_matches('.');
            if let Some(stem) = word.strip_suffix(".md")
                && !stem.is_empty()
                && !present.contains(word.rsplit('/').next().unwrap())
            {
                missing.push(format!("{}: {word}", p.strip_prefix(root).unwrap().display()));
            }
        }
    }
    assert!(missing.is_empty(), "documents that are not in the repository: {missing:?}");
}
