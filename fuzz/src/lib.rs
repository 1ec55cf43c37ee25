//! Fuzz targets for every parser fed by a guest, a VMM, a control client or
//! a dead backend's shadow log (docs/FUZZING.md).
//!
//! Each target is a plain function of a byte slice: it builds the shared
//! memory or message the parser reads from those bytes (structure-aware,
//! through [`arbitrary::Unstructured`], so most inputs get past the first
//! check), runs the parser's public API exactly as the data plane calls it,
//! and checks what came out against the rules the parser promises (a
//! validated request stays inside the disk and the guest's memory, a plan
//! accounts for each entry once, …). A panic is a finding.
//!
//! Two engines drive the same functions: libFuzzer (coverage-guided, built
//! on stable Rust with `--features libfuzzer`, `scripts/fuzz.sh`) for long
//! runs, and [`mutate`], a small deterministic mutation loop that
//! `cargo test` runs for a few seconds per target after replaying the
//! corpus and every kept finding.

#![forbid(unsafe_code)]

pub mod blkif;
pub mod control;
pub mod mutate;
pub mod netif;
pub mod recovery;
pub mod vhost_user;
pub mod virtio;
pub mod vnet_ctrl;

/// The fuzz targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// blkif requests through the back ring consumer and the parser.
    Blkif,
    /// netif TX packets through `parse_tx`, RX frames through `rx_plan`.
    Netif,
    /// Descriptor-chain walk and the virtio-blk request parser.
    Virtio,
    /// vhost-user messages through `vhost` and the supervisor's handler.
    VhostUser,
    /// Control messages: the codec and every typed view.
    Control,
    /// The recovery planner fed arbitrary shadow logs.
    Recovery,
    /// virtio-net control-queue commands through `vnet::ctrl::execute`.
    VnetCtrl,
}

impl Target {
    /// Every target, in the order the docs list them.
    pub const ALL: [Target; 7] = [
        Target::Blkif,
        Target::Netif,
        Target::Virtio,
        Target::VhostUser,
        Target::Control,
        Target::Recovery,
        Target::VnetCtrl,
    ];

    /// The name used by `scripts/fuzz.sh` and the corpus directories.
    pub fn name(self) -> &'static str {
        match self {
            Target::Blkif => "blkif",
            Target::Netif => "netif",
            Target::Virtio => "virtio",
            Target::VhostUser => "vhost_user",
            Target::Control => "control",
            Target::Recovery => "recovery",
            Target::VnetCtrl => "vnet_ctrl",
        }
    }

    /// The target called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Runs one input.
    pub fn run(self, data: &[u8]) {
        match self {
            Target::Blkif => blkif::run(data),
            Target::Netif => netif::run(data),
            Target::Virtio => virtio::run(data),
            Target::VhostUser => vhost_user::run(data),
            Target::Control => control::run(data),
            Target::Recovery => recovery::run(data),
            Target::VnetCtrl => vnet_ctrl::run(data),
        }
    }
}
