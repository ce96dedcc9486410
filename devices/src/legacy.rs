//! The small ISA port devices an x86 guest (Linux or a test guest) touches besides the UART:
//! the i8042 reset line, the isa-debug-exit port, the CMOS RTC and the POST-code port. The two
//! that end the VM share one [`ExitSignal`].

mod cmos;
mod exit_port;
mod exit_signal;
mod i8042;
mod post;

pub use cmos::{CMOS_BASE, CMOS_LEN, Cmos, CmosState};
pub use exit_port::{EXIT_PORT_BASE, EXIT_PORT_LEN, ExitPort, ExitPortState};
pub use exit_signal::{ExitSignal, LegacyError};
pub use i8042::{I8042, I8042_BASE, I8042_LEN, I8042State, RESET_EXIT_CODE};
pub use post::{POST_BASE, POST_LEN, PostCode, PostCodeState};
