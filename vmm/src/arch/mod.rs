//! x86_64 specifics: memory layout, boot protocols, vCPU registers, CPUID
//! and the ACPI tables.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod firmware;
pub mod layout;
pub mod regs;
