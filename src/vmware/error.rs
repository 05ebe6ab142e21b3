//! What can go wrong talking to vCenter or running a disk's NBD server, as one
//! enum with one line per case. Every message names the vCenter (its name in the
//! configuration and its address) and the object that failed. No variant holds
//! a password or a session cookie.

/// vSphere fault types that mean "try again later", not "this cannot work".
const TRANSIENT_FAULTS: &[&str] = &[
    "HostCommunication",
    "HostNotConnected",
    "HostNotReachable",
    "TaskInProgress",
    "ConcurrentAccess",
    "RequestCanceled",
];

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VmwareError {
    /// No answer: refused, reset, timed out, or an HTTP gateway error (a vCenter
    /// restarting answers 503 for a while). Worth retrying with backoff.
    #[error("vCenter {server}: unreachable: {reason}")]
    Unreachable { server: String, reason: String },

    #[error("vCenter {server}: certificate thumbprint {presented} does not match the configured {expected}")]
    Thumbprint { server: String, expected: String, presented: String },

    #[error("vCenter {server}: login as {user} refused: wrong user name or password")]
    Login { server: String, user: String },

    #[error("vCenter {server}: no virtual machine {vm}")]
    VmNotFound { server: String, vm: String },

    #[error("vCenter {server}: VM {vm} has no virtual disk with key {key}")]
    DiskNotFound { server: String, vm: String, key: i32 },

    /// The previous change ID is not (or no longer) valid for the disk: CBT was
    /// reset (disabled, or the disk moved). Only a full copy can go on.
    #[error(
        "vCenter {server}: change ID '{change_id}' of disk {disk} is not valid any more (CBT was reset); a full copy is needed"
    )]
    InvalidChangeId { server: String, disk: String, change_id: String },

    /// The snapshot's copy of a disk has no changeId: CBT is not active on it.
    #[error(
        "vCenter {server}: disk {disk} of snapshot {snapshot} has no change ID; is CBT enabled, and was the VM stunned since?"
    )]
    NoChangeId { server: String, disk: String, snapshot: String },

    /// A vSphere fault, by its type (`InvalidState`, `FileFault`, ...).
    #[error("vCenter {server}: {method}: {fault}: {message}")]
    Fault { server: String, method: String, fault: String, message: String },

    #[error("vCenter {server}: task {task} ({what}) failed: {fault}: {message}")]
    TaskFailed { server: String, task: String, what: String, fault: String, message: String },

    #[error("vCenter {server}: task {task} ({what}) did not finish within {seconds} s")]
    TaskTimeout { server: String, task: String, what: String, seconds: u64 },

    #[error("vCenter {server}: {what}: cancelled")]
    Cancelled { server: String, what: String },

    /// An answer we cannot read.
    #[error("vCenter {server}: {method}: unexpected answer: {reason}")]
    Protocol { server: String, method: String, reason: String },

    /// The configuration cannot be used (unreadable password file, bad URL).
    #[error("vCenter {name}: {reason}")]
    Config { name: String, reason: String },

    /// A disk's NBD server could not be started or stopped.
    #[error("NBD source for disk {disk}: {reason}")]
    Source { disk: String, reason: String },
}

impl VmwareError {
    /// Whether trying again later may succeed (vCenter unreachable, busy or
    /// restarting). Retrying, and for how long, is the caller's policy.
    pub fn is_transient(&self) -> bool {
        match self {
            VmwareError::Unreachable { .. } => true,
            VmwareError::Fault { fault, .. } | VmwareError::TaskFailed { fault, .. } => {
                TRANSIENT_FAULTS.contains(&fault.as_str())
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(kind: &str) -> VmwareError {
        VmwareError::Fault { server: "vc".into(), method: "m".into(), fault: kind.into(), message: "x".into() }
    }

    #[test]
    fn only_unreachable_and_busy_are_transient() {
        assert!(VmwareError::Unreachable { server: "vc".into(), reason: "refused".into() }.is_transient());
        assert!(fault("HostCommunication").is_transient());
        assert!(fault("TaskInProgress").is_transient());
        assert!(!fault("InvalidArgument").is_transient());
        assert!(!fault("FileFault").is_transient());
        assert!(!VmwareError::Login { server: "vc".into(), user: "u".into() }.is_transient());
        let bad = VmwareError::InvalidChangeId { server: "vc".into(), disk: "d".into(), change_id: "52 aa/3".into() };
        assert!(!bad.is_transient());
        assert!(bad.to_string().contains("'52 aa/3'"), "{bad}");
    }
}
