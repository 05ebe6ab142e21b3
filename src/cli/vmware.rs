//! `blockrepl vmware-check`: tries a configured vCenter the way a VMware job
//! will (certificate pinned to the thumbprint, login with the password file)
//! and, given a VM, lists its disks as a job would name them, and its
//! snapshots. For an operator setting up `[vmware.NAME]`; it changes nothing
//! in vSphere.

use std::path::PathBuf;

use anyhow::Context;

use crate::config::{DEFAULT_PATH, Settings};
use crate::engine::CancelToken;
use crate::vmware::{Client, Endpoint, VmRef};

#[derive(Debug, clap::Args)]
pub struct VmwareCheckArgs {
    /// Configuration file [default: /etc/blockrepl/blockrepl.toml, if present]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The vCenter: NAME of a `[vmware.NAME]` section
    pub name: String,
    /// A VM to look up: inventory path (`/DC/vm/folder/name`) or instance UUID
    pub vm: Option<String>,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: VmwareCheckArgs) -> anyhow::Result<()> {
    let explicit = args.config.is_some();
    let path = args.config.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    let settings = Settings::load(&path, explicit)?;
    let vc = settings
        .vmware
        .get(&args.name)
        .with_context(|| format!("no [vmware.{}] section in {}", args.name, path.display()))?;
    let endpoint = Endpoint::from_config(&args.name, vc)?;
    let client = Client::connect(endpoint, CancelToken::default())?;
    let vm = args.vm.as_deref().map(|v| client.find_vm(&VmRef::parse(v))).transpose()?;
    // The VM's snapshots: a VMware job's is named `blockrepl-JOB` and removed
    // when the job ends.
    let snapshots = vm.as_ref().map(|v| client.snapshots(&v.moref)).transpose()?.unwrap_or_default();
    let about = client.about();
    if args.json {
        let out = serde_json::json!({
            "vcenter": {
                "name": args.name,
                "server": client.server(),
                "product": about.full_name,
                "api_type": about.api_type,
                "version": about.version,
            },
            "vm": vm,
            "snapshots": snapshots
                .iter()
                .map(|s| serde_json::json!({"moref": s.moref.value, "name": s.name, "created": s.created}))
                .collect::<Vec<_>>(),
        });
        println!("{out}");
        return Ok(());
    }
    println!("vCenter {}: {} ({}); certificate and login accepted", client.server(), about.full_name, about.api_type);
    if let Some(vm) = vm {
        let cbt = if vm.cbt_enabled { "on" } else { "off (a VMware job turns it on)" };
        println!("VM {} ({}, instance UUID {}): CBT {cbt}", vm.name, vm.moref, vm.instance_uuid);
        for d in &vm.disks {
            println!(
                "  {}  {}  {} bytes  {}  change ID {}",
                d.disk_id(),
                d.label,
                d.capacity,
                d.file,
                d.change_id.as_deref().unwrap_or("-")
            );
        }
        for s in &snapshots {
            println!("  snapshot {}  {}  {}", s.moref.value, s.name, s.created);
        }
    }
    Ok(())
}
