//! EnSpeed's virtual machine monitor: one process per VM, on KVM and the
//! rust-vmm crates. [`vm::run`] builds a VM from a [`config::VmConfig`] and
//! runs it until the guest powers off or the host stops it.

#![deny(missing_docs)]

pub mod api;
pub mod arch;
pub mod bus;
pub mod config;
pub mod devices;
pub mod memory;
pub mod migration;
pub mod rfb;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
