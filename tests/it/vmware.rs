//! VMware through the binary: `blockrepl vmware-check` against the vSphere
//! simulator (`tools/vcsim-cbt`). The client's calls, the changed areas and the
//! end-to-end copies without the daemon are unit tests in `src/vmware/tests.rs`.

use std::path::{Path, PathBuf};

use crate::harness::{blockrepl, tempdir};
use crate::vcsim::{PASSWORD, USER, Vcsim};

/// A configuration file with one `[vmware.sim]` section (and its password file).
fn config(dir: &Path, sim: &Vcsim, thumbprint: &str, password: &str) -> PathBuf {
    let pw = dir.join("vc.password");
    std::fs::write(&pw, format!("{password}\n")).unwrap();
    let path = dir.join("blockrepl.toml");
    let text = format!(
        "[vmware.sim]\nurl = \"{}\"\nuser = \"{USER}\"\npassword_file = \"{}\"\nthumbprint = \"{thumbprint}\"\n",
        sim.url,
        pw.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn vmware_check_lists_the_disks_of_a_vm_by_path_or_uuid() {
    let dir = tempdir();
    let sim = Vcsim::start(dir.path(), &["-disks", "8M,4M"]);
    let cfg = config(dir.path(), &sim, &sim.thumbprint, PASSWORD);
    let cfg = cfg.to_str().unwrap();
    for vm in [sim.vm_path.as_str(), sim.vm_uuid.as_str()] {
        let out = blockrepl(&["vmware-check", "--config", cfg, "sim", vm, "--json"]).json();
        assert_eq!(out["vcenter"]["api_type"], "VirtualCenter");
        assert_eq!(out["vm"]["moref"], sim.vm_moref.as_str());
        assert_eq!(out["vm"]["cbt_enabled"], false);
        let disks = out["vm"]["disks"].as_array().unwrap();
        let got: Vec<(i64, &str, u64)> = disks
            .iter()
            .map(|d| (d["key"].as_i64().unwrap(), d["label"].as_str().unwrap(), d["capacity"].as_u64().unwrap()))
            .collect();
        assert_eq!(got, vec![(2000, "Hard disk 1", 8 << 20), (2001, "Hard disk 2", 4 << 20)]);
    }
    let text = blockrepl(&["vmware-check", "--config", cfg, "sim", &sim.vm_path]);
    text.assert_ok();
    assert!(text.stdout.contains("disk-2001  Hard disk 2  4194304 bytes"), "{}", text.stdout);
}

#[test]
fn vmware_check_refuses_another_certificate_in_one_line() {
    let dir = tempdir();
    let sim = Vcsim::start(dir.path(), &[]);
    let other = "00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF";
    let cfg = config(dir.path(), &sim, other, PASSWORD);
    let line = blockrepl(&["vmware-check", "--config", cfg.to_str().unwrap(), "sim"]).error_line();
    assert!(line.contains("does not match"), "{line}");
    assert!(line.contains(&sim.thumbprint) && line.contains(other), "both thumbprints: {line}");
}

#[test]
fn vmware_check_with_a_wrong_password_says_so_without_showing_it() {
    let dir = tempdir();
    let sim = Vcsim::start(dir.path(), &[]);
    let cfg = config(dir.path(), &sim, &sim.thumbprint, "Wr0ng-pa55word");
    let run = blockrepl(&["vmware-check", "--config", cfg.to_str().unwrap(), "sim", &sim.vm_path]);
    let line = run.error_line();
    assert!(line.contains(&format!("login as {USER} refused")), "{line}");
    assert!(!run.stderr.contains("Wr0ng-pa55word") && !run.stdout.contains("Wr0ng-pa55word"));
}

#[test]
fn vmware_check_names_a_missing_vm_or_section_or_bad_key() {
    let dir = tempdir();
    let sim = Vcsim::start(dir.path(), &[]);
    let cfg = config(dir.path(), &sim, &sim.thumbprint, PASSWORD);
    let cfg_s = cfg.to_str().unwrap();
    let line = blockrepl(&["vmware-check", "--config", cfg_s, "sim", "/DC0/vm/nope"]).error_line();
    assert!(line.contains("no virtual machine /DC0/vm/nope"), "{line}");
    let line = blockrepl(&["vmware-check", "--config", cfg_s, "other"]).error_line();
    assert!(line.contains("no [vmware.other] section"), "{line}");

    let text = std::fs::read_to_string(&cfg).unwrap().replace(&sim.thumbprint, "AB:CD");
    std::fs::write(&cfg, text).unwrap();
    let line = blockrepl(&["vmware-check", "--config", cfg_s, "sim"]).error_line();
    assert!(line.contains("vmware.sim.thumbprint"), "{line}");
}
