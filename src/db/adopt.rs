//! Adopting a database: `schema.sql` read as data ([`Schema`]), and the pure
//! decisions of bringing an existing database to it ([`plan`]): which tables,
//! columns and keys are missing, and whether a column that exists has a type
//! blockrepl can work with ([`compatible`]).
//!
//! An existing database may be empty, made by a DBA from `schema.sql`, or hold
//! the tables of the older system blockrepl replaces, with the orchestrator's
//! own columns and rows. Adoption only adds (tables, columns, indexes and
//! unique keys), except that it drops keys earlier blockrepl versions made
//! under names of their own and retired ([`RETIRED_KEYS`]); it never drops,
//! renames, retypes or rewrites anything else, and it
//! adds no foreign key to a table it did not create (a cascade would change
//! what the orchestrator's own DELETEs do). A column whose type conflicts with
//! ours refuses the whole plan before anything is changed.
//!
//! Reading the live schema and applying the plan is `migrate`'s; this module
//! does no I/O, so every rule here has a unit test without a server.

use std::collections::BTreeMap;

/// `schema.sql`, compiled in: the one description of the tables.
pub const SCHEMA_SQL: &str = include_str!("../../schema.sql");

/// The tables of `schema.sql`, in file order (referenced tables first).
#[derive(Debug, Clone, PartialEq)]
pub struct Schema {
    pub tables: Vec<Table>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub name: String,
    /// The whole `CREATE TABLE` statement, as written in `schema.sql`.
    pub create: String,
    pub columns: Vec<Column>,
    pub keys: Vec<Key>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    /// The definition after the name, e.g. `BIGINT NOT NULL DEFAULT 0`.
    pub definition: String,
    /// The type as `schema.sql` spells it, e.g. `VARCHAR(64)`.
    pub sql_type: String,
    pub not_null: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    /// `PRIMARY` for the primary key.
    pub name: String,
    pub kind: KeyKind,
    /// The column names, without prefix lengths.
    pub columns: Vec<String>,
    /// The definition as `ALTER TABLE ... ADD` takes it, e.g. `KEY idx (a, b(50))`.
    pub definition: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Primary,
    Index,
    Unique,
    Foreign,
}

impl Schema {
    /// The compiled-in `schema.sql`.
    pub fn ours() -> Schema {
        Schema::parse(SCHEMA_SQL)
    }

    /// Reads `CREATE TABLE` statements written one column or key a line, as
    /// `schema.sql` is (a unit test holds it to that).
    pub fn parse(text: &str) -> Schema {
        let without_comments: String = text
            .lines()
            .map(|l| l.split_once("--").map_or(l, |(code, _)| code).trim_end())
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        let tables = without_comments
            .split(';')
            .map(str::trim)
            .filter(|s| s.starts_with("CREATE TABLE "))
            .map(parse_table)
            .collect();
        Schema { tables }
    }

    #[cfg(test)]
    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.name == name)
    }
}

fn parse_table(statement: &str) -> Table {
    let mut lines = statement.lines();
    let head = lines.next().unwrap_or_default();
    let name = head.trim_start_matches("CREATE TABLE ").trim_end_matches('(').trim().to_string();
    let mut columns = Vec::new();
    let mut keys = Vec::new();
    for line in lines {
        let item = line.trim().trim_end_matches(',');
        if item.starts_with(')') {
            break;
        }
        if let Some(key) = parse_key(item) {
            keys.push(key);
            continue;
        }
        let (col, definition) = item.split_once(char::is_whitespace).unwrap_or((item, ""));
        let definition = definition.trim().to_string();
        let sql_type = definition.split_whitespace().next().unwrap_or_default().to_string();
        let not_null = definition.contains("NOT NULL");
        columns.push(Column { name: col.to_string(), definition, sql_type, not_null });
    }
    Table { name, create: statement.to_string(), columns, keys }
}

fn parse_key(item: &str) -> Option<Key> {
    let (kind, rest) = if let Some(rest) = item.strip_prefix("PRIMARY KEY ") {
        (KeyKind::Primary, format!("PRIMARY {rest}"))
    } else if let Some(rest) = item.strip_prefix("UNIQUE KEY ") {
        (KeyKind::Unique, rest.to_string())
    } else if let Some(rest) = item.strip_prefix("KEY ") {
        (KeyKind::Index, rest.to_string())
    } else if let Some(rest) = item.strip_prefix("CONSTRAINT ") {
        (KeyKind::Foreign, rest.to_string())
    } else {
        return None;
    };
    let name = rest.split_whitespace().next().unwrap_or_default().to_string();
    let open = rest.find('(')?;
    // `b(50)` has its own parentheses: take the list up to the matching one.
    let mut depth = 0;
    let mut end = rest.len();
    for (i, c) in rest[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        if depth == 0 {
            end = open + i;
            break;
        }
    }
    let columns = rest[open + 1..end]
        .split(',')
        .map(|c| c.trim().split('(').next().unwrap_or_default().trim().to_string())
        .collect();
    let name = if kind == KeyKind::Primary { "PRIMARY".to_string() } else { name };
    Some(Key { name, kind, columns, definition: item.to_string() })
}

/// A column as `information_schema.COLUMNS` describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// `DATA_TYPE`, lower case, e.g. `varchar`.
    pub data_type: String,
    /// `COLUMN_TYPE`, e.g. `bigint(20) unsigned`: what a message shows.
    pub column_type: String,
    /// `CHARACTER_MAXIMUM_LENGTH` (strings).
    pub max_length: Option<u64>,
    /// `NUMERIC_PRECISION` and `NUMERIC_SCALE` (decimals).
    pub precision: Option<u64>,
    pub scale: Option<u64>,
    pub nullable: bool,
}

/// How an existing column compares with ours.
#[derive(Debug, Clone, PartialEq)]
pub enum Fit {
    /// Our reads and writes work unchanged.
    Same,
    /// They work, with a difference the log names (values rounded, or a
    /// shorter string that a long value would not fit).
    Compatible(String),
    /// They would not work: the daemon refuses to start.
    Conflict,
}

const INTEGERS: [&str; 5] = ["tinyint", "smallint", "mediumint", "int", "bigint"];
const STRINGS: [&str; 6] = ["char", "varchar", "tinytext", "text", "mediumtext", "longtext"];

/// How many characters a string column of `found` holds.
fn capacity(found: &Found) -> Option<u64> {
    match found.data_type.as_str() {
        "json" => Some(u64::from(u32::MAX)),
        "tinytext" => Some(255),
        "text" => Some(65_535),
        "mediumtext" => Some(16_777_215),
        "longtext" => Some(u64::from(u32::MAX)),
        _ => found.max_length,
    }
}

/// Whether blockrepl can work with `found` where `schema.sql` says `expected`
/// (its type word, e.g. `DECIMAL(5,2)`). The rules, and why:
/// - `BIGINT` (bytes, offsets) needs a BIGINT: anything narrower overflows at
///   2 GiB.
/// - `INT` (attempt numbers, device keys) takes INT or BIGINT.
/// - `DOUBLE` (durations) takes any number; an integer column stores the
///   value rounded to whole units (the older system's `sync_duration_seconds INT`).
/// - `DECIMAL(p,s)` (percentages) takes a DECIMAL with at least as many integer
///   digits, a DOUBLE or a FLOAT (reads and writes go through numbers).
/// - `BOOLEAN` takes any integer or BIT column (non-zero is true).
/// - strings take any string column (`VARCHAR`, `CHAR`, the `TEXT`s, JSON
///   for LONGTEXT); a shorter one is accepted and named in the log.
/// - `DATETIME(n)` takes DATETIME or TIMESTAMP of any precision (the session
///   is UTC, so both store the same instant).
pub fn compatible(expected: &str, found: &Found) -> Fit {
    let t = found.data_type.as_str();
    let upper = expected.to_ascii_uppercase();
    let base = upper.split('(').next().unwrap_or_default();
    let args: Vec<u64> = upper
        .split_once('(')
        .map(|(_, a)| a.trim_end_matches(')').split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_default();
    let numeric = INTEGERS.contains(&t) || ["decimal", "double", "float"].contains(&t);
    match base {
        "BIGINT" if t == "bigint" => Fit::Same,
        "INT" if t == "int" => Fit::Same,
        "INT" if t == "bigint" => Fit::Compatible(format!("{} instead of INT", found.column_type)),
        "DOUBLE" if t == "double" => Fit::Same,
        "DOUBLE" if numeric => Fit::Compatible(format!("{} stores durations rounded", found.column_type)),
        "DECIMAL" => {
            let (p, s) = (args.first().copied().unwrap_or(10), args.get(1).copied().unwrap_or(0));
            match t {
                "decimal" => {
                    let (fp, fs) = (found.precision.unwrap_or(10), found.scale.unwrap_or(0));
                    if fp.saturating_sub(fs) < p - s {
                        Fit::Conflict
                    } else if (fp, fs) == (p, s) {
                        Fit::Same
                    } else {
                        Fit::Compatible(format!("{} instead of {upper}", found.column_type))
                    }
                }
                "double" | "float" => Fit::Compatible(format!("{} instead of {upper}", found.column_type)),
                _ => Fit::Conflict,
            }
        }
        "BOOLEAN" | "BOOL" if INTEGERS.contains(&t) || t == "bit" => {
            if found.column_type == "tinyint(1)" {
                Fit::Same
            } else {
                Fit::Compatible(format!("{} holds a flag", found.column_type))
            }
        }
        "VARCHAR" | "TEXT" | "LONGTEXT" if STRINGS.contains(&t) || (base == "LONGTEXT" && t == "json") => {
            let needed = match base {
                "VARCHAR" => args.first().copied().unwrap_or(255),
                "TEXT" => 65_535,
                _ => u64::from(u32::MAX),
            };
            let have = capacity(found).unwrap_or(0);
            if have >= needed {
                if found.column_type.eq_ignore_ascii_case(expected) {
                    Fit::Same
                } else {
                    Fit::Compatible(String::new())
                }
            } else {
                Fit::Compatible(format!("{} is shorter than {upper}: longer values are refused", found.column_type))
            }
        }
        "DATETIME" if t == "datetime" || t == "timestamp" => {
            if found.column_type.eq_ignore_ascii_case(expected) {
                Fit::Same
            } else {
                Fit::Compatible(format!("{} instead of {upper}", found.column_type))
            }
        }
        _ => Fit::Conflict,
    }
}

/// The live database, as far as adoption needs to know it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Live {
    /// Table → column → what it is.
    pub columns: BTreeMap<String, BTreeMap<String, Found>>,
    /// Table → the names of its indexes (`PRIMARY` for the primary key).
    pub indexes: BTreeMap<String, Vec<String>>,
}

/// Facts about the rows that only the database can answer; asked only for what
/// [`plan`] needs.
pub trait Rows {
    /// How many rows of `table` hold NULL in `column`.
    fn nulls(&mut self, table: &str, column: &str) -> u64;
    /// Whether two rows of `table` share the values of `columns` (all existing).
    /// With no columns: whether the table has two rows at all.
    fn duplicates(&mut self, table: &str, columns: &[String]) -> bool;
}

/// One schema change, a single DDL statement.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub sql: String,
    /// What it does, for the log: e.g. `added column vm_disks.source_uri`.
    pub what: String,
}

/// What adopting the database takes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Differences accepted, and keys not added, for the log.
    pub notes: Vec<String>,
}

/// A column that blockrepl cannot work with.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    pub table: String,
    pub column: String,
    pub found: String,
    pub expected: String,
}

/// Keys that earlier versions of blockrepl created under these names and that
/// no longer hold: dropped where found (after the keys that replace them are
/// added). Only blockrepl's own names are listed; nothing else is ever dropped.
pub const RETIRED_KEYS: [(&str, &str, &str); 1] =
    [("cbt_history", "uq_cbt_job_disk", "one row per job and disk; history keeps one per attempt now")];

/// The changes that bring `live` to `schema`, or every conflict (then nothing
/// may be changed).
pub fn plan(schema: &Schema, live: &Live, rows: &mut dyn Rows) -> Result<Plan, Vec<Conflict>> {
    let mut out = Plan::default();
    let mut conflicts = Vec::new();
    for table in &schema.tables {
        let Some(existing) = live.columns.get(&table.name) else {
            out.steps.push(Step { sql: table.create.clone(), what: format!("created table {}", table.name) });
            continue;
        };
        for col in &table.columns {
            let conflict = |found: String| Conflict {
                table: table.name.clone(),
                column: col.name.clone(),
                found,
                expected: col.sql_type.clone(),
            };
            let Some(found) = existing.get(&col.name) else {
                if col.definition.contains("AUTO_INCREMENT") {
                    // Its own key, over rows that have none: not ours to invent.
                    conflicts.push(conflict("no such column".into()));
                } else {
                    out.steps.push(Step {
                        sql: format!("ALTER TABLE {} ADD COLUMN {} {}", table.name, col.name, col.definition),
                        what: format!("added column {}.{}", table.name, col.name),
                    });
                }
                continue;
            };
            match compatible(&col.sql_type, found) {
                Fit::Conflict => conflicts.push(conflict(found.column_type.clone())),
                Fit::Compatible(why) if !why.is_empty() => {
                    out.notes.push(format!("column {}.{}: {why}", table.name, col.name))
                }
                _ => {}
            }
            if col.not_null && found.nullable {
                // Accepted, unless a row holds a NULL the daemon cannot read.
                let n = rows.nulls(&table.name, &col.name);
                if n > 0 {
                    conflicts.push(conflict(format!("{} NULL with NULL in {n} rows", found.column_type)));
                }
            }
        }
        let have = live.indexes.get(&table.name).cloned().unwrap_or_default();
        for key in &table.keys {
            if have.contains(&key.name) {
                continue;
            }
            match key.kind {
                // The primary key comes with the AUTO_INCREMENT column (above);
                // a foreign key is never added to a table that is not ours.
                KeyKind::Primary | KeyKind::Foreign => {}
                KeyKind::Index => out.steps.push(Step {
                    sql: format!("ALTER TABLE {} ADD {}", table.name, key.definition),
                    what: format!("added index {}.{}", table.name, key.name),
                }),
                KeyKind::Unique => {
                    let present: Vec<String> =
                        key.columns.iter().filter(|c| existing.contains_key(*c)).cloned().collect();
                    if rows.duplicates(&table.name, &present) {
                        out.notes.push(format!(
                            "unique key {}.{} ({}) not added: existing rows share its values",
                            table.name,
                            key.name,
                            key.columns.join(", ")
                        ));
                    } else {
                        out.steps.push(Step {
                            sql: format!("ALTER TABLE {} ADD {}", table.name, key.definition),
                            what: format!("added unique key {}.{}", table.name, key.name),
                        });
                    }
                }
            }
        }
        for (_, name, why) in RETIRED_KEYS.iter().filter(|(t, ..)| *t == table.name) {
            if have.iter().any(|h| h == name) {
                out.steps.push(Step {
                    sql: format!("ALTER TABLE {} DROP INDEX {name}", table.name),
                    what: format!("dropped blockrepl's retired key {}.{name} ({why})", table.name),
                });
            }
        }
    }
    if conflicts.is_empty() { Ok(out) } else { Err(conflicts) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(data_type: &str, column_type: &str) -> Found {
        let max_length = column_type
            .split_once('(')
            .and_then(|(_, n)| n.trim_end_matches(')').parse().ok())
            .filter(|_| data_type.contains("char"));
        let (precision, scale) = if data_type == "decimal" {
            let a: Vec<u64> = column_type
                .trim_start_matches("decimal(")
                .trim_end_matches(')')
                .split(',')
                .map(|n| n.parse().unwrap())
                .collect();
            (Some(a[0]), Some(a[1]))
        } else {
            (None, None)
        };
        Found {
            data_type: data_type.into(),
            column_type: column_type.into(),
            max_length,
            precision,
            scale,
            nullable: false,
        }
    }

    fn check(expected: &str, data_type: &str, column_type: &str, want: &str) {
        let got = match compatible(expected, &found(data_type, column_type)) {
            Fit::Same => "same",
            Fit::Compatible(_) => "compatible",
            Fit::Conflict => "conflict",
        };
        assert_eq!(got, want, "{column_type} for {expected}");
    }

    #[test]
    fn compatible_types() {
        check("BIGINT", "bigint", "bigint(20)", "same");
        check("BIGINT", "bigint", "bigint(20) unsigned", "same");
        check("BIGINT", "int", "int(11)", "conflict");
        check("BIGINT", "varchar", "varchar(32)", "conflict");
        check("DOUBLE", "double", "double", "same");
        check("DOUBLE", "int", "int(11)", "compatible");
        check("DOUBLE", "varchar", "varchar(8)", "conflict");
        check("DECIMAL(5,2)", "decimal", "decimal(5,2)", "same");
        check("DECIMAL(5,2)", "decimal", "decimal(6,3)", "compatible");
        check("DECIMAL(5,2)", "decimal", "decimal(4,2)", "conflict");
        check("DECIMAL(5,2)", "double", "double", "compatible");
        check("DECIMAL(5,2)", "datetime", "datetime", "conflict");
        check("BOOLEAN", "tinyint", "tinyint(1)", "same");
        check("BOOLEAN", "int", "int(11)", "compatible");
        check("BOOLEAN", "varchar", "varchar(5)", "conflict");
        check("VARCHAR(64)", "varchar", "varchar(64)", "same");
        check("VARCHAR(64)", "varchar", "varchar(191)", "compatible");
        check("VARCHAR(64)", "varchar", "varchar(36)", "compatible");
        check("VARCHAR(64)", "longtext", "longtext", "compatible");
        check("VARCHAR(64)", "bigint", "bigint(20)", "conflict");
        check("TEXT", "text", "text", "same");
        check("LONGTEXT", "json", "json", "compatible");
        check("DATETIME(6)", "datetime", "datetime(6)", "same");
        check("DATETIME(6)", "timestamp", "timestamp", "compatible");
        check("DATETIME(6)", "varchar", "varchar(32)", "conflict");
    }

    #[test]
    fn schema_sql_parses_into_every_table_column_and_key() {
        let s = Schema::ours();
        let names: Vec<&str> = s.tables.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["replication_jobs", "vm_disks", "cbt_history", "job_events"]);
        let jobs = s.table("replication_jobs").unwrap();
        // Every column line of the statement is a column, nothing else is.
        let column_lines = jobs
            .create
            .lines()
            .skip(1)
            .filter(|l| {
                let w = l.trim();
                !w.starts_with(')') && !["PRIMARY", "KEY", "UNIQUE", "CONSTRAINT"].iter().any(|k| w.starts_with(k))
            })
            .count();
        assert_eq!(jobs.columns.len(), column_lines);
        let id = &jobs.columns[0];
        assert_eq!((id.name.as_str(), id.sql_type.as_str(), id.not_null), ("id", "VARCHAR(64)", true));
        let export = jobs.keys.iter().find(|k| k.name == "idx_jobs_status_export").unwrap();
        assert_eq!(export.columns, ["status", "nbd_export_name"]);
        assert_eq!(export.definition, "KEY idx_jobs_status_export (status, nbd_export_name(50))");
        let disks = s.table("vm_disks").unwrap();
        let kinds: Vec<(&str, KeyKind)> = disks.keys.iter().map(|k| (k.name.as_str(), k.kind)).collect();
        assert_eq!(
            kinds,
            [("PRIMARY", KeyKind::Primary), ("uq_disks_job_disk", KeyKind::Unique), ("fk_disks_job", KeyKind::Foreign)]
        );
        assert_eq!(disks.keys[1].columns, ["job_id", "disk_id"]);
    }

    struct FakeRows {
        nulls: u64,
        duplicates: bool,
    }
    impl Rows for FakeRows {
        fn nulls(&mut self, _: &str, _: &str) -> u64 {
            self.nulls
        }
        fn duplicates(&mut self, _: &str, _: &[String]) -> bool {
            self.duplicates
        }
    }

    /// A table: its name, its columns (name, data type, column type, nullable)
    /// and its index names.
    type LiveTable<'a> = (&'a str, &'a [(&'a str, &'a str, &'a str, bool)], &'a [&'a str]);

    /// The live database made of `tables`.
    fn live_of(tables: &[LiveTable]) -> Live {
        let mut live = Live::default();
        for (table, cols, idx) in tables {
            let mut m = BTreeMap::new();
            for (c, dt, ct, nullable) in cols.iter() {
                m.insert(c.to_string(), Found { nullable: *nullable, ..found(dt, ct) });
            }
            live.columns.insert(table.to_string(), m);
            live.indexes.insert(table.to_string(), idx.iter().map(|s| s.to_string()).collect());
        }
        live
    }

    const SMALL: &str = "CREATE TABLE a (\n    id BIGINT NOT NULL AUTO_INCREMENT,\n    \
        name VARCHAR(64) NOT NULL,\n    n BIGINT NOT NULL DEFAULT 0,\n    PRIMARY KEY (id),\n    \
        UNIQUE KEY uq_a (name),\n    KEY idx_n (n),\n    CONSTRAINT fk_a FOREIGN KEY (n) REFERENCES b (id)\n) ENGINE=InnoDB;\n\
        CREATE TABLE b (\n    id BIGINT NOT NULL,\n    PRIMARY KEY (id)\n);";

    #[test]
    fn a_plan_adds_only_what_is_missing() {
        let schema = Schema::parse(SMALL);
        let mut rows = FakeRows { nulls: 0, duplicates: false };
        // Empty: both tables, as written.
        let p = plan(&schema, &Live::default(), &mut rows).unwrap();
        assert_eq!(p.steps.len(), 2);
        assert!(p.steps[0].sql.starts_with("CREATE TABLE a (") && p.steps[1].sql.starts_with("CREATE TABLE b ("));

        // Table a of another system: its own column stays, ours are added, no foreign key.
        let live = live_of(&[
            ("a", &[("id", "bigint", "bigint(20)", false), ("theirs", "varchar", "varchar(9)", true)], &["PRIMARY"]),
            ("b", &[("id", "bigint", "bigint(20)", false)], &["PRIMARY"]),
        ]);
        let p = plan(&schema, &live, &mut rows).unwrap();
        let sql: Vec<&str> = p.steps.iter().map(|s| s.sql.as_str()).collect();
        assert_eq!(
            sql,
            [
                "ALTER TABLE a ADD COLUMN name VARCHAR(64) NOT NULL",
                "ALTER TABLE a ADD COLUMN n BIGINT NOT NULL DEFAULT 0",
                "ALTER TABLE a ADD UNIQUE KEY uq_a (name)",
                "ALTER TABLE a ADD KEY idx_n (n)",
            ]
        );
        // Rows that would break the unique key: it is left out, and said so.
        let p = plan(&schema, &live, &mut FakeRows { nulls: 0, duplicates: true }).unwrap();
        assert_eq!(p.steps.len(), 3);
        assert!(p.notes.iter().any(|n| n.contains("uq_a")), "{:?}", p.notes);
    }

    #[test]
    fn only_blockrepl_s_retired_keys_are_dropped_and_only_on_their_table() {
        let schema = Schema::parse(
            "CREATE TABLE cbt_history (\n    id BIGINT NOT NULL,\n    PRIMARY KEY (id)\n);\n\
             CREATE TABLE b (\n    id BIGINT NOT NULL,\n    PRIMARY KEY (id)\n);",
        );
        let id: &[(&str, &str, &str, bool)] = &[("id", "bigint", "bigint(20)", false)];
        let live = live_of(&[
            ("cbt_history", id, &["PRIMARY", "uq_cbt_job_disk", "idx_theirs"]),
            ("b", id, &["PRIMARY", "uq_cbt_job_disk"]),
        ]);
        let p = plan(&schema, &live, &mut FakeRows { nulls: 0, duplicates: false }).unwrap();
        let steps: Vec<(&str, &str)> = p.steps.iter().map(|s| (s.sql.as_str(), s.what.as_str())).collect();
        assert_eq!(
            steps,
            [(
                "ALTER TABLE cbt_history DROP INDEX uq_cbt_job_disk",
                "dropped blockrepl's retired key cbt_history.uq_cbt_job_disk (one row per job and disk; history keeps \
                 one per attempt now)"
            )],
            "the orchestrator's own key stays, and a key of that name on another table"
        );
        let without = live_of(&[("cbt_history", id, &["PRIMARY"]), ("b", id, &["PRIMARY"])]);
        assert!(plan(&schema, &without, &mut FakeRows { nulls: 0, duplicates: false }).unwrap().steps.is_empty());
    }

    #[test]
    fn conflicts_are_all_named_and_nothing_is_planned() {
        let schema = Schema::parse(SMALL);
        let live = live_of(&[
            ("a", &[("name", "varchar", "varchar(64)", false), ("n", "varchar", "varchar(32)", false)], &[]),
            ("b", &[("id", "bigint", "bigint(20)", true)], &["PRIMARY"]),
        ]);
        let got = plan(&schema, &live, &mut FakeRows { nulls: 2, duplicates: false }).unwrap_err();
        let got: Vec<(String, String, String)> =
            got.into_iter().map(|c| (format!("{}.{}", c.table, c.column), c.found, c.expected)).collect();
        assert_eq!(
            got,
            [
                ("a.id".into(), "no such column".into(), "BIGINT".into()),
                ("a.n".into(), "varchar(32)".into(), "BIGINT".into()),
                ("b.id".into(), "bigint(20) NULL with NULL in 2 rows".into(), "BIGINT".into()),
            ]
        );
    }
}
