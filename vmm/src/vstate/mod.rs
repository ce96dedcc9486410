//! KVM state of the VM and its vCPUs: creation, boot setup, threads, save/restore.

pub mod cpuid;
pub mod memory;
pub mod runner;
pub mod vcpu;
pub mod vm;
