//! Hands a value from the BSP to the APs: written once, then only read.
//!
//! Included with `mod publish;`. The APs may start before the value is there, so `get` waits.
#![allow(dead_code)]

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicU8, Ordering};

const EMPTY: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;

pub struct Published<T> {
    state: AtomicU8,
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the value is written by one CPU before READY is stored (Release) and only read
// after READY is seen (Acquire); it is never written again, so readers share `&T` only.
unsafe impl<T: Sync> Sync for Published<T> {}

impl<T> Published<T> {
    pub const fn new() -> Self {
        Published {
            state: AtomicU8::new(EMPTY),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// Stores the value; the second and later calls panic.
    pub fn publish(&self, value: T) -> &T {
        if self
            .state
            .compare_exchange(EMPTY, WRITING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            panic!("published twice");
        }
        // SAFETY: the EMPTY -> WRITING transition above makes this the only writer, and no
        // reader looks at the cell before READY.
        unsafe { (*self.value.get()).write(value) };
        self.state.store(READY, Ordering::Release);
        self.get()
    }

    /// The value, once published; spins until then.
    pub fn get(&self) -> &T {
        while self.state.load(Ordering::Acquire) != READY {
            crate::rt::pause();
        }
        // SAFETY: READY is stored only after the value was fully written, and it is never
        // written again.
        unsafe { (*self.value.get()).assume_init_ref() }
    }
}
