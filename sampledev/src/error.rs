//! The one error type handlers return: an errno for the client plus a reason for the log.

#[derive(Debug, thiserror::Error)]
#[error("{why} (errno {errno})")]
pub struct Refusal {
    pub errno: i32,
    pub why: String,
}

impl Refusal {
    pub fn new(errno: i32, why: impl Into<String>) -> Refusal {
        Refusal {
            errno,
            why: why.into(),
        }
    }

    pub fn inval(why: impl Into<String>) -> Refusal {
        Self::new(libc::EINVAL, why)
    }

    pub fn notsup(why: impl Into<String>) -> Refusal {
        Self::new(libc::ENOTSUP, why)
    }
}

impl From<vfio_user::Error> for Refusal {
    /// Payload decoding errors: the request was malformed.
    fn from(e: vfio_user::Error) -> Refusal {
        Refusal::inval(e.to_string())
    }
}
