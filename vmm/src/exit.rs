//! How the guest (exit port, i8042 reset), a vCPU error or the control API end the VM.

pub use devices::legacy::ExitSignal;
