//! The report at the end: the results table (medians and ratios, the table
//! README.md shows), each scenario's remarks, the details table, and the odd
//! things noticed.

use crate::Finished;
use crate::scenario::{Bench, MIB, median, range};

pub fn print(summary: &[(&str, Finished)], bench: &Bench, command_line: &str) {
    let runs = bench.opt.runs;
    println!(
        "\n## Results (median of {runs} run{}; MiB/s = source data bytes / wall-clock seconds)\n",
        if runs == 1 { "" } else { "s" }
    );
    println!("| scenario | blockrepl MiB/s | nbdcopy MiB/s | ratio |");
    println!("|---|---:|---:|---:|");
    for (name, finished) in summary {
        if let Finished::Done(outcome) = finished
            && outcome.results().is_empty()
        {
            println!("| {name} | see below | — | — |");
            continue;
        }
        match finished {
            Finished::Failed(_) => println!("| {name} | FAILED | FAILED | — |"),
            Finished::Done(outcome) => {
                for r in outcome.results() {
                    println!(
                        "| {} | {:.0} | {:.0} | {:.2} |",
                        r.label,
                        r.blockrepl,
                        r.nbdcopy,
                        r.blockrepl / r.nbdcopy
                    );
                }
            }
        }
    }
    for (_, finished) in summary {
        if let Finished::Done(outcome) = finished {
            print!("{}", outcome.remarks());
        }
    }
    println!("\nCommand: `{command_line}`");

    println!(
        "\nDetails (medians): data moved, wall seconds, range of throughput, copier CPU (user+sys), both servers' \
         CPU during the run, and the CPU that other processes on the machine used meanwhile (in CPUs; high = noisy \
         run)\n"
    );
    println!("| scenario | tool | data MiB | seconds | MiB/s (min–max) | copier CPU s | servers CPU s | others |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (name, finished) in summary {
        let outcome = match finished {
            Finished::Failed(why) => {
                println!("| {name} | — | — | — | FAILED: {why} | — | — | — |");
                continue;
            }
            Finished::Done(outcome) => outcome,
        };
        for row in outcome.details() {
            let bps: Vec<f64> = row.runs.iter().map(|r| r.bps / MIB).collect();
            let (lo, hi) = range(&bps);
            println!(
                "| {name} | {} | {:.0} | {:.2} | {:.0} ({lo:.0}–{hi:.0}) | {:.2} | {:.2} | {:.2} |",
                row.tool,
                row.data_bytes as f64 / MIB,
                median(row.runs.iter().map(|r| Some(r.wall))),
                median(bps.iter().map(|&b| Some(b))),
                median(row.runs.iter().map(|r| r.cpu)),
                median(row.runs.iter().map(|r| r.servers_cpu)),
                median(row.runs.iter().map(|r| r.others)),
            );
        }
    }
    for (_, finished) in summary {
        if let Finished::Done(outcome) = finished {
            print!("{}", outcome.more_details());
        }
    }
    let odd = bench.odd_things();
    if !odd.is_empty() {
        println!("\nOdd things noticed (blockrepl's --json output; the daemon's rows, events and log):");
        for o in odd {
            println!("- {o}");
        }
    }
}
